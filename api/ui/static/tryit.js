// "Try it": one prompt, answered by the job's base model and by its fine-tuned model side by
// side, each streamed from POST /v1/chat/completions as it is generated.

import { readEventStream } from "./api.js";
import { h, replace } from "./dom.js";

async function answerInto(out, model, messages, temperature, signal) {
  replace(out, "");
  out.classList.remove("error");
  const body = { model, messages, temperature, max_tokens: 256, stream: true };
  try {
    await readEventStream("/v1/chat/completions", (msg) => {
      if (msg.data === "[DONE]") return;
      const chunk = JSON.parse(msg.data);
      if (chunk.error) throw new Error(chunk.error.message || "the answer broke off");
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) out.append(piece);
    }, signal, { json: body });
  } catch (err) {
    if (signal.aborted) return;
    out.classList.add("error");
    replace(out, err.message || String(err));
  }
}

export function tryItPanel(signal) {
  const prompt = h("textarea", { id: "try-prompt", rows: 3, placeholder: "Ask both models the same thing…" });
  const system = h("input", { id: "try-system", type: "text", placeholder: "System message (optional)" });
  const temperature = h("input", { id: "try-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const button = h("button", { id: "try-ask", type: "submit", disabled: true }, "Ask both");
  const note = h("span", { class: "muted", id: "try-note" }, "when the job succeeds");
  const baseName = h("code", {});
  const tunedName = h("code", {});
  const baseOut = h("pre", { class: "answer", id: "try-base" });
  const tunedOut = h("pre", { class: "answer", id: "try-tuned" });
  let models = null;
  let running = null;

  const form = h("form", { class: "try", onsubmit: async (e) => {
    e.preventDefault();
    if (!models || !prompt.value.trim()) return;
    running?.abort();
    running = new AbortController();
    const both = AbortSignal.any([signal, running.signal]);
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value }] : []),
      { role: "user", content: prompt.value }];
    const t = Number(temperature.value) || 0;
    button.disabled = true;
    await Promise.all([answerInto(baseOut, models.base, messages, t, both), answerInto(tunedOut, models.tuned, messages, t, both)]);
    button.disabled = false;
  } }, system, prompt, h("div", { class: "bar" }, h("label", {}, "Temperature ", temperature), button, note));

  const panel = h("div", { class: "panel", id: "try-it" }, h("h2", {}, "Try it"), form,
    h("div", { class: "cols" },
      h("div", {}, h("h3", {}, "Base ", baseName), baseOut),
      h("div", {}, h("h3", {}, "Fine-tuned ", tunedName), tunedOut)));

  // Called with each fresh job object: the panel opens once the job has a fine-tuned model.
  function update(job) {
    if (!job?.fine_tuned_model || models) return;
    models = { base: job.model, tuned: job.fine_tuned_model };
    replace(baseName, models.base);
    replace(tunedName, models.tuned);
    replace(note, "answers stream in as they are generated");
    button.disabled = false;
  }
  return { panel, update };
}
