"""Several processes, one job: the strategy (DDP or FSDP), the Accelerator, and sharded state.

A job on k GPUs runs k processes under `accelerate launch` (torchrun underneath). Adapter methods
(LoRA, QLoRA, ...) train with DDP: every GPU holds the frozen base and the small adapter, and only
the adapter's gradients are all-reduced. Full fine-tuning over several GPUs uses FSDP2 (full
shard): weights, gradients and AdamW's moments are split across the GPUs, so a model whose fp32
master weights and optimizer state do not fit one GPU fits k of them.

Per optimizer step the ranks meet twice: DDP's (or FSDP's) gradient reduction after the last
micro-batch of the window, and one all-reduce of the step's scalars (label tokens, loss sums,
pause and checkpoint votes; see sum_over_ranks), whose result the host reads one step later. Evaluation and checkpoints add theirs when due.

FSDP state is saved as full state dicts gathered on rank 0 (checkpoints and the final model keep
the one-GPU format: model.safetensors, optimizer.pt). Every rank takes part in the gathering; only
rank 0 writes. On resume rank 0 reads the files and broadcasts them into every rank's shards.

A process that dies takes the job with it: torchrun stops the other ranks at once, and a rank
blocked in a collective gives up after the process-group timeout (TUNEQ_DIST_TIMEOUT_S) instead
of hanging forever. Errors of the communication layer are reported with the code `distributed`,
which the worker treats as an infrastructure failure (the job is retried from its checkpoint).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

from trainer.errors import ConfigError
from trainer.spec import JobSpec

TIMEOUT_ENV = "TUNEQ_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
# Methods whose every weight trains; FSDP is for them. Adapter methods replicate a frozen base.
SHARDABLE_METHODS = ("full", "freeze")


def world_size() -> int:
    """Processes of this job, as the launcher announced them (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(spec: JobSpec, processes: int) -> str:
    """'single', 'ddp' or 'fsdp' for this spec on `processes` processes.

    auto: FSDP for full fine-tuning over several GPUs (its weights and optimizer state are what
    fill a GPU), DDP for everything else.
    """
    if processes <= 1:
        return "single"
    if spec.strategy == "auto":
        return "fsdp" if spec.method in SHARDABLE_METHODS else "ddp"
    return spec.strategy


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def decoder_layer_classes(model_dir: str) -> list[str]:
    """Class names FSDP wraps one unit each: the model's decoder layers, read from its config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from trainer.model import remote_code_allowed

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=remote_code_allowed(model_dir))
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        cls = None
    names = list(getattr(cls, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(
            f"strategy: fsdp needs to know the decoder layer class of {model_dir} and transformers does not name one; "
            "use strategy 'ddp'"
        )
    return names


def fsdp_plugin(spec: JobSpec, bf16: bool) -> Any:
    """FSDP2, full shard, one unit per decoder layer, bf16 compute with fp32 gradient reduction."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,  # full shard: a layer's weights exist whole only while it runs
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=decoder_layer_classes(spec.model),
        # fp32 master shards; each layer is gathered in bf16 and its gradients reduced in fp32,
        # which keeps small updates from vanishing in bf16 sums.
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16 else None,
        # Activation checkpointing is the model's own (non-reentrant) gradient checkpointing, as the
        # spec's speed resolves it; the plugin's wrapper on top would recompute every layer twice.
        activation_checkpointing=False,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )


def ddp_kwargs() -> Any:
    """DDP settings for replicated training (adapters, or full fine-tuning with strategy 'ddp')."""
    from accelerate.utils import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(
        # A causal LM's buffers are constants (rotary frequencies), equal on every rank; the default
        # re-broadcasts them from rank 0 before every synced forward: a wait on rank 0 per step.
        broadcast_buffers=False,
        # Gradients live in DDP's buckets: no copy into and out of the bucket around the all-reduce.
        gradient_as_bucket_view=True,
        # bucket_cap_mb stays at 25: an adapter's gradients (~45 MB fp32 for LoRA r16 on a 1B model)
        # make two or three buckets, the first reduced while backward still runs. static_graph stays
        # off: it saves nothing without find_unused_parameters and has had bugs with checkpointing.
    )


