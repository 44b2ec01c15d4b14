// The operator dashboard: follows GET /v1/pool/events (the pool's document pushed about
// once a second) and redraws in place; while the stream is down it polls GET /v1/pool,
// which also says why (a 401 asks for the token).
// Admin actions (the blacklist) send the admin token typed here; the server decides.
import { api, askForToken, el, fmt, stateBadge, withToken } from "./api.js";
import { lineChart } from "./chart.js";
import { normalize } from "./pool.js";

const POLL_MS = 1000;
const STALE_MS = 4000; // no pool event for this long: the top bar says the page is stale
const HISTORY_S = 300; // the chart's span when the server gives no history of its own
const ADMIN_KEY = "imagebus.admin-token";

const $ = (id) => document.getElementById(id);
const history = []; // [{t, images_per_s, jobs_per_s}] sampled by this page
let lastOk = 0;

function table(id, headers, rows, empty) {
  const head = el("thead", {}, el("tr", {}, headers.map(([label, cls]) => el("th", { class: cls }, label))));
  const body = el("tbody", {}, rows.length ? rows
    : el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, empty)));
  $(id).replaceChildren(head, body);
}

function stat(label, value, sub = "") {
  return el("div", { class: "stat" }, el("div", { class: "label" }, label),
    el("div", { class: "value" }, value), el("div", { class: "sub" }, sub));
}

function renderStats(pool) {
  const busy = pool.workers.reduce((sum, w) => sum + (w.slots_busy ?? 0), 0);
  const slots = pool.workers.reduce((sum, w) => sum + (w.slots ?? 0), 0);
  const { rates, latency } = pool;
  const made = pool.totals.tasks?.done ?? 0;
  $("stats").replaceChildren(
    stat("Workers", String(pool.workers.length), `${busy} / ${slots} slots busy`),
    stat("Waiting", String(pool.queueDepth), "images waiting for a worker"),
    stat("Images/s", fmt.num(rates.images_per_s), `jobs/s ${fmt.num(rates.jobs_per_s)}`),
    stat("Queue wait p50", fmt.seconds(latency.queueWaitP50), `p95 ${fmt.seconds(latency.queueWaitP95)}`),
    stat("Generation p50", fmt.seconds(latency.generationP50), `p95 ${fmt.seconds(latency.generationP95)}`),
    stat("Jobs running", String(pool.jobsRunning), `${made} images made`),
  );
}

function renderChart(pool) {
  const { rates } = pool;
  let images = rates.images;
  let jobs = rates.jobs;
  let span;
  if (images?.length && rates.bucket_s) {
    // From the first busy bucket on (at least a minute): a new pool's chart is not all zeros.
    const first = Math.max(0, Math.min(images.findIndex((n) => n > 0), images.length - 60 / rates.bucket_s));
    const start = images.some((n) => n > 0) ? Math.max(0, first - 1) : 0;
    images = images.slice(start).map((count) => count / rates.bucket_s);
    jobs = (jobs || []).slice(start).map((count) => count / rates.bucket_s);
    span = images.length * rates.bucket_s;
  } else {
    // No series from the server: this page's own samples of the current rates.
    const now = Date.now() / 1000;
    history.push({ t: now, images: rates.images_per_s || 0, jobs: rates.jobs_per_s || 0 });
    while (history.length && history[0].t < now - HISTORY_S) history.shift();
    images = history.map((h) => h.images);
    jobs = history.map((h) => h.jobs);
    span = history.length > 1 ? now - history[0].t : 0;
  }
  $("chart-window").textContent = span ? `last ${fmt.seconds(span)}` : "";
  lineChart($("chart"), [
    { values: images, color: "var(--accent)" },
    { values: jobs || [], color: "var(--ok)" },
  ], { label: span ? `−${fmt.seconds(span)} … now` : "" });
}

function renderQueues(pool) {
  table("queues", [["model"], ["images waiting", "num"]],
    pool.queue.map((q) => el("tr", {}, el("td", { class: "mono" }, q.model),
      el("td", { class: "num" }, String(q.depth ?? 0)))),
    "no model has been asked for yet");
}

