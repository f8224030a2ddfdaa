"""How a micro-batch becomes (summed token loss, label tokens, correctly predicted label tokens).

`PlainLoss` asks the model for its logits and takes the cross-entropy of their fp32 copy: simple,
works for any causal LM, and holds tokens x vocabulary logits several times over.
`ChunkedLoss` asks the model for the LM head's *input* instead (the head answers its input back
for the length of the forward call) and runs the head and the loss a chunk of tokens at a time
(trainer.linear_ce), only over positions that have a label.

`build_loss` picks the chunked one only where it gives the same numbers: it checks, with one short
forward, that the model's logits are exactly its output embedding applied to that embedding's
input. A model that scales or soft-caps its logits after the head, or has no plain linear head,
keeps the plain loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from trainer.eval_mode import evaluation
from trainer.data.batch import model_inputs
from trainer.data.tokenize import IGNORE_INDEX
from trainer.linear_ce import chunk_tokens, linear_cross_entropy


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses, number of label tokens); position t predicts token t+1."""
    logits = logits[:, :-1, :].float()
    # The whole (contiguous, pinned) labels cross without blocking; a slice would be staged first.
    targets = labels.to(logits.device, non_blocking=True)[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (targets != IGNORE_INDEX).sum()


def correct_tokens(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels.to(logits.device, non_blocking=True)[:, 1:]
    return ((logits[:, :-1, :].argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()


class PlainLoss:
    name = "plain"
    chunk = None

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = model(**model_inputs(batch, device)).logits
        loss, n = token_loss_sum(logits, batch["labels"])
        with torch.no_grad():
            correct = correct_tokens(logits, batch["labels"])
        return loss, n, correct

    def for_prepared(self, model: Any) -> PlainLoss:
        return self


@contextmanager
def head_returns_input(head: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """For the duration, `head(h)` is `h`, and h is also recorded in the yielded dict ("hidden").

    The recorded tensor is the one to use: accelerate's mixed precision converts the model's
    outputs to fp32, which would turn bf16 hidden states into an fp32 copy twice their size.
    """
    seen: dict[str, torch.Tensor] = {}

    def record(hidden: torch.Tensor) -> torch.Tensor:
        seen["hidden"] = hidden
        return hidden

    # An instance attribute shadows the class's forward; a wrapper someone installed the same way
    # (accelerate's hooks do) is put back afterwards.
    before = head.__dict__.get("forward")
    head.forward = record
    try:
        yield seen
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before


def labelled_rows(labels: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the flattened [batch * seq] hidden states that predict a label, those labels), on
    `device`, in row-major order (that of boolean-mask indexing).

    Position t predicts token t+1. Selecting by a boolean mask on the GPU would make the host wait
    for the mask to learn how many rows there are; the labels are data, so the rows are found on
    the host (where the batch is built) and cross without blocking.
    """
    seq = labels.shape[1]
    targets = labels[:, 1:]
    b, t = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    rows, picked = b * seq + t, targets[b, t]
    if rows.device.type == "cpu" and torch.device(device).type == "cuda":
        rows, picked = rows.pin_memory(), picked.pin_memory()
    return rows.to(device, non_blocking=True), picked.to(device, non_blocking=True)


class ChunkedLoss:
    name = "chunked"

    def __init__(self, head: torch.nn.Linear, chunk: int | None = None, compute_dtype: torch.dtype | None = None):
        self.head = head
        self.chunk = chunk or chunk_tokens(head.weight.shape[0])
        # The model's own head runs inside the autocast region of its forward; this one runs after
        # it, so it is told the dtype (else fp32 master weights would make it an fp32 matmul).
        self.compute_dtype = compute_dtype

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with head_returns_input(self.head) as seen:
            model(**model_inputs(batch, device))  # its fp32-converted output is dropped at once
        hidden = seen["hidden"]
        rows, targets = labelled_rows(batch["labels"], hidden.device)
        # Only positions with a label pay for the head: prompts and padding cost nothing here.
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        loss, correct = linear_cross_entropy(picked, self.head.weight, targets, self.chunk, self.compute_dtype)
        return loss, torch.full((), rows.shape[0], device=hidden.device, dtype=torch.long), correct

    def for_prepared(self, model: Any) -> PlainLoss | ChunkedLoss:
        """The loss for the model as accelerate wrapped it: a sharded (FSDP) head's weight is not
        whole outside its own forward, so a sharded model keeps the plain loss."""
        wrapped = any("FullyShardedDataParallel" in type(m).__name__ or type(m).__name__.startswith("FSDP")
                      for m in model.modules())
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())  # FSDP2
        return PlainLoss() if wrapped or sharded else self


LossHead = PlainLoss | ChunkedLoss


def _plain_head(model: Any) -> torch.nn.Linear | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if not head.weight.is_floating_point() or head.weight.ndim != 2:
        return None
    return head


@torch.no_grad()
def _logits_are_head_output(model: Any, head: torch.nn.Linear, device: Any) -> bool:
    seen: dict[str, torch.Tensor] = {}

    def record(_module: Any, args: tuple, output: torch.Tensor) -> None:
        seen["input"], seen["output"] = args[0], output

    handle = head.register_forward_hook(record)
    try:
        with evaluation(model):
            ids = torch.arange(1, 9, device=device).remainder(head.weight.shape[0])[None]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        handle.remove()
    if "output" not in seen or seen["input"].shape[:-1] != logits.shape[:-1]:
        return False
    return seen["output"].shape == logits.shape and torch.equal(seen["output"].to(logits.dtype), logits)


def build_loss(
    model: Any, device: Any, chunked: bool = True, compute_dtype: torch.dtype | None = None
) -> PlainLoss | ChunkedLoss:
    """The chunked loss where the model's logits are provably its linear head's output, else plain.

    compute_dtype: the head matmul's dtype, that of the mixed precision the model runs under
    (None: the hidden states' dtype)."""
    if not chunked:
        return PlainLoss()
    head = _plain_head(model)
    if head is None:
        return PlainLoss()
    try:
        same = _logits_are_head_output(model, head, device)
    except Exception:  # noqa: BLE001 - a model the probe cannot drive keeps the path that always works
        same = False
    return ChunkedLoss(head, compute_dtype=compute_dtype) if same else PlainLoss()
