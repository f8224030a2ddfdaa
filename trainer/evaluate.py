"""Evaluation: token-mean loss, next-token accuracy and perplexity over a set of examples.

The names follow OpenAI's: every eval_every_steps a pass over a fixed sample of the validation
file (`valid_loss`, `valid_mean_token_accuracy`, `valid_perplexity`), and at the end a pass over
all of it (`full_valid_*`). Forgetting is the loss on a general held-out file (`forgetting_file`)
before and after training: how much of what the base model knew is lost.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainer.data.batch import collate, model_inputs
from trainer.eval_mode import evaluation
from trainer.loss_heads import LossHead, PlainLoss


def perplexity(loss: float) -> float:
    # exp overflows a float beyond ~709; a loss that high means "no idea" either way.
    return math.exp(min(loss, 700.0))


@torch.no_grad()
def evaluate(
    model: Any, examples: list[dict], batch_size: int, pad_id: int, accelerator: Any, prefix: str = "valid",
    loss_head: LossHead | None = None,
) -> dict[str, float]:
    """Token-mean loss, next-token accuracy and perplexity over `examples`, sharded by rank."""
    with evaluation(model):
        totals = _evaluation_totals(model, examples, batch_size, pad_id, accelerator, loss_head)
    n = max(float(totals[2]), 1.0)
    loss = float(totals[0]) / n
    accuracy = getattr(loss_head, "accuracy_name", "mean_token_accuracy")
    if accuracy != "mean_token_accuracy":  # preference pairs: the mean pair loss, pairs ranked right
        return {f"{prefix}_loss": loss, f"{prefix}_{accuracy}": float(totals[1]) / n}
    return {f"{prefix}_loss": loss, f"{prefix}_mean_token_accuracy": float(totals[1]) / n,
            f"{prefix}_perplexity": perplexity(loss)}


def _evaluation_totals(model: Any, examples: list[dict], batch_size: int, pad_id: int, accelerator: Any,
                       loss_head: LossHead | None) -> torch.Tensor:
    """(loss sum, correct tokens, label tokens) over all ranks."""
    device = accelerator.device
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, tokens
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    # Under FSDP every forward is a collective: a rank with one batch fewer runs a discarded one.
    n_batches = math.ceil(math.ceil(len(examples) / accelerator.num_processes) / batch_size)
    for i in range(0, n_batches * batch_size, batch_size):
        if not mine[i : i + batch_size]:
            model(**model_inputs(collate(examples[:1], pad_id), device))
            continue
        batch = collate(mine[i : i + batch_size], pad_id)
        loss, n, correct, *_ = (loss_head or PlainLoss())(model, batch, device)
        totals += torch.stack([loss.double(), correct.double(), n.double()])
    return accelerator.reduce(totals, "sum")


def eval_sample(examples: list[dict], size: int, seed: int) -> list[dict]:
    """A fixed, seeded sample for the periodic pass, so its values compare across steps."""
    if len(examples) <= size:
        return examples
    import numpy as np

    chosen = np.random.default_rng([seed, 7]).permutation(len(examples))[:size]
    return [examples[i] for i in sorted(chosen.tolist())]


def forgetting_change(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The forgetting metrics of a run, from the passes before and after training."""
    return {
        "forgetting_loss_before": before["loss"], "forgetting_loss_after": after["loss"],
        "forgetting_perplexity_before": before["perplexity"], "forgetting_perplexity_after": after["perplexity"],
        # The figure to watch: how much worse the model got at general text.
        "forgetting_loss_increase": after["loss"] - before["loss"],
    }
