"""Model FLOPs per trained token and MFU (model FLOPs utilisation) of a running job.

Counted from the live model, with the formulas of trainer.planning.estimate_compute:
  matmul FLOPs per token = 2N (forward) + 2N (input gradients) + 2T (weight gradients)
    N: weights of every linear layer including the LM head (a tied head counts here, it is a
       matmul) and the adapters' A/B; a 4-bit weight counts as its unpacked size;
    T: the trainable ones among them. Full fine-tuning: T = N, so 6N; LoRA: 4N_base + 6T.
  attention per token = 6 * layers * heads * head_dim * seq_len: scores and values are
    4 * layers * heads * head_dim * seq_len forward, three times that with backward, halved by
    the causal mask.
MFU counts model FLOPs only: the forward that gradient checkpointing recomputes is work the
hardware does but the model does not need, so it lowers MFU rather than raising it.

The peak is the device's dense bf16 matmul rate: TUNEQ_GPU_PEAK_TFLOPS, by default the measured
H200 figure the planner uses. On a CPU there is no meaningful peak, so MFU is None.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_PEAK_TFLOPS = 790.0  # H200-class dense bf16, as trainer.planning.compute.H200_BF16_PEAK_FLOPS


@dataclass(frozen=True)
class ModelFlops:
    matmul_weights: int
    trainable_matmul_weights: int
    layers: int
    attention_width: int  # heads * head_dim

    def per_token(self, seq_len: float) -> float:
        mm = 4.0 * self.matmul_weights + 2.0 * self.trainable_matmul_weights
        attention = 3.0 * 4.0 * self.layers * self.attention_width * seq_len * 0.5
        return mm + attention


def _linear_size(module: torch.nn.Module) -> int:
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features) * int(module.out_features)
    return 0


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_flops(model: Any) -> ModelFlops:
    """Matmul weights (total, trainable) and attention shape of a causal LM, peft-wrapped or not."""
    total = trainable = 0
    for module in model.modules():
        size = _linear_size(module)
        if not size:
            continue
        total += size
        if module.weight.requires_grad:
            trainable += size
    config = _text_config(getattr(model, "config", None))
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (hidden // heads if heads else 0))
    return ModelFlops(total, trainable, layers, heads * head_dim)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 FLOP/s of one device; None on a CPU."""
    if device.type != "cuda":
        return None
    raw = os.environ.get("TUNEQ_GPU_PEAK_TFLOPS", "").strip()
    try:
        tflops = float(raw) if raw else DEFAULT_PEAK_TFLOPS
    except ValueError:
        tflops = DEFAULT_PEAK_TFLOPS
    return tflops * 1e12 if tflops > 0 else None


def mfu(flops: ModelFlops, tokens_per_second: float, seq_len: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs per second over the devices' peak; None where the peak is unknown."""
    if peak is None or devices < 1:
        return None
    return flops.per_token(seq_len) * tokens_per_second / (peak * devices)
