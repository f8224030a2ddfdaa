"""The model as train() runs it: loaded, fast kernels on, method applied, loss chosen.

The fast path, on by default wherever its pieces apply, each of them falling back on its own:
- the loss runs the LM head a chunk of tokens at a time (trainer.loss_heads.ChunkedLoss): no
  full-vocabulary logits and no fp32 copy of them, on any device;
- plain LoRA layers run as one fused autograd function (trainer.lora_fused): no fp32 copies of
  the input and no adapter-output temporaries;
- on CUDA, when liger-kernel is installed, its fused RMSNorm, RoPE and SwiGLU replace the
  model's (its own cross-entropy is not used: the chunked loss above already never holds the logits);
- frozen weights stay in bf16 (trainer.model), full fine-tuning optionally all in bf16.

`speed` decides gradient checkpointing: lean recomputes every decoder layer in backward (least
memory), fast keeps activations (about a third less compute), balanced checkpoints only the bottom
`checkpoint_layers` decoder layers (each costs its recompute and saves all but its input), auto
takes fast when the planner's estimate without checkpointing fits the GPU, else balanced with the
fewest checkpointed layers that fit, else lean. An explicit `gradient_checkpointing` in the spec
is the lean/fast choice under its old name.

TUNEQ_FASTPATH=0 turns all of it off (the plain loop, for comparison and for debugging);
TUNEQ_LIGER=0 turns off only the liger kernels; TUNEQ_LORA_MLP=0 only the fused LoRA MLP (trainer.lora_mlp).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch

from trainer import ce_kernel
from trainer.loss_heads import ChunkedLoss, PlainLoss, build_loss
from trainer.spec import JobSpec

# Share of the GPU's memory the no-checkpointing estimate may take for speed auto to pick fast.
AUTO_FAST_SHARE = 0.85


def _env_on(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "off", "false", "no")


def fast_path_enabled() -> bool:
    return _env_on("TUNEQ_FASTPATH")


@dataclass
class FastPath:
    """What the job runs with; reported in the start event."""

    speed: str  # lean | fast | balanced, resolved
    gradient_checkpointing: bool
    loss: PlainLoss | ChunkedLoss
    fused_lora_layers: int = 0
    liger: list[str] = field(default_factory=list)
    checkpointed_layers: int | None = None  # of the decoder layers, from the bottom; None: not counted
    offload: Any = None  # trainer.offload.CheckpointOffload when spec.checkpoint_offload
    fused_lora_mlps: int = 0  # SwiGLU MLPs run as one function (trainer.lora_mlp)

    def describe(self) -> dict[str, Any]:
        return {
            "speed": self.speed,
            "gradient_checkpointing": self.gradient_checkpointing,
            "loss": self.loss.name,
            "loss_chunk_tokens": self.loss.chunk,
            # The Triton cross-entropy kernel (trainer.ce_kernel) takes 3 chunks per launch.
            "loss_kernel": loss_kernel(self.loss),
            "fused_lora_layers": self.fused_lora_layers,
            "fused_lora_mlps": self.fused_lora_mlps,
            "liger_kernels": self.liger,
            "checkpointed_layers": self.checkpointed_layers,
            "checkpoint_offload": self.offload is not None,
        }


def loss_kernel(loss: PlainLoss | ChunkedLoss) -> str | None:
    if not isinstance(loss, ChunkedLoss):
        return None
    device = loss.head.weight.device
    dtype = loss.compute_dtype or (torch.bfloat16 if device.type == "cuda" else loss.head.weight.dtype)
    return "triton" if ce_kernel.available(dtype, device) else "torch"


def _fits_without_checkpointing(spec: JobSpec, config: Any, device: torch.device) -> bool:
    """The planner's estimate without checkpointing against this GPU; any doubt picks lean."""
    try:
        from trainer.planning import estimate_for_spec

        estimate = estimate_for_spec(spec, config, speed="fast")
        total = torch.cuda.get_device_properties(device).total_memory
        return estimate.total <= AUTO_FAST_SHARE * total
    except Exception:  # noqa: BLE001 - an estimate that fails must not fail the job
        return False


def _fewest_fitting_layers(spec: JobSpec, config: Any, device: torch.device) -> int | None:
    """speed balanced's k by the planner's estimate against this GPU; None: none fits, or doubt."""
    try:
        from trainer.planning import fewest_checkpoint_layers

        total = torch.cuda.get_device_properties(device).total_memory
        return fewest_checkpoint_layers(spec, config, AUTO_FAST_SHARE * total)
    except Exception:  # noqa: BLE001 - an estimate that fails must not fail the job
        return None


def _layer_count(config: Any) -> int | None:
    return getattr(config, "num_hidden_layers", None) if config is not None else None


