"""Preference objectives: a batch of pairs becomes (loss sum, pairs, pairs ranked right, rewards).

A preference batch holds n pairs as 2n rows, the n preferred outputs first (trainer.data.batch):
one forward runs both. Each row's score is the sum of its output tokens' log-probabilities
(`sequence_logps`); where the loss head is the chunked one (trainer.loss_heads.ChunkedLoss) they
come a chunk of tokens at a time, only at the output's positions (trainer.linear_ce), so no
full-vocabulary logits exist beyond one chunk; otherwise from the model's logits.

- dpo: -log sigmoid(beta * ((log pi_w - log ref_w) - (log pi_l - log ref_l))), the reference
  being the model as training started: for adapter methods the same model with its adapter
  switched off (peft's disable_adapter), or, for a job continued from an earlier adapter
  (spec.init_from), with its adapter's starting weights swapped in; for whole-weight methods a
  frozen copy (`frozen_copy`).
  The rewards are beta * (log pi - log ref).
- simpo: -log sigmoid(beta * (mean log pi_w - mean log pi_l) - gamma), per-token means; rewards
  beta * mean log pi. No reference.
- orpo: the preferred output's token-mean loss plus beta * -log sigmoid(log odds_w - log odds_l),
  odds = p / (1 - p) of the per-token mean probability; rewards beta * mean log pi. No reference.

A pair is ranked right when its preferred output's reward is the higher.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from trainer.data.batch import PAIRS, model_inputs
from trainer.data.tokenize import IGNORE_INDEX
from trainer.linear_ce import linear_token_logprobs
from trainer.loss_heads import ChunkedLoss, LossHead, _plain_head, head_returns_input, labelled_rows
from trainer.spec import JobSpec


def sequence_logps(model: Any, batch: dict[str, torch.Tensor], device: Any, head: torch.nn.Linear | None,
                   chunk: int | None = None, compute_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of each row's labelled tokens' log-probabilities [rows], labelled tokens [rows]), fp32.

    head: the model's plain linear LM head for the chunked path (None: from the full logits)."""
    labels = batch["labels"]
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1).to(device, non_blocking=True)
    if head is None:
        logits = model(**model_inputs(batch, device)).logits[:, :-1]
        targets = labels.to(logits.device, non_blocking=True)[:, 1:]
        mask = targets != IGNORE_INDEX
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return (logp * mask).sum(1), counts
    with head_returns_input(head) as seen:
        model(**model_inputs(batch, device))
    hidden = seen["hidden"]
    rows, targets = labelled_rows(labels, hidden.device)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    token_logp = linear_token_logprobs(picked, head.weight, targets, chunk, compute_dtype)
    owner = torch.div(rows, labels.shape[1], rounding_mode="floor")
    sums = torch.zeros(labels.shape[0], device=token_logp.device, dtype=token_logp.dtype)
    return sums.index_add(0, owner, token_logp), counts