def build_accelerator(spec: JobSpec, cuda: bool, bf16: bool) -> tuple[Any, str]:
    """(Accelerator, strategy) for this process; the process group gets the configured timeout."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    strategy = resolve_strategy(spec, world_size())
    kwargs: dict[str, Any] = {
        "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s()))],
    }
    if strategy == "ddp":
        kwargs["kwargs_handlers"].append(ddp_kwargs())
    if strategy == "fsdp":
        if not cuda:
            raise ConfigError("strategy: fsdp needs GPUs; on CPU processes train with 'ddp'")
        kwargs["fsdp_plugin"] = fsdp_plugin(spec, bf16)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not cuda, **kwargs)
    return accelerator, strategy


# ---------------------------------------------------------------------------------------------
# A step's scalars: one all-reduce


def sum_over_ranks(on_device: torch.Tensor, on_host: list[float], accelerator: Any) -> torch.Tensor:
    """on_device followed by on_host, each summed over all ranks, in ONE all-reduce; on the device.

    Every collective is a point where the ranks wait for each other; a step's counts, loss sums
    and votes travel together. float64 holds counts exactly (to 2**53). The result is not read
    here: the host reads it a step later (trainer.step_values), so it never waits for the GPU.
    """
    host = torch.tensor(on_host, dtype=torch.float64)
    if on_device.device.type == "cuda":
        host = host.pin_memory()  # a pageable copy would make the host wait for the stream
    packed = torch.cat([on_device.detach().to(torch.float64).flatten(), host.to(on_device.device, non_blocking=True)])
    if accelerator.num_processes > 1:
        packed = accelerator.reduce(packed, "sum")
    return packed


def scale_gradients(model: Any, factor: float | torch.Tensor) -> None:
    """Multiply every gradient of `model` by `factor` (FSDP's sharded ones in place, shard by shard).

    factor may be a 0-dim device tensor (DDP: the step's label-token total, still on the GPU), so
    the host need not wait for it. The products are those of the float factor: fp32 gradients are
    multiplied by its fp32 value, as a Python scalar would be; others in fp32 and rounded back
    (multiplying a bf16 tensor by a tensor would first round the factor to bf16). Sharded (DTensor)
    gradients take the factor's host value: FSDP steps are long, and that path stays as it was.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if isinstance(factor, torch.Tensor):
        f32 = factor.detach().to(torch.float32)
        fp32 = [g for g in plain if g.dtype == torch.float32]
        if fp32:
            torch._foreach_mul_(fp32, f32)
        for g in plain:
            if g.dtype != torch.float32:
                g.copy_(g.float() * f32)
        if sharded:
            factor = float(factor)
    elif plain:
        torch._foreach_mul_(plain, factor)
    for g in sharded:
        g.mul_(factor)


# ---------------------------------------------------------------------------------------------
# Sharded models: gathering and scattering whole state dicts


def is_sharded(model: Any) -> bool:
    """True for a model whose parameters FSDP2 split across ranks (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload: only rank 0 keeps the gathered tensors, in host memory; the others get {}.
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def gather_model_state(model: Any) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 ({} elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def gather_training_state(model: Any, optimizer: Any) -> tuple[dict, dict] | None:
    """(model, optimizer) full state dicts on rank 0 for a checkpoint; None for unsharded models."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return gather_model_state(model), get_optimizer_state_dict(model, optimizer, options=_full_options())


def scatter_training_state(model: Any, optimizer: Any, model_state: dict, optimizer_state: dict | None) -> None:
    """Load full state dicts read by rank 0 into every rank's shards (others pass {})."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    # Tied weights are stored once (see unique_tensors), so a key may be missing here.
    set_model_state_dict(model, model_state, options=_full_options(broadcast_from_rank0=True, strict=False))
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=_full_options(broadcast_from_rank0=True))


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (safetensors refuses aliases: tied embeddings)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Failures


def is_distributed_failure(exc: BaseException) -> bool:
    """An error of the communication layer: a peer process died, a collective timed out."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if world_size() <= 1 or not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    # gloo and NCCL raise plain RuntimeErrors whose text names the transport.
    return any(mark in text for mark in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer"))
