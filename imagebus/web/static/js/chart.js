// A small line chart in inline SVG (no library): a few series over the same buckets.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 160;
const PAD = { left: 36, right: 8, top: 10, bottom: 18 };

function svg(tag, attrs) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

/** Draws `series` ([{values: number[], color}]) into `container`; `label` names the x span. */
export function lineChart(container, series, { label = "" } = {}) {
  const length = Math.max(2, ...series.map((s) => s.values.length));
  const peak = Math.max(0.001, ...series.flatMap((s) => s.values));
  const top = niceCeiling(peak);
  const x = (i) => PAD.left + (i * (WIDTH - PAD.left - PAD.right)) / (length - 1);
  const y = (v) => HEIGHT - PAD.bottom - (v / top) * (HEIGHT - PAD.top - PAD.bottom);
  const root = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: "none", role: "img",
    "aria-label": "images and jobs per second" });
  for (const fraction of [0, 0.5, 1]) {
    const value = top * fraction;
    root.append(svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value),
      stroke: "var(--border)", "stroke-width": 1 }));
    const text = svg("text", { x: PAD.left - 6, y: y(value) + 4, "text-anchor": "end", "font-size": 11, fill: "var(--muted)" });
    text.textContent = formatTick(value);
    root.append(text);
  }
  const caption = svg("text", { x: WIDTH - PAD.right, y: HEIGHT - 4, "text-anchor": "end", "font-size": 11, fill: "var(--muted)" });
  caption.textContent = label;
  root.append(caption);
  for (const { values, color } of series) {
    if (!values.length) continue;
    const offset = length - values.length; // right-aligned: the newest bucket at the edge
    const points = values.map((v, i) => `${x(i + offset).toFixed(1)},${y(v).toFixed(1)}`);
    const area = `M${x(offset)},${y(0)} L${points.join(" L")} L${x(length - 1)},${y(0)} Z`;
    root.append(svg("path", { d: area, fill: color, opacity: 0.12 }));
    root.append(svg("polyline", { points: points.join(" "), fill: "none", stroke: color, "stroke-width": 2,
      "vector-effect": "non-scaling-stroke", "stroke-linejoin": "round" }));
  }
  container.replaceChildren(root);
}

function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function formatTick(value) {
  if (value === 0) return "0";
  return value >= 10 ? value.toFixed(0) : value >= 1 ? value.toFixed(1) : value.toFixed(2);
}
