// Talking to the web role's HTTP API (same origin). One place for tokens and errors.

const TOKEN_KEY = "imagebus.token";

/** The access token (IMAGEBUS_WEB_TOKEN) this browser keeps, if the server needs one. */
export function accessToken() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

export function setAccessToken(token) {
  if (token) localStorage.setItem(TOKEN_KEY, token);
  else localStorage.removeItem(TOKEN_KEY);
}

/** A URL that carries the access token, for what cannot send headers (img, EventSource). */
export function withToken(url) {
  const token = accessToken();
  if (!token) return url;
  const sep = url.includes("?") ? "&" : "?";
  return `${url}${sep}token=${encodeURIComponent(token)}`;
}

/** An HTTP failure with the server's explanation (`detail`) and, for a 422, the `field`. */
export class ApiError extends Error {
  constructor(status, body) {
    super(describe(body) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
    this.field = body && typeof body === "object" ? fieldOf(body) : null;
  }
}

function describe(body) {
  if (!body) return "";
  if (typeof body === "string") return body;
  const detail = body.detail ?? body.error ?? body.message;
  if (typeof detail === "string") return detail;
  if (detail && typeof detail === "object") return detail.message || detail.msg || JSON.stringify(detail);
  if (Array.isArray(detail)) return detail.map((d) => d.msg || d.message || JSON.stringify(d)).join("; ");
  return "";
}

function fieldOf(body) {
  if (typeof body.field === "string") return body.field;
  const detail = body.detail;
  if (detail && typeof detail === "object" && typeof detail.field === "string") return detail.field;
  if (body.error && typeof body.error === "object" && typeof body.error.field === "string") return body.error.field;
  return null;
}

/** fetch() returning parsed JSON, throwing ApiError on a non-2xx answer. */
export async function api(path, { method = "GET", body, token } = {}) {
  const headers = { Accept: "application/json" };
  const bearer = token ?? accessToken();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let parsed = text;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    /* not JSON: keep the text */
  }
  if (!response.ok) throw new ApiError(response.status, parsed);
  return parsed;
}

/** Small formatting helpers shared by both pages. */
export const fmt = {
  num(value, digits = 2) {
    if (value === null || value === undefined || Number.isNaN(Number(value))) return "–";
    return Number(value).toFixed(digits);
  },
  seconds(value) {
    if (value === null || value === undefined) return "–";
    const v = Number(value);
    if (v < 1) return `${Math.round(v * 1000)} ms`;
    if (v < 10) return `${v.toFixed(1)} s`;
    if (v < 120) return `${Math.round(v)} s`;
    return `${Math.round(v / 60)} min`;
  },
  ago(value) {
    if (value === null || value === undefined) return "–";
    return `${fmt.seconds(value)} ago`;
  },
  time(iso) {
    if (!iso) return "–";
    const date = typeof iso === "number" ? new Date(iso * (iso < 1e12 ? 1000 : 1)) : new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleTimeString();
  },
};

/** Creates an element: el("td", {class: "num"}, "3"). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** A coloured badge for a state name. */
export function stateBadge(state) {
  const s = String(state ?? "unknown").toLowerCase();
  const tone =
    ["done", "succeeded", "ok", "idle", "closed", "completed", "live"].includes(s) ? "ok"
    : ["failed", "error", "open", "blacklisted", "breaker_open", "dead", "expired", "rejected", "timeout", "timed_out", "refused"].includes(s) ? "bad"
    : ["cancelled", "canceled", "draining", "half-open", "paused", "partial"].includes(s) ? "warn"
    : ["running", "busy", "assigned", "accepted", "generating"].includes(s) ? "info"
    : "";
  return el("span", { class: `badge ${tone}`.trim() }, s);
}

/** A form asking for the access token (after a 401): kept in this browser, then reload. */
export function askForToken(message) {
  const input = el("input", { type: "password", placeholder: "access token", "aria-label": "access token", id: "access-token" });
  const form = el("form", { class: "inline", onsubmit: (event) => {
    event.preventDefault();
    setAccessToken(input.value.trim());
    location.reload();
  } }, input, el("button", { class: "btn primary", type: "submit" }, "Use token"));
  return el("div", { class: "notice bad", style: "display: grid; gap: 8px" },
    el("div", {}, `${message} This server needs its access token (IMAGEBUS_WEB_TOKEN).`), form);
}
