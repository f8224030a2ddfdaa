// A small SVG line chart: a few series over a shared x axis (training steps), redrawn whole on
// every update; at a few thousand points that is cheaper than keeping a scene graph in sync.

import { fmtNum, s } from "./dom.js";

const PAD = { left: 56, right: 12, top: 26, bottom: 30 };

// About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten).
export function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((v) => v >= raw) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function extent(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  if (lo === Infinity) return [0, 1];
  if (lo === hi) return [lo - (Math.abs(lo) || 1) * 0.1, hi + (Math.abs(hi) || 1) * 0.1];
  const pad = (hi - lo) * 0.05;
  return [lo - pad, hi + pad];
}

// series: [{name, label, cls, points: [[x, y], ...]}]
export function lineChart({ title, series, width = 560, height = 240, xLabel = "step" }) {
  const all = series.flatMap((se) => se.points);
  const [x0, x1] = extent(all.map((p) => p[0]));
  const [y0, y1] = extent(all.map((p) => p[1]));
  const w = width - PAD.left - PAD.right;
  const hgt = height - PAD.top - PAD.bottom;
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * w;
  const sy = (y) => PAD.top + hgt - ((y - y0) / (y1 - y0)) * hgt;

  const svg = s("svg", {
    class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title,
    "data-chart": title,
  });
  svg.append(s("text", { class: "chart-title", x: PAD.left, y: 16 }, title));

  const grid = s("g", { class: "grid" });
  for (const t of ticks(y0, y1, 4)) {
    grid.append(s("line", { x1: PAD.left, x2: PAD.left + w, y1: sy(t), y2: sy(t) }));
    grid.append(s("text", { class: "tick", x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end" }, fmtNum(t, 3)));
  }
  for (const t of ticks(Math.max(x0, 0), x1, 6)) {
    if (t < x0) continue;
    grid.append(s("line", { class: "x", x1: sx(t), x2: sx(t), y1: PAD.top + hgt, y2: PAD.top + hgt + 4 }));
    grid.append(s("text", { class: "tick", x: sx(t), y: PAD.top + hgt + 16, "text-anchor": "middle" }, fmtNum(t, 6)));
  }
  svg.append(grid);
  svg.append(s("rect", { class: "frame", x: PAD.left, y: PAD.top, width: w, height: hgt }));
  svg.append(s("text", { class: "axis-label", x: PAD.left + w, y: height - 2, "text-anchor": "end" }, xLabel));

  let legendX = width - PAD.right;
  for (const se of [...series].reverse()) {
    const label = `${se.label} (${se.points.length})`;
    const text = s("text", { class: `legend ${se.cls}`, x: legendX, y: 16, "text-anchor": "end" }, label);
    svg.append(text);
    legendX -= label.length * 6.5 + 14;
  }

  if (!all.length) {
    svg.append(s("text", { class: "empty", x: PAD.left + w / 2, y: PAD.top + hgt / 2, "text-anchor": "middle" },
      "no points yet"));
  }
  for (const se of series) {
    const pts = se.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
    const g = s("g", { class: `series ${se.cls}`, "data-series": se.name, "data-count": se.points.length });
    g.append(s("polyline", { points: pts }));
    // Dots only where they stay readable; the line alone carries long runs.
    if (se.points.length <= 120) {
      for (const [x, y] of se.points) g.append(s("circle", { class: "pt", cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.2 }));
    }
    svg.append(g);
  }
  return svg;
}