function renderWorkers(pool) {
  $("workers-count").textContent = `${pool.workers.length} live${pool.gone ? ` · ${pool.gone} gone` : ""}`;
  // Trust levels come from workers that report one; the column shows only then.
  const trusted = pool.workers.some((w) => (w.trust ?? w.trust_level) !== undefined);
  const headers = [["worker"], ["models"], ["device"], ["slots", "num"], ["state"], ["s/image", "num"],
    ["done", "num"], ["failed", "num"], ["last seen", "num"], ["breaker"], trusted ? ["trust"] : null, [""]].filter(Boolean);
  table("workers", headers, pool.workers.map((w) => el("tr", { "data-worker": w.worker_id },
    el("td", { class: "mono" }, w.worker_id),
    el("td", {}, (w.models || []).join(", ")),
    el("td", {}, [w.device, w.gpu_name, w.vram_gb ? `${fmt.num(w.vram_gb, 0)} GB` : null].filter(Boolean).join(" · ")),
    el("td", { class: "num" }, `${w.slots_busy ?? 0} / ${w.slots ?? 0}`),
    el("td", {}, stateBadge(w.state)),
    el("td", { class: "num" }, w.seconds_per_image ? fmt.num(w.seconds_per_image) : "–"),
    el("td", { class: "num" }, String(w.tasks_done ?? 0)),
    el("td", { class: "num" }, String(w.failures ?? 0)),
    el("td", { class: "num" }, fmt.ago(w.last_seen_s)),
    el("td", { title: w.breaker_failures ? `${w.breaker_failures} failures in a row` : "" },
      stateBadge(w.breaker || "closed"), w.breaker === "open" ? ` ${fmt.seconds(w.breaker_open_s)}` : ""),
    trusted ? el("td", {}, String(w.trust ?? w.trust_level ?? "–")) : null,
    el("td", {}, w.blacklisted ? null : el("button", { class: "btn small danger", type: "button",
      "data-blacklist": w.worker_id, onclick: () => blacklist(w.worker_id, "") }, "Blacklist")),
  )), "no worker is connected");
}

function renderJobs(pool) {
  table("jobs", [["job"], ["state"], ["images", "num"], ["prompt"], ["model"], ["created", "num"]],
    pool.recentJobs.slice(0, 20).map((j) => el("tr", {},
      el("td", { class: "mono", title: j.job_id }, String(j.job_id).slice(0, 12)),
      el("td", {}, stateBadge(j.state)),
      el("td", { class: "num" }, j.n !== undefined ? `${j.succeeded ?? "?"} / ${j.n}` : "–"),
      el("td", { style: "max-width: 260px; overflow: hidden; text-overflow: ellipsis", title: j.prompt || "" }, j.prompt || ""),
      el("td", { class: "mono" }, j.model || "–"),
      el("td", { class: "num" }, fmt.time(j.created_at)))),
    "no job yet");
}

function renderOrchestrators(pool) {
  table("orchestrators", [["orchestrator"], ["lag p50", "num"], ["lag p99", "num"], ["backlog", "num"],
    ["running", "num"], ["intake"]],
    pool.orchestrators.map((o) => el("tr", {},
      el("td", { class: "mono" }, o.id),
      el("td", { class: "num" }, `${fmt.num(o.loop_lag_ms?.p50, 1)} ms`),
      el("td", { class: "num" }, `${fmt.num(o.loop_lag_ms?.p99, 1)} ms`),
      el("td", { class: "num" }, String(o.record_backlog ?? 0)),
      el("td", { class: "num" }, String(o.jobs_running ?? 0)),
      el("td", { title: o.intake_paused_because || "" },
        o.intake_paused ? [stateBadge("paused"), " ", o.intake_paused_because || ""] : el("span", { class: "badge ok" }, "taking jobs")))),
    "no orchestrator answered");
}

