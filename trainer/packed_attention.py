"""Attention for packed rows as flash attention over variable-length sequences, with no mask.

A packed row holds several examples whose attention must not cross (trainer.data.pack). Given
only position_ids, transformers finds the boundaries on the GPU, reads them back to decide
whether the row is packed at all (which makes the host wait for the GPU in every forward), and
builds a block-diagonal [batch, 1, seq, seq] mask; sdpa cannot run its flash kernel with a mask,
so the attention of a packed job ran slower than that of the unpacked bench step.

Here the boundaries are found on the host, where the batch is collated (`sequence_bounds`), and
travel as two forward kwargs: the cumulative starts of every example of the batch (its rows laid
end to end, a row's padding one more sequence) and the longest one. The attention is
torch.nn.attention.varlen's flash kernel, causal within each example: no mask is built, no value
is read, and the blocks across examples are not even computed. Registered with transformers
under its own name, which also tells transformers to build no mask at all.

Without those kwargs (evaluation batches, which are right-padded and not packed) the same name
runs sdpa's causal kernel: with right padding a real token never attends to a pad, so its output
is that of the masked attention; pad positions carry no label.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

NAME = "tuneq_packed"
BOUNDS = "tuneq_cu_seqlens"  # int32 [sequences + 1], on the device
LONGEST = "tuneq_max_seqlen"  # int, on the host


def _varlen() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available(device: torch.device) -> bool:
    """On a CUDA device whose torch has the varlen flash kernel; TUNEQ_PACKED_ATTENTION=0 turns it off."""
    if os.environ.get("TUNEQ_PACKED_ATTENTION", "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    return device.type == "cuda" and _varlen() is not None


def sequence_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative starts, longest length) of the sequences of a [batch, seq] block of position ids
    on the host: a sequence starts wherever the position is 0, and every row starts one."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    # Every row starts a sequence too, even where its positions do not begin at 0.
    row_starts = torch.arange(0, flat.numel(), position_ids.shape[-1])
    starts = torch.unique(torch.cat([starts, row_starts]))
    bounds = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


_params: set[str] | None = None


def _kernel_params() -> set[str]:
    global _params
    if _params is None:
        _params = set(inspect.signature(_varlen()).parameters)
    return _params


def with_bounds(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated packed batch plus its sequence bounds, for model_inputs to pass on."""
    bounds, longest = sequence_bounds(batch["position_ids"])
    return {**batch, BOUNDS: bounds, LONGEST: torch.tensor(longest)}


def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [b, heads, s, d], key/value [b, kv_heads, s, d];
    returns [b, s, heads, d]."""
    bounds = kwargs.get(BOUNDS)
    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    params = _kernel_params()
    extra: dict[str, Any] = {}
    if kv_heads != heads:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # each kv head serves heads // kv_heads consecutive query heads, as repeat_kv lays them out
            key = key.repeat_interleave(heads // kv_heads, dim=1)
            value = value.repeat_interleave(heads // kv_heads, dim=1)
            kv_heads = heads
    if "is_causal" in params:
        extra["is_causal"] = True
    else:
        extra["window_size"] = (-1, 0)
    if scaling is not None and "scale" in params:
        extra["scale"] = scaling
    q = query.transpose(1, 2).reshape(b * s, heads, d)
    k = key.transpose(1, 2).reshape(b * s, kv_heads, d)
    v = value.transpose(1, 2).reshape(b * s, kv_heads, d)
    longest = int(kwargs[LONGEST])
    out = _varlen()(q, k, v, bounds, bounds, longest, longest, **extra)
    return out.view(b, s, heads, d), None


def install(model: Any) -> bool:
    """Switch `model` (peft-wrapped or not) to this attention; False where it does not apply:
    a model with sliding-window or other non-plain attention keeps its own."""
    from transformers import AttentionInterface

    config = getattr(model, "config", None)
    if config is None or getattr(config, "sliding_window", None) or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, attention)
    config._attn_implementation = NAME
    return True


def uninstall(model: Any) -> None:
    """Back to sdpa (for generation after training, whose cache this attention does not handle)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == NAME:
        config._attn_implementation = "sdpa"