def frozen_copy(model: Any, dtype: torch.dtype | None) -> Any:
    """DPO's reference for a whole-weight method: the starting model, frozen, in the compute dtype."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref.to(dtype)
    ref.requires_grad_(False)
    ref.eval()
    return ref


@contextmanager
def swapped_in(start: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> Iterator[None]:
    """The parameters hold the given starting values inside the block and their own after it,
    in place (same storage, so the optimizer, DDP and fused kernels see the same tensors)."""
    now = [p.detach().clone() for p, _ in start]
    with torch.no_grad():
        for p, value in start:
            p.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _), value in zip(start, now):
                p.copy_(value)


class Reference:
    """Where DPO's reference log-probabilities come from: the trained model with its adapter off
    (`model` is the unwrapped peft model), the trained model with its trainable weights as they
    started (`start`: a continued adapter job, whose starting adapter is not the bare base), or a
    frozen copy."""

    def __init__(self, model: Any, adapter_off: bool, head: torch.nn.Linear | None, chunk: int | None,
                 compute_dtype: torch.dtype | None, start: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None):
        self.model, self.adapter_off, self.start = model, adapter_off, start
        self.head, self.chunk, self.compute_dtype = head, chunk, compute_dtype

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], device: Any) -> torch.Tensor:
        if self.start is not None:
            switch = swapped_in(self.start)
        else:
            switch = self.model.disable_adapter() if self.adapter_off else nullcontext()
        with switch:
            return sequence_logps(self.model, batch, device, self.head, self.chunk, self.compute_dtype)[0]


def reference_for(spec: JobSpec, raw_model: Any, token_head: LossHead, compute_dtype: torch.dtype | None) -> Reference | None:
    """DPO's reference (None for the reference-free objectives): for adapter methods the adapter
    off, or its starting weights where the job continues an earlier adapter (spec.init_from);
    else a frozen copy of the model as it starts (its weights in the compute dtype). Made before
    a resumed run loads its checkpoint, so it is always the model as the job started."""
    if spec.objective != "dpo":
        return None
    chunked = isinstance(token_head, ChunkedLoss)
    if hasattr(raw_model, "disable_adapter") and spec.method not in ("full", "freeze"):
        start = None
        if spec.init_from is not None:  # the reference is the continued adapter, not the bare base
            start = [(p, p.detach().clone()) for p in raw_model.parameters() if p.requires_grad]
        return Reference(raw_model, True, token_head.head if chunked else None, token_head.chunk, compute_dtype, start)
    ref = frozen_copy(raw_model, compute_dtype)
    return Reference(ref, False, _plain_head(ref) if chunked else None, token_head.chunk, compute_dtype)


class PreferenceLoss:
    """The loss head of a preference job (see the module docstring). Called on a batch it answers
    (summed pair losses, pairs, pairs ranked right, [preferred rewards sum, non-preferred rewards sum])."""

    accuracy_name = "preference_accuracy"

    def __init__(self, spec: JobSpec, token_head: LossHead, reference: Reference | None):
        self.objective, self.beta, self.gamma = spec.objective, spec.beta(), spec.gamma()
        self.token_head, self.reference = token_head, reference
        self.chunk = token_head.chunk
        self.name = token_head.name

    def _policy_logps(self, model: Any, batch: dict[str, torch.Tensor], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.token_head
        if isinstance(head, ChunkedLoss):
            return sequence_logps(model, batch, device, head.head, head.chunk, head.compute_dtype)
        return sequence_logps(model, batch, device, None)

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], device: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = int(batch[PAIRS])
        # The reference runs first: swapping starting weights in place after the policy's forward
        # would change tensors its backward has saved.
        ref_logps = self.reference.logps(batch, device) if self.reference is not None else None
        logps, counts = self._policy_logps(model, batch, device)
        if self.objective == "dpo":
            assert ref_logps is not None
            rewards = self.beta * (logps - ref_logps.to(logps.dtype))
            losses = -F.logsigmoid(rewards[:n] - rewards[n:])
        else:
            mean = logps / counts.clamp(min=1)
            rewards = self.beta * mean
            if self.objective == "simpo":
                losses = -F.logsigmoid(rewards[:n] - rewards[n:] - self.gamma)
            else:  # orpo; log odds = log p - log(1 - p), with p the per-token mean probability
                log_odds = mean - torch.log1p(-torch.exp(mean).clamp(max=1 - 1e-6))
                losses = -mean[:n] - self.beta * F.logsigmoid(log_odds[:n] - log_odds[n:])
        detached = rewards.detach()
        chosen, rejected = detached[:n], detached[n:]
        correct = (chosen > rejected).sum()
        return losses.sum(), torch.full((), n, device=losses.device), correct, torch.stack([chosen.sum(), rejected.sum()])

    def for_prepared(self, model: Any) -> PreferenceLoss:
        self.token_head = self.token_head.for_prepared(model)
        self.name = self.token_head.name
        return self
