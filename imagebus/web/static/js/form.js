// The request form, built from the JSON Schema the server serves (GET /v1/schema):
// whatever the orchestrators accept appears here with its limits, nothing is duplicated.
import { el } from "./api.js";

// How the common fields read; any other field of the schema falls into "Advanced".
const LABELS = {
  prompt: "Prompt",
  negative_prompt: "Negative prompt",
  preset: "Preset",
  model: "Model",
  width: "Width",
  height: "Height",
  steps: "Steps",
  guidance: "Guidance",
  n: "Images",
  seed: "Seed",
};
const MAIN = ["prompt", "negative_prompt", "preset", "model"];
const PAIRS = [["width", "height"], ["steps", "n"], ["seed", "guidance"]];
const SAVED_KEY = "imagebus.form";

/** The first schema in a oneOf/anyOf that is a plain value (the prompt: one string). */
function simplest(schema) {
  const options = schema.oneOf || schema.anyOf;
  if (!options) return schema;
  return { ...options.find((o) => o.type === "string") || options[0], description: schema.description };
}

function labelFor(name) {
  return LABELS[name] || name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
}

function inputFor(name, rawSchema) {
  const schema = simplest(rawSchema);
  const id = `f-${name}`;
  const common = { id, name, "data-field": name };
  if (schema.enum) {
    return el("select", common, el("option", { value: "" }, "—"),
      schema.enum.map((value) => el("option", { value }, value)));
  }
  if (schema.type === "integer" || schema.type === "number") {
    const step = schema.multipleOf ?? (schema.type === "integer" ? 1 : "any");
    return el("input", {
      ...common, type: "number", inputmode: schema.type === "integer" ? "numeric" : "decimal",
      min: schema.minimum ?? schema.exclusiveMinimum, max: schema.maximum, step,
      placeholder: schema.default !== undefined ? String(schema.default) : (name === "seed" ? "random" : ""),
      "data-type": schema.type,
    });
  }
  if (schema.type === "string" && (name.endsWith("prompt") || (schema.maxLength ?? 0) > 200)) {
    return el("textarea", { ...common, rows: name === "prompt" ? 3 : 2, maxlength: schema.maxLength,
      placeholder: name === "prompt" ? "a lighthouse at dusk, oil painting" : "" });
  }
  if (schema.type === "string") return el("input", { ...common, type: "text", maxlength: schema.maxLength, list: `${id}-list` });
  return null; // objects (requirements) are left to the presets
}

function fieldBox(name, schema, required) {
  const input = inputFor(name, schema);
  if (!input) return null;
  const description = simplest(schema).description;
  return el("div", { class: "field", "data-field-box": name },
    el("label", { for: input.id }, labelFor(name), required ? " *" : ""),
    input,
    name === "model" ? el("datalist", { id: `${input.id}-list` }) : null,
    description && !["prompt", "n", "seed"].includes(name) ? el("div", { class: "hint" }, description) : null,
    el("div", { class: "error", role: "alert", "aria-live": "polite", "data-error-for": name }));
}

/** Fills `container` with the fields of `schema`; returns the built form's helpers. */
export function buildForm(container, schema) {
  const properties = schema.properties || {};
  const required = new Set(schema.required || []);
  const placed = new Set();
  const box = (name) => {
    if (!(name in properties) || placed.has(name)) return null;
    placed.add(name);
    return fieldBox(name, properties[name], required.has(name));
  };
  container.replaceChildren();
  for (const name of MAIN) {
    const field = box(name);
    if (field) container.append(field);
  }
  for (const pair of PAIRS) {
    const fields = pair.map(box).filter(Boolean);
    if (fields.length) container.append(el("div", { class: "row" }, fields));
  }
  const rest = Object.keys(properties).map(box).filter(Boolean);
  if (rest.length) {
    container.append(el("details", { class: "advanced" }, el("summary", {}, "Advanced"), rest));
  }
  return new RequestForm(container);
}

class RequestForm {
  constructor(container) {
    this.container = container;
    this.inputs = [...container.querySelectorAll("[data-field]")];
  }

  /** The request: only the fields filled in (the preset and the server fill in the rest). */
  values() {
    const request = {};
    for (const input of this.inputs) {
      const raw = input.value.trim();
      if (raw === "") continue;
      request[input.name] = input.dataset.type ? Number(raw) : raw;
    }
    return request;
  }

  save() {
    const saved = {};
    for (const input of this.inputs) saved[input.name] = input.value;
    localStorage.setItem(SAVED_KEY, JSON.stringify(saved));
  }

  /** Puts back what this browser sent last; false when there is nothing saved. */
  restore() {
    let saved;
    try {
      saved = JSON.parse(localStorage.getItem(SAVED_KEY) || "null");
    } catch {
      saved = null;
    }
    if (!saved) return false;
    for (const input of this.inputs) if (input.name in saved) input.value = saved[input.name];
    return true;
  }

  set(name, value) {
    const input = this.inputs.find((i) => i.name === name);
    if (input) input.value = value;
  }

  setModels(models) {
    const list = this.container.querySelector("datalist");
    if (list) list.replaceChildren(...models.map((m) => el("option", { value: m })));
  }

  clearErrors() {
    for (const box of this.container.querySelectorAll(".field.invalid")) box.classList.remove("invalid");
    for (const err of this.container.querySelectorAll("[data-error-for]")) err.textContent = "";
  }

  /** Shows `message` beside the field at fault ("prompt[1]" names the prompt); false if none. */
  showError(field, message) {
    const name = String(field || "").split(/[.[]/)[0];
    const box = this.container.querySelector(`[data-field-box="${CSS.escape(name)}"]`);
    if (!box) return false;
    const details = box.closest("details");
    if (details) details.open = true;
    box.classList.add("invalid");
    box.querySelector("[data-error-for]").textContent = message;
    box.querySelector("[data-field]").focus();
    return true;
  }
}
