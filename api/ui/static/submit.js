// A new job from the browser: upload the file(s), read their validation report, pick a model
// and method, optionally plan, submit, then go to the job's page.

import { api } from "./api.js";
import { fmtBytes, fmtDuration, fmtNum, h, replace } from "./dom.js";

const METHODS = ["lora", "qlora", "full", "ia3", "prefix", "freeze", "auto"];
const WITH_RANK = new Set(["lora", "qlora"]);
const SHOWN_PROBLEMS = 20;

function field(label, input, hint) {
  return h("label", { class: "field" }, h("span", {}, label), input, hint ? h("small", { class: "muted" }, hint) : null);
}

function numberInput(id, value, attrs = {}) {
  return h("input", { id, name: id, type: "text", inputmode: "decimal", value, ...attrs });
}

function reportView(file) {
  const v = file.validation || {};
  const ok = file.status === "processed";
  const facts = [
    `${file.filename} (${fmtBytes(file.bytes)})`,
    v.format ? `format ${v.format}` : null,
    Number.isFinite(v.examples) ? `${v.examples} examples` : null,
    Number.isFinite(v.tokens) ? `${v.tokens} tokens` : null,
  ].filter(Boolean).join(", ");
  const problems = (v.errors || []).slice(0, SHOWN_PROBLEMS);
  return h("div", { class: `report ${ok ? "ok" : "bad"}`, "data-file-id": file.id, "data-status": file.status },
    h("p", {}, h("strong", {}, ok ? "Valid: " : "Invalid: "), facts, " ", h("code", {}, file.id)),
    ok ? null : h("p", {}, file.status_details || "the file is not a valid fine-tuning file"),
    problems.length ? h("table", { class: "grid-table problems" },
      h("thead", {}, h("tr", {}, h("th", {}, "Line"), h("th", {}, "Problem"), h("th", {}, "Message"))),
      h("tbody", {}, problems.map((e) => h("tr", {}, h("td", {}, e.line), h("td", {}, e.code), h("td", {}, e.message))))) : null);
}

