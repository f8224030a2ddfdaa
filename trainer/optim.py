"""The optimizer of a job: AdamW in one of five implementations, with its parameter groups.

Groups: matrices decay, norms' gains and biases do not (decaying them pulls them towards zero
for no benefit). With LoRA+ the B matrices form groups of their own at loraplus_lr_ratio times
the learning rate: B starts at zero and carries the update's direction, and the LoRA+ paper
shows that a larger step for B than for A learns faster at the same cost.

The scheduler scales every group by the same factor, so the ratio holds through warm-up and decay.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.errors import ConfigError
from trainer.optim_in_backward import OptimizerInBackward
from trainer.spec import TORCH_OPTIMIZERS, JobSpec
from trainer.vocabulary import BITSANDBYTES_OPTIMIZERS

BETAS = (0.9, 0.999)


def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or ".lora_embedding_B." in name


def param_groups(model: Any, spec: JobSpec) -> list[dict[str, Any]]:
    hp = spec.hyperparameters
    ratio = spec.lora.loraplus_lr_ratio if spec.method in ("lora", "qlora") else None
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (p.ndim >= 2, ratio is not None and _is_lora_b(name))
        buckets.setdefault(key, []).append(p)
    groups = []
    for (decays, is_b), params in sorted(buckets.items()):
        groups.append({
            "params": params,
            "weight_decay": hp.weight_decay if decays else 0.0,
            "lr": hp.learning_rate * (ratio if is_b else 1.0),
            "name": ("lora_B" if is_b else "base") + ("" if decays else "_no_decay"),
        })
    return groups


def build_optimizer(model: Any, spec: JobSpec, device: torch.device) -> torch.optim.Optimizer:
    hp = spec.hyperparameters
    groups = param_groups(model, spec)
    if not groups:
        raise ConfigError("method: nothing to train; the method left no parameter trainable")
    kind = spec.optimizer
    if kind in TORCH_OPTIMIZERS:
        fused = kind == "adamw_fused" or device.type == "cuda"

        def adamw(some: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return torch.optim.AdamW(some, lr=hp.learning_rate, betas=BETAS, fused=fused)

        if spec.optimizer_in_backward:
            # Every name of a parameter: a tied head must be seen to be shared.
            named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
            return OptimizerInBackward(named, groups, adamw)
        return adamw(groups)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ConfigError(f"optimizer: {kind} needs the bitsandbytes package; use adamw or install it") from exc
    cls = getattr(bnb.optim, BITSANDBYTES_OPTIMIZERS[kind])
    return cls(groups, lr=hp.learning_rate, betas=BETAS)
