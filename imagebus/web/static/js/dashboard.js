// The operator dashboard: polls GET /v1/pool every second and redraws in place.
// Admin actions (the blacklist) send the admin token typed here; the server decides.
import { api, el, fmt, stateBadge } from "./api.js";
import { lineChart } from "./chart.js";
import { normalize } from "./pool.js";

const POLL_MS = 1000;
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
  const busy = pool.workers.reduce((sum, w) => sum + (w.slots - w.free_slots || 0), 0);
  const slots = pool.workers.reduce((sum, w) => sum + (w.slots || 0), 0);
  const r = pool.recent;
  $("stats").replaceChildren(
    stat("Workers", String(pool.workers.length), `${busy} / ${slots} slots busy`),
    stat("Waiting", String(pool.queueDepth), "images waiting for a worker"),
    stat("Images/s", fmt.num(r.images_per_s), `jobs/s ${fmt.num(r.jobs_per_s)}`),
    stat("Queue wait", fmt.seconds(r.queue_wait_p50_s), `p95 ${fmt.seconds(r.queue_wait_p95_s)}`),
    stat("Generation", fmt.seconds(r.generation_p50_s), `p95 ${fmt.seconds(r.generation_p95_s)}`),
    stat("Jobs running", String(pool.jobsRunning), `${pool.orchestrators.length} orchestrator${pool.orchestrators.length === 1 ? "" : "s"}`),
  );
}

function renderChart(pool) {
  const r = pool.recent;
  let images = r.images;
  let jobs = r.jobs;
  let span = r.window_s;
  if (!images?.length) {
    const now = Date.now() / 1000;
    history.push({ t: now, images: r.images_per_s || 0, jobs: r.jobs_per_s || 0 });
    while (history.length && history[0].t < now - HISTORY_S) history.shift();
    images = history.map((h) => h.images);
    jobs = history.map((h) => h.jobs);
    span = history.length > 1 ? now - history[0].t : 0;
  } else if (r.bucket_s) {
    images = images.map((count) => count / r.bucket_s);
    jobs = (jobs || []).map((count) => count / r.bucket_s);
  }
  $("chart-window").textContent = span ? `last ${fmt.seconds(span)}` : "";
  lineChart($("chart"), [
    { values: images, color: "var(--accent)" },
    { values: jobs || [], color: "var(--ok)" },
  ], { label: span ? `−${fmt.seconds(span)} … now` : "" });
}

function renderQueues(pool) {
  table("queues", [["model"], ["waiting", "num"], ["wait p50", "num"], ["wait p95", "num"], ["gen p50", "num"], ["gen p95", "num"]],
    pool.models.map((m) => el("tr", {}, el("td", { class: "mono" }, m.model),
      el("td", { class: "num" }, String(m.queue_depth ?? 0)),
      el("td", { class: "num" }, fmt.seconds(m.queue_wait_p50_s)), el("td", { class: "num" }, fmt.seconds(m.queue_wait_p95_s)),
      el("td", { class: "num" }, fmt.seconds(m.generation_p50_s)), el("td", { class: "num" }, fmt.seconds(m.generation_p95_s)))),
    "no model has been asked for yet");
}

function renderWorkers(pool) {
  $("workers-count").textContent = `${pool.workers.length} live`;
  const headers = [["worker"], ["models"], ["device"], ["slots", "num"], ["state"], ["s/image", "num"],
    ["done", "num"], ["failed", "num"], ["last seen", "num"], ["breaker"], ["trust"], [""]];
  table("workers", headers, pool.workers.map((w) => el("tr", { "data-worker": w.worker_id },
    el("td", { class: "mono" }, w.worker_id),
    el("td", {}, (w.models || []).join(", ")),
    el("td", {}, [w.device, w.gpu_name, w.vram_gb ? `${fmt.num(w.vram_gb, 0)} GB` : null].filter(Boolean).join(" · ")),
    el("td", { class: "num" }, `${(w.slots ?? 0) - (w.free_slots ?? 0)} / ${w.slots ?? 0}`),
    el("td", {}, stateBadge(w.blacklisted ? "blacklisted" : w.state)),
    el("td", { class: "num" }, w.seconds_per_image ? fmt.num(w.seconds_per_image) : "–"),
    el("td", { class: "num" }, String(w.tasks_done ?? 0)),
    el("td", { class: "num" }, String(w.failures ?? 0)),
    el("td", { class: "num" }, fmt.ago(w.last_seen_s)),
    el("td", {}, stateBadge(w.breaker || "closed")),
    el("td", {}, w.trust ?? w.trust_level ?? "–"),
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
  table("orchestrators", [["orchestrator"], ["loop lag p50", "num"], ["p99", "num"], ["backlog", "num"],
    ["running", "num"], ["intake"]],
    pool.orchestrators.map((o) => el("tr", {},
      el("td", { class: "mono" }, o.orchestrator_id),
      el("td", { class: "num" }, `${fmt.num(o.loop_lag?.p50_ms, 1)} ms`),
      el("td", { class: "num" }, `${fmt.num(o.loop_lag?.p99_ms, 1)} ms`),
      el("td", { class: "num" }, String(o.records_not_yet_written ?? 0)),
      el("td", { class: "num" }, String(o.jobs_running ?? 0)),
      el("td", { title: o.taking_no_requests_because || "" },
        o.taking_no_requests_because ? [stateBadge("paused"), " ", o.taking_no_requests_because] : stateBadge("ok")))),
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
  return admin("Blacklisted", workerId, (token) => api("/v1/admin/blacklist", {
    method: "POST", token, body: { worker_id: workerId, reason: reason || "from the dashboard" } }));
}

function unblacklist(workerId) {
  return admin("Removed from the blacklist", workerId, (token) =>
    api(`/v1/admin/blacklist/${encodeURIComponent(workerId)}`, { method: "DELETE", token }));
}

async function refresh() {
  let pool;
  try {
    pool = normalize(await api("/v1/pool"));
  } catch (error) {
    $("live-dot").classList.add("stale");
    $("updated").textContent = `no answer (${error.message}) · last ${lastOk ? fmt.time(lastOk / 1000) : "never"}`;
    return;
  }
  lastOk = Date.now();
  $("live-dot").classList.remove("stale");
  $("updated").textContent = `live · ${new Date().toLocaleTimeString()}`;
  for (const render of [renderStats, renderChart, renderQueues, renderWorkers, renderJobs, renderOrchestrators, renderBlacklist]) {
    try {
      render(pool);
    } catch (error) {
      console.error(render.name, error); // one odd section must not blank the others
    }
  }
}

async function loop() {
  for (;;) {
    const started = Date.now();
    await refresh();
    await new Promise((resolve) => setTimeout(resolve, Math.max(100, POLL_MS - (Date.now() - started))));
  }
}

$("admin-token").value = sessionStorage.getItem(ADMIN_KEY) || "";
$("admin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const worker = $("blacklist-worker").value.trim();
  if (!worker) return say("Name the worker to blacklist.", "bad");
  blacklist(worker, $("blacklist-reason").value.trim()).then(() => {
    if ($("admin-message").classList.contains("ok")) $("blacklist-worker").value = "";
  });
});
loop();
