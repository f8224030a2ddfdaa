"""Which figures of the trainer's events are a job's curves, and under which names.

One table for every place that draws them: the worker's TensorBoard files
(worker.tensorboard_log) and the trainer's Weights & Biases run (trainer.tracking) show the same
curves under the same names (train/loss, valid/loss, eval/<grader>, ...).
"""

from __future__ import annotations

import math
from typing import Any

from trainer.vocabulary import PREFERENCE_TRAIN_METRICS

GiB = 2**30

# event type -> [(data key, tag, scale)]
SCALARS: dict[str, list[tuple[str, str, float]]] = {
    "metrics": [
        ("train_loss", "train/loss", 1.0), ("learning_rate", "train/learning_rate", 1.0),
        ("grad_norm", "train/grad_norm", 1.0), ("epoch", "train/epoch", 1.0), ("tokens", "train/tokens", 1.0),
        ("tokens_per_second", "train/tokens_per_second", 1.0), ("mfu", "train/mfu", 1.0),
        ("peak_memory_bytes", "train/peak_memory_gib", 1 / GiB),
        ("train_mean_token_accuracy", "train/mean_token_accuracy", 1.0),
        # A preference job's: train/preference_accuracy, train/chosen_reward, ...
        *((key, "train/" + key.removeprefix("train_"), 1.0) for key in PREFERENCE_TRAIN_METRICS),
    ],
    "validation": [
        ("valid_loss", "valid/loss", 1.0), ("valid_mean_token_accuracy", "valid/mean_token_accuracy", 1.0),
        ("valid_perplexity", "valid/perplexity", 1.0), ("full_valid_loss", "valid/full_loss", 1.0),
        ("full_valid_mean_token_accuracy", "valid/full_mean_token_accuracy", 1.0),
        ("valid_preference_accuracy", "valid/preference_accuracy", 1.0),
        ("full_valid_preference_accuracy", "valid/full_preference_accuracy", 1.0),
    ],
    "forgetting": [
        ("forgetting_loss_before", "forgetting/loss_before", 1.0), ("forgetting_loss_after", "forgetting/loss_after", 1.0),
    ],
}


def _scalars(ev_type: str, data: Any) -> list[tuple[str, str, float]] | None:
    if ev_type == "eval" and isinstance(data, dict):
        # Graders are named by the job: eval/<name> for each score, and the pass's seconds.
        return [(k, "eval/" + k.removeprefix("eval_"), 1.0) for k in data if k.startswith("eval_")]
    return SCALARS.get(ev_type)


def step_figures(ev_type: str, data: Any) -> tuple[int, dict[str, float]] | None:
    """(step, {name: value}) of one event's figures under the trainer's names (train_loss,
    valid_loss, eval_<grader>, ...); None for an event without a step or figures. Values that are
    missing, not numbers or not finite (a diverged loss) are left out."""
    scalars = _scalars(ev_type, data)
    if not scalars or not isinstance(data, dict) or not isinstance(data.get("step"), int):
        return None
    figures = {}
    for key, _tag, _scale in scalars:
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            figures[key] = value
    return (data["step"], figures) if figures else None


def curve_points(ev_type: str, data: Any) -> tuple[int, dict[str, float]] | None:
    """(step, {tag: value}) of one event's figures, as the curves name and scale them."""
    found = step_figures(ev_type, data)
    if found is None:
        return None
    tags = {key: (tag, scale) for key, tag, scale in _scalars(ev_type, data) or ()}
    return found[0], {tags[key][0]: value * tags[key][1] for key, value in found[1].items()}
