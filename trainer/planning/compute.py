"""Training FLOPs and wall time of a job's tokens."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from trainer.planning.shape import shape_of
from trainer.spec import METHODS, WHOLE_WEIGHT_METHODS, LoraSettings, Method

# Measured bf16 dense matmul throughput of the lent H200 (FLOP/s), and the share of it a
# fine-tuning step reaches end to end (attention, norms, optimizer, data and Python overhead).
H200_BF16_PEAK_FLOPS = 790e12
DEFAULT_EFFICIENCY = 0.35
# Generating a token reads every weight once: an eval pass's decoding is bound by memory
# bandwidth, not FLOPs (the H200's HBM3e, and the share a batched decode step reaches).
H200_HBM_BYTES_PER_S = 4.8e12
DECODE_EFFICIENCY = 0.5
# torch.save of the python, numpy, torch and CUDA generators' states, per rank.
RNG_BYTES_PER_RANK = 16 * 1024

@dataclass(frozen=True)
class ComputeEstimate:
    method: str
    tokens: int
    seq_len: int
    gpus: int
    flops_per_token: float
    matmul_flops_per_token: float
    attention_flops_per_token: float
    total_flops: float
    peak_flops_per_gpu: float
    efficiency: float
    seconds: float
    gpu_hours: float
    notes: list[str]
    # The eval block's generation, included in seconds: passes (scheduled checkpoints and the end)
    # and their time in all.
    eval_passes: int = 0
    eval_seconds: float = 0.0
    startup_seconds: float = 0.0  # to the first step: from a fresh trainer's start, or a warm job's submission
    startup_source: str = ""  # which start-up was measured where (trainer.planning.speeds)
    wall_seconds: float = 0.0  # start-up, the steps and the checkpoints written before the last step
    efficiency_source: str = ""  # where the efficiency was measured (trainer.planning.speeds)
    # Checkpoints written before the last step (scheduled every N steps, at epoch ends, every M
    # minutes), the bytes of one, and their writing time in all; not in seconds (the steps).
    checkpoints: int = 0
    checkpoint_bytes: int = 0
    checkpoint_seconds: float = 0.0
    checkpoint_source: str = ""  # where the checkpoint rate was measured (trainer.planning.speeds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoint_bytes(estimate: Any) -> int:
    """Bytes one checkpoint writes (trainer.checkpoint.save_checkpoint), from a MemoryEstimate: the
    trained weights (full and freeze: the whole model in its dtype, gathered whole under FSDP;
    adapter methods: the fp32 adapters), the optimizer's states of every shard, and each rank's RNG
    states. Scheduler and state files are a few KiB."""
    if estimate.method in WHOLE_WEIGHT_METHODS:
        weights = estimate.parts.get("base_weights", estimate.weights)
    else:
        weights = estimate.parts.get("adapters", 4 * estimate.trainable_params)
    shards = estimate.gpus if estimate.strategy == "fsdp" else 1
    return int(weights + estimate.optimizer_states * shards + RNG_BYTES_PER_RANK * estimate.gpus)


def checkpoints_before_last(steps: int, every_steps: int | None, epoch_end_steps: Iterable[int] = ()) -> int:
    """Checkpoints the trainer writes strictly before its last step: every `every_steps` steps and
    at the ends of epochs (a step that is both saves once). The last step's own save is the end of
    the run, outside the wall time to the last step."""
    count = (steps - 1) // every_steps if every_steps else 0
    extra = {s for s in epoch_end_steps if 0 < s < steps and not (every_steps and s % every_steps == 0)}
    return count + len(extra)


def minute_checkpoints(scheduled: int, seconds: float, every_minutes: float | None) -> int:
    """Checkpoints checkpoint_every_minutes adds to `scheduled` ones over `seconds` of steps: the
    timer restarts at every save, so each of the scheduled + 1 stretches between saves (taken as
    equal) gets one every `every_minutes`, none at its own end."""
    if not every_minutes or seconds <= 0:
        return 0
    stretch = seconds / (scheduled + 1)
    return (scheduled + 1) * max(0, math.ceil(stretch / (60.0 * every_minutes)) - 1)


def eval_pass_seconds(config: Any, *, method: Method, prompts: int, batch_size: int, max_new_tokens: int,
                      gpus: int = 1, bytes_per_second: float | None = None) -> float:
    """Wall time of one eval pass, at most: every batch decodes max_new_tokens tokens, and each
    decode step reads every weight once (bf16; a 4-bit base for qlora); the ranks share the
    prompts. The prompts' prefill is a few forward passes and left out."""
    shape = shape_of(config)
    weight_bytes = shape.total_params * (0.56 if method == "qlora" else 2.0)
    batches = -(-prompts // (batch_size * gpus))
    return batches * max_new_tokens * weight_bytes / ((bytes_per_second or H200_HBM_BYTES_PER_S) * DECODE_EFFICIENCY)


def estimate_compute(
    config: Any,
    *,
    method: Method,
    tokens: int,
    gpus: int = 1,
    seq_len: int,
    gradient_checkpointing: bool = False,
    lora: LoraSettings | None = None,
    freeze_layers: int | None = None,
    peak_tflops: float | None = None,
    efficiency: float | None = None,
    eval_passes: int = 0,
    eval_seconds_per_pass: float = 0.0,
    startup_seconds: float = 0.0,
    startup_source: str = "",
    efficiency_source: str = "",
    checkpoints: int = 0,
    checkpoint_every_minutes: float | None = None,
    checkpoint_seconds_each: float = 0.0,
    checkpoint_bytes_each: int = 0,
    checkpoint_source: str = "",
) -> ComputeEstimate:
    """Training FLOPs and wall time for `tokens` tokens (padding included).

    Matmul FLOPs per token, N = decoder linear weights + LM head (tied or not):
      full:        6N  (forward 2N, input grads 2N, weight grads 2N)
      lora/qlora:  4N + 6·trainable  (frozen base: forward and input grads only)
      ia3/prefix:  4N                (their few parameters cost next to nothing)
      freeze:      2N + 4·N_top      (backward stops below the top layers' weights)
    Attention scores and values, per token: 4·L·(n·d)·S forward, three times that with backward,
    halved by the causal mask: 6·L·(n·d)·S. Checkpointing recomputes the forward once more.
    peak_tflops: per GPU, default the measured H200 bf16 matmul peak; efficiency: the fraction of
    it a real step reaches (measured per GPU model and setting: trainer.planning.speeds).
    wall_seconds adds startup_seconds and the checkpoints' writing to the steps' time: `checkpoints`
    scheduled before the last step, plus those checkpoint_every_minutes adds over the steps' time,
    checkpoint_seconds_each apiece (trainer.planning.speeds.checkpoint_seconds).
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    shape = shape_of(config)
    N = shape.matmul_params
    notes: list[str] = []
    if method == "full":
        mm = 6.0 * N
        fwd = 2.0 * N
    elif method == "freeze":
        layer_mm = shape.layer_matmul_params
        top = (freeze_layers or shape.layers) * layer_mm + shape.vocab * shape.hidden
        mm = 2.0 * N + 4.0 * top
        fwd = 2.0 * N
    elif method in ("ia3", "prefix"):
        mm = 4.0 * N
        fwd = 2.0 * N
    else:
        lora = lora or LoraSettings()
        trainable = shape.lora_params(lora.r, lora.target_modules)
        mm = 4.0 * N + 6.0 * trainable
        fwd = 2.0 * N + 2.0 * trainable
    attn_fwd = 4.0 * shape.layers * shape.heads * shape.head_dim * seq_len * 0.5
    attn = 3.0 * attn_fwd
    if gradient_checkpointing:
        mm += fwd
        attn += attn_fwd
        notes.append("gradient checkpointing recomputes the forward: about a third more FLOPs")
    if method == "qlora":
        notes.append("QLoRA also dequantises every weight twice per step; that time is not in the FLOPs")
    per_token = mm + attn
    total = per_token * tokens
    peak = peak_tflops * 1e12 if peak_tflops is not None else H200_BF16_PEAK_FLOPS
    eff = efficiency if efficiency is not None else DEFAULT_EFFICIENCY
    if not 0 < eff <= 1:
        raise ValueError(f"efficiency: {eff} is outside (0, 1]")
    seconds = total / (gpus * peak * eff)
    eval_total = eval_passes * eval_seconds_per_pass
    if eval_passes:
        notes.append(f"{eval_passes} eval pass(es) of generation, about {eval_seconds_per_pass:.1f} s each at most, "
                     "are included")
    seconds += eval_total
    saves = checkpoints + minute_checkpoints(checkpoints, seconds, checkpoint_every_minutes)
    saving = saves * checkpoint_seconds_each
    if saves:
        notes.append(f"{saves} checkpoint(s) before the last step, {checkpoint_bytes_each / 1024**3:.2f} GiB and about "
                     f"{checkpoint_seconds_each:.1f} s each, are in the wall time")
    return ComputeEstimate(
        method=method,
        tokens=int(tokens),
        seq_len=seq_len,
        gpus=gpus,
        flops_per_token=per_token,
        matmul_flops_per_token=mm,
        attention_flops_per_token=attn,
        total_flops=total,
        peak_flops_per_gpu=peak,
        efficiency=eff,
        seconds=seconds,
        gpu_hours=seconds * gpus / 3600.0,
        notes=notes,
        eval_passes=eval_passes,
        eval_seconds=eval_total,
        startup_seconds=startup_seconds,
        startup_source=startup_source,
        wall_seconds=seconds + startup_seconds + saving,
        efficiency_source=efficiency_source or ("given" if efficiency is not None else "default"),
        checkpoints=saves,
        checkpoint_bytes=int(checkpoint_bytes_each),
        checkpoint_seconds=saving,
        checkpoint_source=checkpoint_source,
    )
