// Reading a job object: what the table and the job page both show.

import { fmtDuration, h } from "./dom.js";

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function methodOf(job) {
  const m = job.method;
  if (!m) return "";
  if (typeof m === "string") return m;
  // {type: "supervised" or a preference objective, <type>: {method: "lora", lora: {...}, ...}}
  const body = m[m.type] || {};
  const name = typeof body.method === "string" ? body.method : m.type || "";
  const label = (body.lora || {}).use_dora ? `${name} (dora)` : name;
  return m.type === "supervised" ? label : `${m.type} (${label})`;
}

// The owner's name when the API gives one, else the owner's user id.
export function ownerOf(job) {
  return job.user || job.owner || job.owner_name || job.organization_id || "";
}

// progress: {step, total_steps, epoch, eta_seconds, tokens_per_second, peak_memory_bytes, mfu,
// queue_position}; any of them may be missing (older servers, a job not started yet).
export function progressOf(job) {
  const p = job.progress || {};
  let step = Number.isFinite(p.step) ? p.step : null;
  const total = Number.isFinite(p.total_steps) ? p.total_steps : null;
  if (job.status === "succeeded" && total) step = total;
  return { ...p, step, total };
}

export function progressCell(job) {
  const p = progressOf(job);
  const parts = [];
  if (p.total) {
    parts.push(h("progress", { max: p.total, value: p.step || 0 }));
    parts.push(h("span", { class: "steps" }, `${p.step ?? 0}/${p.total}`));
  } else if (job.status === "running") {
    parts.push(h("span", { class: "muted" }, "starting"));
  }
  if (job.status === "queued" && p.queue_position) parts.push(h("span", { class: "muted" }, `#${p.queue_position} in queue`));
  if (job.status === "running" && p.eta_seconds) parts.push(h("span", { class: "muted" }, `ETA ${fmtDuration(p.eta_seconds)}`));
  return h("span", { class: "progress-cell" }, parts);
}
