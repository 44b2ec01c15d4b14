// GET /v1/pool's answer in the one shape the dashboard draws. The web role merges the
// orchestrators' snapshots; this only flattens nesting and fills what is absent.

const list = (value) => (Array.isArray(value) ? value : value && typeof value === "object" ? Object.values(value) : []);

function worker(entry) {
  const flat = { ...(entry.advert || {}), ...entry };
  delete flat.advert;
  return flat;
}

function orchestrator(entry) {
  return { ...(entry.stats || {}), ...entry };
}

function model(entry, name) {
  if (typeof entry === "number") return { model: name, queue_depth: entry };
  const quantiles = (h) => (h && typeof h === "object" ? h : {});
  return {
    ...entry,
    model: entry.model ?? name,
    queue_wait_p50_s: entry.queue_wait_p50_s ?? quantiles(entry.queue_wait).p50_s,
    queue_wait_p95_s: entry.queue_wait_p95_s ?? quantiles(entry.queue_wait).p95_s,
    generation_p50_s: entry.generation_p50_s ?? quantiles(entry.generation).p50_s,
    generation_p95_s: entry.generation_p95_s ?? quantiles(entry.generation).p95_s,
  };
}

export function normalize(pool) {
  const orchestrators = list(pool.orchestrators).map(orchestrator);
  const models = Array.isArray(pool.models) ? pool.models.map((m) => model(m))
    : Object.entries(pool.models || pool.queues || {}).map(([name, m]) => model(m, name));
  const recent = pool.recent || pool.rates || orchestrators[0]?.recent || {};
  const blacklist = list(pool.blacklist?.entries ?? pool.blacklist);
  const workers = list(pool.workers).map(worker).sort((a, b) => String(a.worker_id).localeCompare(String(b.worker_id)));
  return {
    workers,
    orchestrators,
    models,
    recent,
    recentJobs: list(pool.recent_jobs ?? pool.jobs),
    blacklist,
    queueDepth: pool.queue_depth ?? models.reduce((sum, m) => sum + (m.queue_depth || 0), 0),
    jobsRunning: pool.jobs_running ?? orchestrators.reduce((sum, o) => sum + (o.jobs_running || 0), 0),
  };
}
