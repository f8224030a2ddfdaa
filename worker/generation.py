"""One chat completion: the prompt as training rendered it, generated token by token, its text
handed to a Reply as it grows (core/inference.py describes the entries)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from core.inference import ChatRequest
from trainer.answers import decoding_options
from trainer.data.tokenize import chat_prompt_ids


class Sink(Protocol):
    def send(self, kind: str, **data: Any) -> None: ...
    def error(self, status: int, message: str, param: str | None = None, code: str = ...) -> None: ...
    def cancelled(self) -> bool: ...


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of text that may be the start of a stop sequence: not sent yet."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                longest = max(longest, k)
                break
    return longest


class _Deltas(BaseStreamer, StoppingCriteria):
    """Receives each new token from generate(); sends the text that is final so far, and stops
    generation at a stop sequence or when the caller is gone."""

    def __init__(self, tokenizer: Any, stops: list[str], sink: Sink):
        self.tokenizer = tokenizer
        self.stops = stops
        self.sink = sink
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already sent
        self.prompt_seen = False
        self.stopped_at: int | None = None  # where a stop sequence began

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        if self.stopped_at is not None:
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        for s in self.stops:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0 and (self.stopped_at is None or at < self.stopped_at):
                self.stopped_at = at
        end = self.stopped_at if self.stopped_at is not None else len(text) - _held_back(text, self.stops)
        self._send(text, end)

    def end(self) -> None:
        if self.stopped_at is None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            self._send(text, len(text))

    def _send(self, text: str, end: int) -> None:
        if end > self.sent:
            self.sink.send("delta", content=text[self.sent:end])
            self.sent = end

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        stop = self.stopped_at is not None or self.sink.cancelled()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def generate(model: Any, tokenizer: Any, req: ChatRequest, sink: Sink) -> None:
    ids = chat_prompt_ids(tokenizer, req.messages)
    context = req.target.context or getattr(getattr(model, "config", None), "max_position_embeddings", None)
    # The API checks this where it can read the base's files; a hub model is checked here.
    if context is not None and len(ids) >= context:
        sink.error(400, f"messages: the prompt has {len(ids)} tokens; model {req.target.model} reads at most {context}",
                   "messages", "context_length_exceeded")
        return
    max_new = req.max_tokens if context is None else min(req.max_tokens, context - len(ids))
    sink.send("start", prompt_tokens=len(ids))
    device = next(model.parameters()).device
    deltas = _Deltas(tokenizer, req.stop, sink)
    if req.temperature > 0 and req.seed is not None:
        torch.manual_seed(req.seed)
    out = model.generate(
        input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=max_new, streamer=deltas, stopping_criteria=StoppingCriteriaList([deltas]),
        **decoding_options(tokenizer, req.temperature, req.top_p),
    )
    new = out[0, len(ids):].tolist()
    if deltas.stopped_at is not None or (new and new[-1] == tokenizer.eos_token_id):
        reason = "stop"
    else:
        reason = "length"
    if sink.cancelled():
        return  # nobody reads the end
    sink.send("end", finish_reason=reason, prompt_tokens=len(ids), completion_tokens=len(new))
