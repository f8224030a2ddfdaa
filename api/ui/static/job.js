// One job: its curves (live), plan beside measured memory, events, checkpoints, artifacts, the
// cancel/pause/resume buttons, and once it succeeded "Try it" (base and fine-tuned answers).
//
// Live updates: the page reads GET …/events?stream=true (server-sent events) through fetch(),
// which can send the Authorization header that EventSource cannot. A server that answers that
// URL with a plain JSON page has no stream, and the page polls the newest page of events instead.
// Either way events are keyed by id, so a replayed backlog or an overlapping poll adds nothing twice.

import { NotAStream, allPages, api, download, readEventStream } from "./api.js";
import { lineChart } from "./chart.js";
import { fmtBytes, fmtDuration, fmtNum, fmtTime, h, replace, statusBadge } from "./dom.js";
import { TERMINAL, methodOf, ownerOf, progressCell, progressOf } from "./jobinfo.js";
import { tryItPanel } from "./tryit.js";

const POLL_MS = 1500;
const JOB_REFRESH_MS = 2000;
const SHOWN_EVENTS = 200;

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
});

function isEvent(obj) {
  return obj && typeof obj === "object" && typeof obj.id === "string" && typeof obj.type === "string" && "message" in obj;
}

export function jobView(root, jobId) {
  const ctl = new AbortController();
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const state = { job: null, events: [], seen: new Set(), checkpoints: [], artifacts: [], live: "connecting" };

  const el = {
    title: h("h1", {}, "Job ", h("code", {}, jobId)),
    status: h("span", { id: "job-status" }),
    actions: h("span", { class: "actions" }),
    message: h("p", { class: "muted", id: "job-message" }),
    summary: h("dl", { class: "summary", id: "job-summary" }),
    memory: h("div", { id: "memory" }),
    live: h("span", { class: "live", id: "live-mode" }),
    lossChart: h("div", { class: "chart-box", id: "loss-chart" }),
    lrChart: h("div", { class: "chart-box", id: "lr-chart" }),
    rewardChart: h("div", { class: "chart-box", id: "reward-chart" }),
    evalChart: h("div", { class: "chart-box", id: "eval-chart", hidden: true }),
    events: h("tbody"),
    checkpoints: h("tbody"),
    artifacts: h("ul", { class: "artifacts", id: "artifacts" }),
  };
  const tryIt = tryItPanel(ctl.signal);
  replace(root, h("section", { class: "job" },
    h("p", {}, h("a", { href: "#/jobs" }, "← all jobs")),
    h("div", { class: "bar" }, el.title, el.status, el.actions),
    el.message,
    h("div", { class: "cols" },
      h("div", { class: "panel" }, h("h2", {}, "Progress"), el.summary),
      h("div", { class: "panel" }, h("h2", {}, "Memory: plan and measured"), el.memory)),
    h("div", { class: "panel" }, h("h2", {}, "Curves ", el.live), h("div", { class: "charts" }, el.lossChart, el.lrChart, el.rewardChart, el.evalChart)),
    tryIt.panel,
    h("div", { class: "cols" },
      h("div", { class: "panel" }, h("h2", {}, "Artifacts"), el.artifacts),
      h("div", { class: "panel" }, h("h2", {}, "Checkpoints"),
        h("table", { class: "grid-table", id: "checkpoints" },
          h("thead", {}, h("tr", {}, ["Step", "Saved", "Train loss", "Valid loss", "Eval", "Name"].map((t) => h("th", {}, t)))),
          el.checkpoints))),
    h("div", { class: "panel" }, h("h2", {}, "Events"),
      h("table", { class: "grid-table events", id: "events" },
        h("thead", {}, h("tr", {}, ["Time", "Level", "Type", "Message"].map((t) => h("th", {}, t)))),
        el.events))));

  // ---- state changes
  function addEvents(list) {
    let added = 0;
    for (const ev of list) {
      if (!isEvent(ev) || state.seen.has(ev.id)) continue;
      state.seen.add(ev.id);
      state.events.push(ev);
      added++;
      if (ev.kind === "checkpoint" || ev.kind === "status") refreshLists();
    }
    if (added) scheduleDraw();
  }

  let drawPending = false;
  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => { drawPending = false; draw(); });
  }

  function setLive(mode) {
    state.live = mode;
    replace(el.live, mode);
    el.live.dataset.mode = mode;
  }

  // ---- drawing
  function curves() {
    const train = new Map();
    const lr = new Map();
    const valid = new Map();
    const scores = new Map(); // eval_<grader> -> Map(step -> score in [0, 1])
    // A preference job's rewards (mean per pair) and the share of pairs ranked right.
    const chosen = new Map();
    const rejected = new Map();
    const margin = new Map();
    const accuracy = new Map();
    // A resumed run may report a step again: the later report wins.
    for (const ev of state.events) {
      const d = ev.data || {};
      if (!Number.isFinite(d.step)) continue;
      if (ev.type === "metrics") {
        if (Number.isFinite(d.train_loss)) train.set(d.step, d.train_loss);
        if (Number.isFinite(d.learning_rate)) lr.set(d.step, d.learning_rate);
        if (Number.isFinite(d.train_chosen_reward)) chosen.set(d.step, d.train_chosen_reward);
        if (Number.isFinite(d.train_rejected_reward)) rejected.set(d.step, d.train_rejected_reward);
        if (Number.isFinite(d.train_reward_margin)) margin.set(d.step, d.train_reward_margin);
        if (Number.isFinite(d.train_preference_accuracy)) accuracy.set(d.step, d.train_preference_accuracy);
      } else if (ev.kind === "validation" && Number.isFinite(d.valid_loss)) {
        valid.set(d.step, d.valid_loss);
      } else if (ev.kind === "eval") {
        for (const [k, v] of Object.entries(evalScores(d))) {
          if (!scores.has(k)) scores.set(k, new Map());
          scores.get(k).set(d.step, v);
        }
      }
    }
    const sorted = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
    return { train: sorted(train), valid: sorted(valid), lr: sorted(lr), chosen: sorted(chosen),
      rejected: sorted(rejected), margin: sorted(margin), accuracy: sorted(accuracy),
      scores: [...scores.entries()].map(([k, m]) => [k, sorted(m)]) };
  }

  // The eval block's scores of an event or a checkpoint's metrics (not its seconds or count).
  function evalScores(d) {
    return Object.fromEntries(Object.entries(d || {}).filter(([k, v]) =>
      k.startsWith("eval_") && k !== "eval_seconds" && k !== "eval_examples" && Number.isFinite(v)));
  }

  function draw() {
    const c = curves();
    replace(el.lossChart, lineChart({ title: "loss", series: [
      { name: "train_loss", label: "train", cls: "s-train", points: c.train },
      { name: "valid_loss", label: "valid", cls: "s-valid", points: c.valid },
    ] }));
    replace(el.lrChart, lineChart({ title: "learning rate", series: [
      { name: "learning_rate", label: "lr", cls: "s-lr", points: c.lr },
    ] }));
    // Only a preference job has rewards: other jobs show no empty chart.
    replace(el.rewardChart, c.margin.length ? lineChart({ title: "rewards (preference)", series: [
      { name: "train_chosen_reward", label: "chosen", cls: "s-train", points: c.chosen },
      { name: "train_rejected_reward", label: "rejected", cls: "s-valid", points: c.rejected },
      { name: "train_reward_margin", label: "margin", cls: "s-lr", points: c.margin },
      { name: "train_preference_accuracy", label: "accuracy", cls: "s-acc", points: c.accuracy },
    ] }) : []);
    el.evalChart.hidden = !c.scores.length;
    if (c.scores.length) {
      replace(el.evalChart, lineChart({ title: "eval scores", series: c.scores.map(([k, points], i) => (
        { name: k, label: k.slice(5), cls: `s-eval${i % 4}`, points })) }));
    }
    const shown = state.events.slice(-SHOWN_EVENTS).reverse();
    replace(el.events, shown.map((ev) => h("tr", { class: `lvl-${ev.level === "error" ? "error" : ev.level === "warn" ? "warning" : "info"}` },
      h("td", {}, fmtTime(ev.created_at)), h("td", {}, ev.level), h("td", {}, ev.kind), h("td", {}, ev.message))));
  }

  // progress.startup: each phase's seconds (queue, launch, import, data, load, ...) and the total.
  function startupText(phases) {
    if (!phases || typeof phases !== "object") return "";
    const parts = Object.entries(phases).filter(([k, v]) => k !== "total" && Number.isFinite(v))
      .map(([k, v]) => `${k.replace(/_/g, " ")} ${v.toFixed(1)} s`);
    return parts.join(", ") + (Number.isFinite(phases.total) ? `; ${phases.total.toFixed(1)} s to the first step` : "");
  }

  // A row whose value is unknown (no MFU on a CPU, no ETA once finished) is left out.
  function row(label, value, id) {
    if (!id && (value === null || value === undefined || value === "")) return [];
    return [h("dt", {}, label), h("dd", id ? { id } : {}, value ?? "")];
  }

  function drawJob() {
    const job = state.job;
    tryIt.update(job);
    if (!job) return;
    const p = progressOf(job);
    replace(el.status, statusBadge(job.status));
    el.status.dataset.status = job.status;
    replace(el.summary,
      row("Model", job.model), row("Method", methodOf(job)), row("Owner", ownerOf(job)),
      row("Progress", progressCell(job), "job-progress"),
      row("Epoch", p.epoch !== undefined ? fmtNum(p.epoch, 3) : ""),
      row("Tokens/s", p.tokens_per_second ? fmtNum(p.tokens_per_second, 4) : ""),
      row("MFU", Number.isFinite(p.mfu) ? `${(p.mfu * 100).toFixed(1)}%` : ""),
      row("ETA", job.status === "running" && p.eta_seconds ? fmtDuration(p.eta_seconds) : ""),
      row("Start-up", startupText(p.startup)),
      row("Created", fmtTime(job.created_at)), row("Started", fmtTime(job.started_at)),
      row("Finished", fmtTime(job.finished_at)),
      row("Trained tokens", job.trained_tokens ?? ""),
      row("Fine-tuned model", job.fine_tuned_model ?? ""));
    replace(el.message, job.error ? `Error: ${job.error.message}` : "");
    el.message.className = job.error ? "error" : "muted";
    drawMemory(job);
    drawActions(job);
  }

  function drawMemory(job) {
    const plan = job.plan || {};
    const progress = job.progress || {};
    const predicted = plan.predicted_peak_gib;
    const measured = plan.measured_peak_gib ?? (progress.peak_memory_bytes ? progress.peak_memory_bytes / 2 ** 30 : null);
    const gpu = plan.gpu_memory_gib;
    const scale = Math.max(gpu || 0, predicted || 0, measured || 0) || 1;
    const bar = (label, gib, cls, id) => h("div", { class: "mem-row" },
      h("span", { class: "mem-label" }, label),
      h("span", { class: "mem-track" }, h("span", { class: `mem-bar ${cls}`, "data-gib": gib ?? "" })),
      h("span", { class: "mem-value", id }, gib === null || gib === undefined ? "—" : `${fmtNum(gib, 3)} GiB`));
    const rows = [
      bar("Predicted peak", predicted, "predicted", "mem-predicted"),
      bar("Measured peak", measured, "measured", "mem-measured"),
    ];
    if (gpu) rows.push(bar("GPU memory", gpu, "gpu", "mem-gpu"));
    const notes = [];
    if (plan.method) notes.push(`Planned as ${plan.method}${plan.batch_size ? `, batch ${plan.batch_size}` : ""}${plan.fits === false ? ": does not fit" : ""}.`);
    if (!measured) notes.push("Measured peak appears once the trainer reports it (GPU memory only; none on a CPU run).");
    for (const n of plan.notes || []) notes.push(n);
    replace(el.memory, rows, notes.map((n) => h("p", { class: "muted" }, n)));
    // Widths through CSSOM, which the page's Content-Security-Policy allows (no inline style attributes).
    for (const b of el.memory.querySelectorAll(".mem-bar")) {
      const gib = parseFloat(b.dataset.gib);
      b.style.width = Number.isFinite(gib) ? `${Math.min(100, (gib / scale) * 100)}%` : "0";
    }
  }

  function drawActions(job) {
    const act = (label, path, enabled) => h("button", {
      type: "button", id: `job-${label.toLowerCase()}`, disabled: !enabled,
      onclick: async (ev) => {
        ev.target.disabled = true;
        try {
          state.job = await api(`${base}/${path}`, { method: "POST" });
          drawJob();
        } catch (err) {
          replace(el.message, `${label} failed: ${err.message}`);
          el.message.className = "error";
        }
      },
    }, label);
    const st = job.status;
    replace(el.actions,
      act("Pause", "pause", st === "queued" || st === "running"),
      act("Resume", "resume", st === "paused"),
      act("Cancel", "cancel", !TERMINAL.has(st) && st !== "cancelling"));
  }

  function drawLists() {
    replace(el.checkpoints, state.checkpoints.map((ck) => h("tr", {},
      h("td", {}, ck.step_number), h("td", {}, fmtTime(ck.created_at)),
      h("td", {}, fmtNum(ck.metrics?.train_loss)), h("td", {}, fmtNum(ck.metrics?.valid_loss)),
      h("td", {}, Object.entries(evalScores(ck.metrics)).map(([k, v]) => `${k.slice(5)} ${fmtNum(v)}`).join(", ")),
      h("td", {}, h("code", {}, ck.fine_tuned_model_checkpoint)))));
    if (!state.artifacts.length) {
      replace(el.artifacts, h("li", { class: "muted" }, TERMINAL.has(state.job?.status) ? "none" : "when the job succeeds"));
      return;
    }
    replace(el.artifacts, state.artifacts.map((a) => {
      const name = a.name.split("/").pop();
      const button = h("button", {
        type: "button", class: "download", "data-artifact": a.name,
        onclick: async () => {
          try { await download(`${base}/artifacts/${encodeURIComponent(a.id)}/content`, name); } catch (err) {
            replace(el.message, `Download of ${a.name} failed: ${err.message}`);
            el.message.className = "error";
          }
        },
      }, "Download");
      return h("li", {}, button, " ", h("code", {}, a.name), h("span", { class: "muted" }, ` ${a.kind}, ${fmtBytes(a.bytes)}`));
    }));
  }

  // ---- loading
  let stream = null; // the AbortController of the open event stream
  async function refreshJob() {
    const before = state.job?.status;
    state.job = await api(base, { signal: ctl.signal });
    drawJob();
    // A stream left open past the end would hold follow() back from its final collection.
    if (TERMINAL.has(state.job.status)) stream?.abort();
    if (before !== state.job.status) await refreshLists();
  }

  let listsBusy = null;
  function refreshLists() {
    listsBusy ??= (async () => {
      try {
        const [cks, arts] = await Promise.all([
          api(`${base}/checkpoints?limit=100`, { signal: ctl.signal }),
          api(`${base}/artifacts`, { signal: ctl.signal }),
        ]);
        state.checkpoints = cks.data;
        state.artifacts = arts.data;
        drawLists();
      } catch (err) {
        if (!ctl.signal.aborted) console.warn("lists", err);
      } finally {
        listsBusy = null;
      }
    })();
    return listsBusy;
  }

  // The newest events down to the first one already seen (pages are newest first).
  async function pollEvents() {
    const fresh = [];
    let after = null;
    for (;;) {
      const page = await api(`${base}/events?limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`, { signal: ctl.signal });
      let reachedKnown = false;
      for (const ev of page.data) {
        if (state.seen.has(ev.id)) { reachedKnown = true; break; }
        fresh.push(ev);
      }
      if (reachedKnown || !page.has_more || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    addEvents(fresh.reverse());
  }

  function onStreamMessage(msg) {
    let obj;
    try { obj = JSON.parse(msg.data); } catch { return; }
    const items = Array.isArray(obj) ? obj : Array.isArray(obj?.data) ? obj.data : [obj];
    addEvents(items.filter(isEvent));
    if (obj && obj.object === "fine_tuning.job" && obj.id === jobId) {
      state.job = obj;
      drawJob();
    }
  }

  async function follow() {
    let streamFailures = 0;
    let polling = false;
    while (!ctl.signal.aborted && !TERMINAL.has(state.job?.status)) {
      if (!polling) {
        try {
          setLive("live: streaming");
          stream = new AbortController();
          // Resume after the newest event held, so a reconnect neither skips nor repeats a span.
          const last = state.events.length ? state.events[state.events.length - 1].id : null;
          const url = `${base}/events?stream=true&limit=100${last ? `&after=${encodeURIComponent(last)}` : ""}`;
          await readEventStream(url, onStreamMessage, AbortSignal.any([ctl.signal, stream.signal]));
          streamFailures = 0;
          await refreshJob(); // the server closes the stream when the job ends
          if (!TERMINAL.has(state.job.status)) await sleep(POLL_MS, ctl.signal); // closed early: reconnect, gently
          continue;
        } catch (err) {
          if (ctl.signal.aborted) return;
          if (stream.signal.aborted) continue; // closed by refreshJob: the job ended
          if (err instanceof NotAStream || ++streamFailures >= 3) polling = true;
          else await sleep(POLL_MS, ctl.signal);
          continue;
        }
      }
      setLive(`live: polling every ${POLL_MS / 1000}s`);
      try { await pollEvents(); } catch (err) { if (!ctl.signal.aborted) console.warn("poll", err); }
      await sleep(POLL_MS, ctl.signal);
    }
    if (ctl.signal.aborted) return;
    // The job ended: collect what was written after the last update, once.
    await pollEvents();
    await refreshLists();
    setLive("finished");
  }

  async function keepJobFresh() {
    while (!ctl.signal.aborted && !TERMINAL.has(state.job?.status)) {
      await sleep(JOB_REFRESH_MS, ctl.signal);
      try { await refreshJob(); } catch (err) { if (!ctl.signal.aborted) console.warn("job", err); }
    }
  }

  (async () => {
    try {
      await refreshJob();
      const history = await allPages(`${base}/events`, { signal: ctl.signal });
      addEvents(history.reverse());
      await refreshLists();
      draw();
      if (TERMINAL.has(state.job.status)) {
        setLive("finished");
        return;
      }
      keepJobFresh();
      await follow();
    } catch (err) {
      if (ctl.signal.aborted) return;
      replace(el.message, `Could not load job ${jobId}: ${err.message}`);
      el.message.className = "error";
    }
  })();

  return { stop() { ctl.abort(); } };
}
