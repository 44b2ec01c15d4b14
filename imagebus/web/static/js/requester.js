// The requester page: the form, the job being watched, and this browser's past jobs.
import { api, askForToken, el, fmt, withToken } from "./api.js";
import { buildForm } from "./form.js";
import { JobView } from "./job.js";

const GALLERY_KEY = "imagebus.jobs";
const GALLERY_MAX = 60;

const $ = (id) => document.getElementById(id);
let form = null;
let view = null;

function loadGallery() {
  try {
    const jobs = JSON.parse(localStorage.getItem(GALLERY_KEY) || "[]");
    return Array.isArray(jobs) ? jobs : [];
  } catch {
    return [];
  }
}

function saveJob(job) {
  const jobs = loadGallery();
  const at = jobs.findIndex((j) => j.id === job.id);
  if (at >= 0) jobs[at] = job; // keeps its place: viewing an old job does not reorder them
  else jobs.unshift(job);
  localStorage.setItem(GALLERY_KEY, JSON.stringify(jobs.slice(0, GALLERY_MAX)));
  renderGallery();
}

function renderGallery() {
  const jobs = loadGallery();
  $("gallery-empty").hidden = jobs.length > 0;
  $("gallery").replaceChildren(...jobs.map((job) => {
    const made = (job.images || []).filter(Boolean).slice(0, 4);
    const thumbs = el("div", { class: `thumbs${made.length <= 1 ? " one" : ""}` },
      made.map((url) => el("img", { src: withToken(url), alt: "", loading: "lazy", onerror: (e) => e.target.remove() })));
    return el("button", { type: "button", title: job.prompt, "data-job": job.id, onclick: () => show(job) },
      thumbs,
      el("div", { class: "caption" }, job.prompt || job.id),
      el("div", { class: "caption muted" }, `${job.n} × ${job.width || "?"}×${job.height || "?"} · ${job.state || ""}`));
  }));
}

/** Shows a job (new or from the gallery) in the results card and follows it if it runs. */
function show(job, { follow = true } = {}) {
  view?.close();
  $("job-title").textContent = job.prompt ? `“${job.prompt}”` : "Results";
  $("job-meta").textContent = `${job.id} · ${job.n} image${job.n === 1 ? "" : "s"} · ${fmt.time(job.created)}`;
  const zip = $("download-zip");
  zip.href = withToken(`/v1/jobs/${job.id}.zip`);
  zip.setAttribute("download", `${job.id}.zip`);
  zip.hidden = true;
  view = new JobView(job, { grid: $("images"), stateBox: $("job-state"), onChange: changed });
  $("cancel").hidden = false;
  if (follow && !["done", "partial", "failed", "cancelled", "expired"].includes(job.state)) view.follow();
  else refreshPast(view);
  changed(job);
}

async function refreshPast(pastView) {
  try {
    pastView.applyStatus(await api(`/v1/jobs/${pastView.job.id}`));
  } catch {
    // Gone from the server: show the images this browser saw, as far as they still load.
    (pastView.job.images || []).forEach((url, index) => url && pastView.result({ index, ok: true, url }));
    pastView.finish(pastView.job.state);
  }
}

function changed(job) {
  const running = view && view.job === job && view.running;
  $("cancel").hidden = !running;
  $("download-zip").hidden = !(job.images || []).some(Boolean);
  saveJob(job);
}

async function submit(event) {
  event.preventDefault();
  form.clearErrors();
  $("form-error").hidden = true;
  const request = form.values();
  const button = $("generate");
  button.disabled = true;
  try {
    const accepted = await api("/v1/jobs", { method: "POST", body: request });
    form.save();
    const prompt = Array.isArray(request.prompt) ? request.prompt[0] : request.prompt;
    show({
      id: accepted.job_id,
      n: accepted.n ?? request.n ?? 1,
      seeds: accepted.seeds || [],
      images: accepted.images ? [...accepted.images].fill(null) : [],
      width: accepted.width ?? request.width,
      height: accepted.height ?? request.height,
      prompt,
      created: Date.now(),
      state: "queued",
    });
  } catch (error) {
    const message = error.message || String(error);
    if (!(error.field && form.showError(error.field, message))) {
      $("form-error").textContent = error.status === 429 ? `Too many requests: ${message}` : message;
      $("form-error").hidden = false;
    }
  } finally {
    button.disabled = false;
  }
}

async function cancel() {
  if (!view) return;
  const button = $("cancel");
  button.disabled = true;
  try {
    // The answer is the job's status once it has stopped, or {state: "cancelling"}
    // (202) while it stops: then its events bring the rest.
    const status = await api(`/v1/jobs/${view.job.id}`, { method: "DELETE" });
    if (status?.tasks) view.applyStatus(status);
  } catch (error) {
    $("job-meta").textContent = `Could not cancel: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

async function poolSummary() {
  try {
    const answer = await api("/v1/workers");
    const workers = Array.isArray(answer) ? answer : answer.workers || [];
    const models = [...new Set(workers.flatMap((w) => (w.advert || w).models || []))];
    $("pool-summary").textContent = `${workers.length} worker${workers.length === 1 ? "" : "s"}${models.length ? ` · ${models.join(", ")}` : ""}`;
    return models;
  } catch {
    return [];
  }
}

async function start() {
  renderGallery();
  $("cancel").addEventListener("click", cancel);
  $("clear-gallery").addEventListener("click", () => {
    localStorage.removeItem(GALLERY_KEY);
    renderGallery();
  });
  let schema;
  try {
    schema = await api("/v1/schema");
  } catch (error) {
    $("fields").replaceChildren(error.status === 401 ? askForToken(error.message + ".")
      : el("div", { class: "notice bad" }, `Could not load the request schema: ${error.message}`));
    return;
  }
  form = buildForm($("fields"), schema);
  $("request-form").addEventListener("submit", submit);
  // Ctrl+Enter (or Cmd+Enter) in any field sends the request.
  $("request-form").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("request-form").requestSubmit();
  });
  const models = await poolSummary();
  form.setModels(models);
  // First visit: a preset named after a model the pool serves (the tiny model in a demo).
  if (!form.restore()) {
    const presets = schema.properties?.preset?.enum || [];
    const fitting = presets.find((p) => models.includes(p));
    if (fitting) form.set("preset", fitting);
  }
  const latest = loadGallery()[0];
  if (latest) show(latest);
  setInterval(poolSummary, 10000);
}

start();
