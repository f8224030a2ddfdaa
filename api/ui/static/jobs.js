// The jobs table, refreshed every few seconds while it is on screen.

import { api } from "./api.js";
import { fmtTime, h, replace, statusBadge } from "./dom.js";
import { methodOf, ownerOf, progressCell } from "./jobinfo.js";

const REFRESH_MS = 3000;

export function jobsView(root) {
  let timer = null;
  let stopped = false;
  const note = h("p", { class: "muted", id: "jobs-note" }, "Loading…");
  const body = h("tbody");
  const table = h("table", { class: "grid-table", id: "jobs-table" },
    h("thead", {}, h("tr", {}, ["Job", "Status", "Owner", "Method", "Model", "Progress", "Created"].map((t) => h("th", {}, t)))),
    body);
  replace(root, h("section", {},
    h("div", { class: "bar" }, h("h1", {}, "Jobs"), h("a", { class: "button", href: "#/new" }, "New job")),
    table, note));

  async function refresh() {
    try {
      const page = await api("/v1/fine_tuning/jobs?limit=50");
      replace(body, page.data.map((job) => h("tr", { "data-job": job.id },
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
        h("td", {}, statusBadge(job.status)),
        h("td", {}, ownerOf(job)),
        h("td", {}, methodOf(job)),
        h("td", {}, job.model),
        h("td", {}, progressCell(job)),
        h("td", {}, fmtTime(job.created_at)))));
      replace(note, page.data.length ? `Updated ${new Date().toLocaleTimeString()}; refreshes every ${REFRESH_MS / 1000}s.`
        : "No jobs yet. Start one with New job.");
      note.className = "muted";
    } catch (err) {
      replace(note, `Could not load jobs: ${err.message}`);
      note.className = "error";
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
  return { stop() { stopped = true; clearTimeout(timer); } };
}
