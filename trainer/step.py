"""One optimizer step: accumulate the micro-batches' gradients, clip, step, and the step's values.

Loss normalisation. A step's loss is the mean over every trained (label) token of all its
micro-batches on all ranks: sum of token losses / total label tokens of the window. Averaging
per-micro-batch means instead would weight a token in a short example more than one in a long
example, and make the result depend on how a batch happens to be split. The window's token count
is known before its forward passes (labels are data): one process scales each micro-batch's summed
loss by 1 / total_tokens before backward. Several processes back-propagate the summed losses and
multiply the averaged gradients by world_size / total_tokens once the step's single all-reduce
(counts, loss sums, pause and checkpoint votes together) has told them total_tokens.

Packing changes none of this: a packed row's label tokens are its examples' label tokens, and
the attention never crosses an example boundary, so a step's loss is the same token mean.

Nothing here reads a device value: a step is queued, and its values are read one step later
(trainer.step_values), so the host never waits for the GPU in the middle of training.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from trainer.data.batch import PAIRS
from trainer.data.tokenize import IGNORE_INDEX
from trainer.distributed import scale_gradients, sum_over_ranks
from trainer.lora_fused import weights_stepped
from trainer.loss_heads import LossHead, PlainLoss
from trainer.optim_in_backward import OptimizerInBackward
from trainer.profiling import region
from trainer.step_values import LateRead
from trainer.vocabulary import PREFERENCE_TRAIN_METRICS


@dataclass
class QueuedStep:
    """A step whose work is queued on the device; its values are read one step later."""

    step: int
    micro_step: int
    lr: float
    values: LateRead  # STEP_VALUES, the votes, then the gradient norm


def as_values(norm: Any, device: torch.device) -> torch.Tensor:
    """The gradient norm as one float64 element to append to a step's values, on `device`.
    FSDP's norm is a DTensor; its full value is what float() used to read (the same collective)."""
    if not isinstance(norm, torch.Tensor):
        return torch.tensor([float(norm)], dtype=torch.float64, device=device)
    full = getattr(norm, "full_tensor", None)
    if callable(full):
        norm = full()
    # Without gradients torch answers a CPU zero; the norm of real gradients is already there.
    return norm.detach().reshape(1).to(device=device, dtype=torch.float64)


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def loss_units(batch: dict[str, torch.Tensor]) -> int:
    """What a step's loss is the mean over: label tokens, or the pairs of a preference batch."""
    return int(batch[PAIRS]) if PAIRS in batch else count_label_tokens(batch)