export function submitView(root) {
  const uploads = { training: null, validation: null }; // promises of file objects
  const el = {
    train: h("input", { id: "train-file", type: "file", accept: ".jsonl,.json,application/jsonl" }),
    valid: h("input", { id: "valid-file", type: "file", accept: ".jsonl,.json,application/jsonl" }),
    trainReport: h("div", { id: "train-report" }),
    validReport: h("div", { id: "valid-report" }),
    model: h("select", { id: "model", name: "model" }, h("option", { value: "" }, "loading…")),
    method: h("select", { id: "method", name: "method" }, METHODS.map((m) => h("option", { value: m }, m))),
    rank: numberInput("lora-r", "8"),
    alpha: numberInput("lora-alpha", "16"),
    epochs: numberInput("n-epochs", "3"),
    batch: numberInput("batch-size", "8", { placeholder: "auto" }),
    lr: numberInput("learning-rate", "", { placeholder: "method default" }),
    maxSteps: numberInput("max-steps", "", { placeholder: "from epochs" }),
    evalEvery: numberInput("eval-every", "", { placeholder: "at the end" }),
    ckptEvery: numberInput("checkpoint-every", "", { placeholder: "at the end" }),
    suffix: h("input", { id: "suffix", type: "text", maxlength: "64" }),
    error: h("p", { class: "error", id: "form-error", role: "alert" }),
    plan: h("div", { id: "plan-result" }),
    submit: h("button", { type: "submit", id: "submit-job", disabled: true }, "Start training"),
    planBtn: h("button", { type: "button", id: "plan-job", disabled: true }, "Plan"),
  };
  const rankFields = h("div", { class: "row" }, field("LoRA rank r", el.rank), field("LoRA alpha", el.alpha));

  const form = h("form", { id: "job-form", class: "job-form", novalidate: true },
    h("fieldset", {}, h("legend", {}, "Data"),
      field("Training file (JSONL)", el.train, "Checked line by line on upload."), el.trainReport,
      field("Validation file (optional)", el.valid), el.validReport),
    h("fieldset", {}, h("legend", {}, "Model and method"),
      h("div", { class: "row" }, field("Base model", el.model), field("Method", el.method)), rankFields),
    h("fieldset", {}, h("legend", {}, "Hyperparameters"),
      h("div", { class: "row" }, field("Epochs", el.epochs), field("Batch size", el.batch, "a number or auto"),
        field("Learning rate", el.lr), field("Max steps", el.maxSteps)),
      h("div", { class: "row" }, field("Validate every N steps", el.evalEvery), field("Checkpoint every N steps", el.ckptEvery),
        field("Suffix", el.suffix))),
    el.error,
    h("div", { class: "bar" }, el.planBtn, el.submit),
    el.plan);
  replace(root, h("section", {}, h("h1", {}, "New fine-tuning job"), form));

  function showError(text) { replace(el.error, text || ""); }

  function refreshButtons() {
    const ready = uploads.training !== null && el.model.value;
    el.submit.disabled = !ready;
    el.planBtn.disabled = !ready;
  }

  function upload(input, slot, reportEl) {
    input.addEventListener("change", () => {
      const file = input.files[0];
      replace(reportEl);
      if (!file) { uploads[slot] = null; refreshButtons(); return; }
      replace(reportEl, h("p", { class: "muted" }, `Uploading and checking ${file.name}…`));
      const form = new FormData();
      form.append("purpose", "fine-tune");
      form.append("file", file, file.name);
      const pending = api("/v1/files", { method: "POST", form });
      uploads[slot] = pending;
      pending.then((f) => { if (uploads[slot] === pending) replace(reportEl, reportView(f)); },
        (err) => { if (uploads[slot] === pending) { uploads[slot] = null; replace(reportEl, h("p", { class: "error" }, `Upload failed: ${err.message}`)); refreshButtons(); } });
      refreshButtons();
    });
  }
  upload(el.train, "training", el.trainReport);
  upload(el.valid, "validation", el.validReport);

  el.method.addEventListener("change", () => { rankFields.hidden = !WITH_RANK.has(el.method.value); });
  el.model.addEventListener("change", refreshButtons);

  api("/v1/models").then((page) => {
    replace(el.model, page.data.length ? page.data.map((m) => h("option", { value: m.id }, m.id))
      : h("option", { value: "" }, "no base models (see TUNEQ_MODEL_ROOTS)"));
    refreshButtons();
  }, (err) => showError(`Could not list models: ${err.message}`));

  // A text box's number, or undefined when empty; a typo is named instead of being sent as NaN.
  function num(input, label, { integer = false, allowAuto = false } = {}) {
    const raw = input.value.trim();
    if (!raw) return undefined;
    if (allowAuto && raw === "auto") return "auto";
    const n = Number(raw);
    if (!Number.isFinite(n) || (integer && !Number.isInteger(n))) throw new Error(`${label}: ${JSON.stringify(raw)} is not ${integer ? "a whole number" : "a number"}`);
    return n;
  }

  async function body() {
    const training = await uploads.training;
    const validation = uploads.validation ? await uploads.validation : null;
    if (training.status !== "processed") throw new Error("training_file: the uploaded file failed validation; fix it and upload it again");
    if (validation && validation.status !== "processed") throw new Error("validation_file: the uploaded file failed validation");
    const method = el.method.value;
    const hp = {
      n_epochs: num(el.epochs, "epochs", { integer: true }),
      batch_size: num(el.batch, "batch size", { integer: true, allowAuto: true }),
      learning_rate: num(el.lr, "learning rate"),
      max_steps: num(el.maxSteps, "max steps", { integer: true }),
    };
    const schedule = {
      eval_every_steps: num(el.evalEvery, "validate every", { integer: true }),
      checkpoint_every_steps: num(el.ckptEvery, "checkpoint every", { integer: true }),
    };
    const clean = (o) => Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
    const methodBody = WITH_RANK.has(method)
      ? { type: method, [method]: clean({ r: num(el.rank, "LoRA rank", { integer: true }), alpha: num(el.alpha, "LoRA alpha") }) }
      : method;
    const out = { model: el.model.value, training_file: training.id, method: methodBody, hyperparameters: clean(hp) };
    if (validation) out.validation_file = validation.id;
    if (Object.keys(clean(schedule)).length) out.schedule = clean(schedule);
    if (el.suffix.value.trim()) out.suffix = el.suffix.value.trim();
    return out;
  }

  el.planBtn.addEventListener("click", async () => {
    showError("");
    replace(el.plan, h("p", { class: "muted" }, "Planning…"));
    try {
      const plan = await api("/v1/fine_tuning/plan", { method: "POST", json: await body() });
      const rec = plan.recommendation || {};
      const p = plan.plan || {};
      replace(el.plan, h("div", { class: "panel" },
        h("p", {}, h("strong", {}, "Plan: "), rec.message || ""),
        h("p", {}, `Method ${rec.method ?? "?"}, batch ${rec.batch_size ?? "?"}, predicted peak `
          + `${fmtNum(p.predicted_peak_gib, 3) || "?"} GiB of ${fmtNum(p.available_gib, 3) || "?"} GiB per GPU`
          + (Number.isFinite(plan.time?.seconds) ? `, training time about ${fmtDuration(plan.time.seconds)}` : "")),
        (rec.suggestions || []).map((s) => h("p", { class: "muted" }, typeof s === "string" ? s : JSON.stringify(s)))));
    } catch (err) {
      replace(el.plan);
      showError(err.message);
    }
  });

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError("");
    el.submit.disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: await body() });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      showError(err.message);
      refreshButtons();
    }
  });

  return { stop() {} };
}
