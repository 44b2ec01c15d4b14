// One job on the requester page: a tile per image with its live progress bar, the image
// itself as soon as it is made, and the job's state. Events come over SSE
// (GET /v1/jobs/{id}/events); a slow poll of GET /v1/jobs/{id} covers a dropped stream.
import { api, el, stateBadge, withToken } from "./api.js";

const FINAL_JOB = new Set(["done", "partial", "failed", "cancelled"]);
const FINAL_TASK = new Set(["done", "failed"]);
const POLL_MS = 2000;

export class JobView {
  /** `job`: {id, n, width, height, seeds, images, prompt}; `onChange(job)` on every state change. */
  constructor(job, { grid, stateBox, onChange }) {
    this.job = job;
    this.grid = grid;
    this.stateBox = stateBox;
    this.onChange = onChange;
    this.tiles = [];
    this.closed = false;
    this.render();
  }

  imageUrl(index) {
    return this.job.images?.[index] || `/v1/jobs/${this.job.id}/images/${index}.png`;
  }

  render() {
    const ratio = this.job.width && this.job.height ? `${this.job.width} / ${this.job.height}` : "1";
    this.grid.replaceChildren();
    for (let index = 0; index < this.job.n; index++) {
      const bar = el("div");
      const tile = {
        index,
        state: "queued",
        frame: el("div", { class: "frame", style: `--ratio: ${ratio}` },
          el("span", { class: "placeholder" }, "waiting for a worker…")),
        bar,
        progress: el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "0" }, bar),
        status: el("span", { class: "muted" }, "queued"),
        link: el("a", { class: "btn small", download: `${this.job.id}-${index}.png`, hidden: true }, "Download"),
      };
      const seed = this.job.seeds?.[index];
      this.grid.append(el("figure", { class: "tile", style: "margin:0", "data-index": index },
        tile.frame,
        el("figcaption", { class: "meta" },
          el("div", { class: "line" }, el("strong", {}, `Image ${index + 1}`),
            el("span", { class: "muted mono" }, seed !== undefined ? `seed ${seed}` : "")),
          tile.progress,
          el("div", { class: "line" }, tile.status, tile.link))));
      this.tiles.push(tile);
    }
    this.setState(this.job.state || "queued");
  }

  /** Follows the job live until it ends. */
  follow() {
    if (this.closed) return;
    const source = new EventSource(withToken(`/v1/jobs/${this.job.id}/events`));
    this.source = source;
    const on = (name, handler) => source.addEventListener(name, (e) => handler(parse(e.data)));
    on("assigned", (d) => this.assigned(d));
    on("progress", (d) => this.progress(d.index, d.step, d.steps));
    on("result", (d) => this.result(d));
    on("done", (d) => this.finish(d.state));
    on("message", (d) => this.dispatch(d)); // servers that name events in the data instead
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) this.source = null;
    };
    this.poll();
  }

  dispatch(data) {
    const type = data?.type || data?.event;
    if (type === "assigned") this.assigned(data);
    else if (type === "progress") this.progress(data.index, data.step, data.steps);
    else if (type === "result") this.result(data);
    else if (type === "done") this.finish(data.state);
  }

  async poll() {
    while (!this.closed) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      if (this.closed) return;
      try {
        this.applyStatus(await api(`/v1/jobs/${this.job.id}`));
      } catch (error) {
        if (error.status === 404) this.finish(this.job.state === "queued" ? "expired" : this.job.state);
      }
    }
  }

  /** Applies a GET /v1/jobs/{id} answer (also used to show a past job from the gallery). */
  applyStatus(status) {
    for (const task of status.tasks || []) {
      const tile = this.tiles[task.index];
      if (!tile || FINAL_TASK.has(tile.state)) continue;
      if (task.state === "done") this.result({ index: task.index, ok: true });
      else if (task.state === "failed") this.result({ index: task.index, ok: false, error: task.error, code: task.code });
      else if (task.steps) this.progress(task.index, task.step, task.steps);
      else if (task.state === "running" || task.worker_id) this.assigned(task);
    }
    if (FINAL_JOB.has(status.state)) this.finish(status.state);
    else if (status.state) this.setState(status.state);
  }

  assigned({ index, worker_id: workerId }) {
    const tile = this.tiles[index];
    if (!tile || FINAL_TASK.has(tile.state)) return;
    tile.state = "running";
    tile.status.textContent = workerId ? `on ${workerId}` : "starting";
    tile.frame.replaceChildren(el("span", { class: "placeholder" }, "generating…"));
    if (this.job.state === "queued") this.setState("running");
  }

  progress(index, step, steps) {
    const tile = this.tiles[index];
    if (!tile || FINAL_TASK.has(tile.state) || !steps) return;
    const percent = Math.max(0, Math.min(100, Math.round((100 * step) / steps)));
    const current = Number(tile.progress.getAttribute("aria-valuenow"));
    if (percent < current) return; // a late event after a newer one
    tile.state = "running";
    tile.bar.style.width = `${percent}%`;
    tile.progress.setAttribute("aria-valuenow", String(percent));
    tile.status.textContent = `step ${step} / ${steps}`;
    if (this.job.state === "queued") this.setState("running");
  }

  result({ index, ok, url, error, code, width, height }) {
    const tile = this.tiles[index];
    if (!tile || FINAL_TASK.has(tile.state)) return;
    tile.state = ok ? "done" : "failed";
    tile.cancelled = !ok && (code === "cancelled" || /cancel/i.test(describeError(error)));
    tile.progress.classList.add(ok ? "ok" : "bad");
    tile.bar.style.width = "100%";
    tile.progress.setAttribute("aria-valuenow", "100");
    if (width && height && !this.job.width) {
      this.job.width = width;
      this.job.height = height;
      for (const t of this.tiles) t.frame.style.setProperty("--ratio", `${width} / ${height}`);
    }
    if (ok) {
      const src = withToken(url || this.imageUrl(index));
      const img = el("img", { src, alt: `image ${index + 1}: ${this.job.prompt || ""}`, loading: "lazy",
        onerror: () => tile.frame.replaceChildren(el("span", { class: "placeholder" }, "no longer on the server")) });
      if ((this.job.width || 512) < 256) img.classList.add("pixelated");
      tile.frame.replaceChildren(el("a", { href: src, target: "_blank", rel: "noopener", title: "open full size" }, img));
      tile.status.replaceChildren(stateBadge("done"));
      tile.link.href = src;
      tile.link.hidden = false;
      if (this.job.images) this.job.images[index] = url || this.imageUrl(index);
    } else {
      tile.frame.replaceChildren(el("span", { class: "placeholder" }, "no image"));
      tile.status.replaceChildren(stateBadge("failed"), " ", describeError(error));
    }
    this.onChange?.(this.job);
    // Every image has its outcome: the job is over, whether or not its "done" has come.
    if (this.tiles.every((t) => FINAL_TASK.has(t.state))) this.finish(this.derivedState());
  }

  derivedState() {
    const made = this.tiles.filter((t) => t.state === "done").length;
    if (made === this.tiles.length) return "done";
    if (made) return "partial";
    return this.tiles.every((t) => t.cancelled) ? "cancelled" : "failed";
  }

  setState(state) {
    this.job.state = state;
    this.stateBox.replaceChildren(stateBadge(state));
    this.onChange?.(this.job);
  }

  finish(state) {
    if (this.closed) return;
    this.closed = true;
    this.source?.close();
    for (const tile of this.tiles) {
      if (!FINAL_TASK.has(tile.state)) {
        tile.state = "failed";
        tile.progress.classList.add("bad");
        tile.status.replaceChildren(stateBadge(state === "cancelled" ? "cancelled" : "failed"));
        tile.frame.replaceChildren(el("span", { class: "placeholder" }, "no image"));
      }
    }
    this.setState(state || "done");
  }

  close() {
    this.closed = true;
    this.source?.close();
  }

  get running() {
    return !this.closed;
  }
}

function parse(data) {
  try {
    return JSON.parse(data);
  } catch {
    return {};
  }
}

function describeError(error) {
  if (!error) return "";
  if (typeof error === "string") return error;
  return error.message || error.code || JSON.stringify(error);
}