function renderBlacklist(pool) {
  table("blacklist", [["worker"], ["reason"], ["since", "num"], [""]],
    pool.blacklist.map((b) => el("tr", { "data-blacklisted": b.worker_id },
      el("td", { class: "mono" }, b.worker_id),
      el("td", {}, b.reason || "–"),
      el("td", { class: "num" }, fmt.time(b.added_at)),
      el("td", {}, el("button", { class: "btn small", type: "button", "data-unblacklist": b.worker_id,
        onclick: () => unblacklist(b.worker_id) }, "Remove")))),
    "no worker is blacklisted");
}

function adminToken() {
  const token = $("admin-token").value.trim();
  if (token) sessionStorage.setItem(ADMIN_KEY, token);
  else sessionStorage.removeItem(ADMIN_KEY);
  return token;
}

function say(message, tone) {
  const box = $("admin-message");
  box.textContent = message;
  box.className = `notice ${tone}`;
  box.hidden = false;
}

async function admin(action, workerId, call) {
  try {
    await call(adminToken());
    say(`${action}: ${workerId}`, "ok");
    await refresh();
  } catch (error) {
    const refused = error.status === 401 || error.status === 403;
    say(refused ? `Refused: ${error.message || "the admin token is required"}` : `Failed: ${error.message}`, "bad");
  }
}

function blacklist(workerId, reason) {
  return admin("Blacklisted", workerId, (token) => api("/v1/blacklist", {
    method: "POST", token, body: { worker_id: workerId, reason: reason || "from the dashboard" } }));
}

function unblacklist(workerId) {
  return admin("Removed from the blacklist", workerId, (token) =>
    api(`/v1/blacklist/${encodeURIComponent(workerId)}`, { method: "DELETE", token }));
}

function stale(why) {
  $("live-dot").classList.add("stale");
  $("updated").textContent = `${why} · last ${lastOk ? fmt.time(lastOk / 1000) : "never"}`;
}

function show(document_) {
  const pool = normalize(document_);
  lastOk = Date.now();
  $("live-dot").classList.remove("stale");
  const missing = Object.keys(pool.errors);
  $("updated").textContent = `live · ${new Date().toLocaleTimeString()}${missing.length ? ` · not answered: ${missing.join(", ")}` : ""}`;
  for (const render of [renderStats, renderChart, renderQueues, renderWorkers, renderJobs, renderOrchestrators, renderBlacklist]) {
    try {
      render(pool);
    } catch (error) {
      console.error(render.name, error); // one odd section must not blank the others
    }
  }
}

/** One GET /v1/pool: shown, or why not. True when it was answered. */
async function refresh() {
  try {
    show(await api("/v1/pool"));
    return true;
  } catch (error) {
    stale(`no answer (${error.message})`);
    if (error.status === 401 && !document.getElementById("access-token")) {
      $("stats").replaceChildren(askForToken(error.message + "."));
    }
    return false;
  }
}

/** Follows the pool's event stream; when it fails, polls until a poll is answered,
 * then follows again. */
function follow() {
  const source = new EventSource(withToken("/v1/pool/events"));
  source.addEventListener("pool", (event) => {
    try {
      show(JSON.parse(event.data));
    } catch (error) {
      console.error("pool event", error);
    }
  });
  source.onerror = async () => {
    source.close(); // EventSource cannot say why (a 401?): a plain GET can
    while (!(await refresh())) await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    follow();
  };
}

setInterval(() => {
  if (Date.now() - lastOk > STALE_MS) stale("no news from the web role");
}, POLL_MS);

$("admin-token").value = sessionStorage.getItem(ADMIN_KEY) || "";
$("admin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const worker = $("blacklist-worker").value.trim();
  if (!worker) return say("Name the worker to blacklist.", "bad");
  blacklist(worker, $("blacklist-reason").value.trim()).then(() => {
    if ($("admin-message").classList.contains("ok")) $("blacklist-worker").value = "";
  });
});
follow();