def queue_forward_backward(
    model: Any, micro_batches: list[dict[str, torch.Tensor]], accelerator: Any, loss_head: LossHead | None = None,
    votes: Callable[[], list[bool]] | None = None,
) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step, without waiting for the GPU.

    Returns the step's values summed over ranks, still on the device: STEP_VALUES then the votes
    (read them with step_result).
    Gradients equal those of one big batch holding all micro-batches of all ranks. loss_head:
    how a micro-batch becomes its loss (trainer.loss_heads; default the plain full-logits loss).
    votes: flags asked for after the backward pass; vote i is non-zero when any rank's flag i is
    set (they ride in the step's one all-reduce).

    One process scales each micro-batch's summed loss by 1 / label tokens before backward, as
    the module docstring says. Several processes back-propagate the summed losses and learn the
    window's label tokens of all ranks in the step's single all-reduce, together with the loss
    sums and the votes; the averaged gradients are then multiplied by world_size / label tokens:
    the same gradients, with one collective per step instead of one before and one after backward.
    That factor is a device tensor, so the optimizer step is queued before the total is known here.
    """
    device = accelerator.device
    loss_head = loss_head or PlainLoss()
    world = accelerator.num_processes
    # The counts come from the host's copy of the batch: no device value is read for them.
    local = [float(sum(loss_units(mb) for mb in micro_batches)),
             float(sum(count_label_tokens(mb) for mb in micro_batches)),
             float(sum(int(mb["attention_mask"].sum()) for mb in micro_batches)),
             float(sum(int(mb["input_ids"].shape[0]) for mb in micro_batches))]
    scale = 1.0 / max(local[0], 1.0) if world == 1 else 1.0
    # loss sum, correct tokens (or pairs), and a preference head's two reward sums
    totals = torch.zeros(4, device=device, dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        # Gradients are all-reduced only after the last micro-batch of the window.
        sync = nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            summed, _, correct, *rewards = loss_head(model, mb, device)
            accelerator.backward(summed * scale if world == 1 else summed)
        totals[:2] += torch.stack([summed.detach().double(), correct.double()])
        if rewards:
            totals[2:] += rewards[0].double()
    wanted = [float(bool(v)) for v in votes()] if votes is not None else []
    with region("all_reduce"):
        packed = sum_over_ranks(totals, local + wanted, accelerator)
    if world > 1:
        scale_gradients(model, world / packed[STEP_VALUES.index("loss_units")].clamp(min=1.0))
    return packed


def optimizer_step(accelerator: Any, optimizer: Any, trainable: list[torch.Tensor], clip_to: float,
                   scheduler: Any = None) -> torch.Tensor:
    """Clip, step, zero the gradients; the step's gradient norm, on the device (not read here).

    With optimizer_in_backward the layers were stepped in backward, before the whole gradient
    existed: nothing is clipped, and the norm is the one the optimizer summed on the way."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    in_backward = isinstance(inner, OptimizerInBackward)
    if not in_backward:
        with region("clip"):
            grad_norm = accelerator.clip_grad_norm_(trainable, clip_to)
    with region("optimizer"):
        optimizer.step()
        weights_stepped()  # the fused LoRA layers' compute-dtype copies of the adapters are stale
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return inner.take_grad_norm() if in_backward else grad_norm


# The order of queue_forward_backward's values. The loss is a mean over loss_units: label tokens,
# or pairs for a preference objective (then correct_tokens counts the pairs ranked right, and the
# reward sums are those of the preferred and the non-preferred outputs).
STEP_VALUES = ("loss_sum", "correct_tokens", "chosen_reward_sum", "rejected_reward_sum",
               "loss_units", "label_tokens", "input_tokens", "rows")
_COUNTS = ("correct_tokens", "loss_units", "label_tokens", "input_tokens", "rows")


def step_result(values: list[float]) -> dict[str, Any]:
    """The host's view of a step's values: counts as ints, votes as bools (after the named ones)."""
    named: dict[str, Any] = dict(zip(STEP_VALUES, values))
    named.update({k: int(named[k]) for k in _COUNTS})
    return {**named, "votes": [v > 0 for v in values[len(STEP_VALUES):]]}


def forward_backward(
    model: Any, micro_batches: list[dict[str, torch.Tensor]], accelerator: Any, loss_head: LossHead | None = None,
    votes: Callable[[], list[bool]] | None = None,
) -> dict[str, Any]:
    """queue_forward_backward, read at once (tests, benches): the step's token-mean loss is
    result["loss_sum"] / result["label_tokens"]; result["votes"][i] is True when any rank's flag i is."""
    return step_result(queue_forward_backward(model, micro_batches, accelerator, loss_head, votes).tolist())


@dataclass
class Window:
    """The sums of the steps read since the last metrics event, and when that event was."""

    started: float
    loss_sum: float = 0.0
    label_tokens: int = 0
    input_tokens: int = 0
    correct_tokens: int = 0
    rows: int = 0
    loss_units: int = 0
    chosen_reward_sum: float = 0.0
    rejected_reward_sum: float = 0.0

    def add(self, result: dict[str, Any]) -> None:
        for f in fields(self)[1:]:
            setattr(self, f.name, getattr(self, f.name) + result[f.name])

    def train_metrics(self, preference: bool = False) -> dict[str, float]:
        """The interval's loss and accuracy; a preference job's rewards (mean per pair), their
        margin and the share of pairs ranked right instead of token accuracy."""
        if not preference:
            label_tokens = max(self.label_tokens, 1)
            return {"train_loss": self.loss_sum / label_tokens,
                    "train_mean_token_accuracy": self.correct_tokens / label_tokens}
        pairs = max(self.loss_units, 1)
        chosen, rejected = self.chosen_reward_sum / pairs, self.rejected_reward_sum / pairs
        values = (self.correct_tokens / pairs, chosen, rejected, chosen - rejected)
        return {"train_loss": self.loss_sum / pairs, **dict(zip(PREFERENCE_TRAIN_METRICS, values, strict=True))}

    def tokens_per_second(self, now: float, seconds: float | None = None) -> float:
        """Over `seconds` where the device measured them, else the host's time since `started`."""
        return self.input_tokens / max(seconds if seconds is not None else now - self.started, 1e-9)

    def mean_row(self) -> float:
        return self.input_tokens / max(self.rows, 1)