def resolve_checkpointing(spec: JobSpec, device: torch.device, config: Any = None) -> tuple[str, int | None]:
    """(speed, checkpointed layers from the bottom) for this job on this device.

    The layer count is None for lean (all of them) and 0 for fast; balanced gives a number.
    """
    layers = _layer_count(config)
    if spec.speed == "balanced":
        k = spec.checkpoint_layers
        if k is None:
            # Without a GPU the memory is the host's: nothing needs checkpointing.
            k = _fewest_fitting_layers(spec, config, device) if device.type == "cuda" and config is not None else 0
            if k is None:
                return "lean", None
        if layers is not None and k > layers:
            from trainer.errors import ConfigError

            raise ConfigError(f"checkpoint_layers: {k} exceeds the model's {layers} decoder layers; allowed 0..{layers}")
        return "balanced", k
    if spec.speed in ("lean", "fast"):
        return spec.speed, (None if spec.speed == "lean" else 0)
    if spec.method == "prefix" or device.type != "cuda":
        # A CPU's memory is the host's, and prefix tuning cannot be checkpointed.
        return "fast", 0
    if config is None:
        return "lean", None
    if _fits_without_checkpointing(spec, config, device):
        return "fast", 0
    k = _fewest_fitting_layers(spec, config, device)
    if k is None or layers is None or k >= layers:
        return "lean", None
    return ("fast", 0) if k == 0 else ("balanced", k)


def resolve_speed(spec: JobSpec, device: torch.device, config: Any = None) -> str:
    """lean, fast or balanced for this job on this device."""
    return resolve_checkpointing(spec, device, config)[0]


def checkpoint_bottom_layers(model: Any, k: int) -> int:
    """Keep gradient checkpointing (already enabled on the model) on the bottom k decoder layers
    only; returns how many are checkpointed.

    transformers checks each layer's own `gradient_checkpointing` flag when it runs the layer, so
    turning the flag off above k leaves those layers' forward plain, through peft's wrappers and
    liger's patched modules alike.
    """
    from trainer.methods import decoder_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(base)
    for i, layer in enumerate(layers):
        if not hasattr(layer, "gradient_checkpointing"):
            from trainer.errors import ConfigError

            raise ConfigError("speed: 'balanced' needs a transformers model whose decoder layers can be "
                              "checkpointed one by one; use lean or fast")
        layer.gradient_checkpointing = i < k
    return min(k, len(layers))


@functools.cache
def liger_module() -> Any:
    """liger_kernel.transformers with its model patches imported, or None when absent or broken.

    Its import takes most of a second (triton and every op's module), so the trainer's standby
    calls this before its job arrives (trainer.standby.preload)."""
    try:
        import liger_kernel.transformers as liger
        from liger_kernel.transformers import monkey_patch  # noqa: F401 - what apply_liger_kernel_to_* load
    except Exception:  # noqa: BLE001 - optional: absent or broken, the model keeps its own layers
        return None
    return liger


def apply_liger(model: Any) -> list[str]:
    """Liger's fused RMSNorm, RoPE and SwiGLU on this model instance, when installed; [] otherwise."""
    if not _env_on("TUNEQ_LIGER"):
        return []
    import inspect

    liger = liger_module()
    if liger is None:
        return []
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    patch = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if patch is None:
        return []
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
              "fused_linear_cross_entropy": False, "model": model}
    accepted = inspect.signature(patch).parameters
    try:
        patch(**{k: v for k, v in wanted.items() if k in accepted})
    except Exception:  # noqa: BLE001
        return []
    return [k for k in ("rms_norm", "rope", "swiglu") if k in accepted]


def setup_model(spec: JobSpec, precision: str, device: torch.device,
                note: Callable[[str], None] | None = None) -> tuple[Any, FastPath]:
    """Load the base, apply the method and the fast path; the model is ready for the optimizer.

    `note(part)` is called as each part ends (weights, liger, method, fast_path), for the start-up's detail."""
    from trainer.model import load_model

    base = load_model(spec, precision, device)
    if note is not None:
        note("weights")
    return prepare_model(base, spec, precision, device, note)


def prepare_model(base: Any, spec: JobSpec, precision: str, device: torch.device,
                  note: Callable[[str], None] | None = None) -> tuple[Any, FastPath]:
    """A loaded base with the method and the fast path applied (setup_model's part after the
    weights; the kernels' warm-up applies it to a base of random weights)."""
    note = note or (lambda part: None)
    from trainer.lora_fused import fuse_lora
    from trainer.lora_mlp import fuse_lora_mlps
    from trainer.methods import apply_method

    fast = fast_path_enabled()
    liger = apply_liger(base) if fast and device.type == "cuda" else []
    note("liger")
    config = getattr(base, "config", None)
    speed, k = resolve_checkpointing(spec, device, config)
    checkpointing = speed == "lean" or bool(k)
    model = apply_method(base, spec, checkpointing=checkpointing)
    note("method")
    if speed == "balanced" and k:
        k = checkpoint_bottom_layers(model, k)
    elif k is None:
        k = _layer_count(config)
    fused = fuse_lora(model) if fast else 0
    mlps = fuse_lora_mlps(model) if fast and _env_on("TUNEQ_LORA_MLP") else 0
    offload = None
    if spec.checkpoint_offload and checkpointing:
        from trainer.offload import attach_checkpoint_offload

        # Last: the hooks skip tensors on the storage of any parameter, the fused layers' included.
        offload = attach_checkpoint_offload(model)
    # accelerate runs the forward under bf16 autocast whenever the precision is bf16 (trainer.job).
    loss = build_loss(model, device, chunked=fast, compute_dtype=torch.bfloat16 if precision == "bf16" else None)
    note("fast_path")
    return model, FastPath(speed, checkpointing, loss, fused, liger, k, offload, mlps)
