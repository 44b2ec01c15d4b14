// GET /v1/pool's answer (docs/web.md, "Pool and metrics") in the shape the dashboard
// draws: parts the server could not read come as null and are kept from the last answer.

/** Gone: not heard from lately (the orchestrators' registry lists a worker a while
 * longer). The web role decides, by the protocol's rule (WorkerListing.gone). */
export function isGone(worker) {
  return worker.state === "gone";
}

let previous = { workers: [], recentJobs: [], blacklist: [] };

export function normalize(pool) {
  const all = (pool.workers ?? previous.allWorkers ?? []).map((w) => ({ ...w, worker_id: w.worker_id ?? w.id }));
  all.sort((a, b) => String(a.worker_id).localeCompare(String(b.worker_id)));
  const orchestrators = (pool.orchestrators || []).map((o) => ({ ...o, id: o.id ?? o.orchestrator_id }));
  const rates = pool.rates || {};
  const latency = pool.latency || {};
  const normalized = {
    allWorkers: all,
    workers: all.filter((w) => !isGone(w)),
    gone: all.filter(isGone).length,
    orchestrators,
    queue: pool.queue || [],
    rates,
    latency: {
      queueWaitP50: latency.queue_wait_s?.p50 ?? null,
      queueWaitP95: latency.queue_wait_s?.p95 ?? null,
      generationP50: latency.generation_s?.p50 ?? null,
      generationP95: latency.generation_s?.p95 ?? null,
    },
    windowS: pool.window_s,
    totals: pool.totals || {},
    recentJobs: pool.recent_jobs ?? previous.recentJobs,
    blacklist: pool.blacklist ?? previous.blacklist,
    errors: pool.errors || {},
    queueDepth: (pool.queue || []).reduce((sum, q) => sum + (q.depth || 0), 0),
    jobsRunning: orchestrators.reduce((sum, o) => sum + (o.jobs_running || 0), 0),
  };
  previous = normalized;
  return normalized;
}
