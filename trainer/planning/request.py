"""A job as the planner reads it: a JobSpec, and how the trainer will run it.

The API plans a job body before it is a valid JobSpec: method and batch_size may still say "auto"
(the planner resolves them), and other fields may be missing or not yet checked (the spec's
validation reports those, not the planner). So a mapping is read into the spec's own models
without validation, over the spec's defaults: one set of types and defaults for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel

from trainer.planning.inputs import MemoryInputs
from trainer.planning.memory import MemoryEstimate, estimate
from trainer.planning.shape import shape_of
from trainer.spec import (
    PREFERENCE_OBJECTIVES,
    SPEEDS,
    WHOLE_WEIGHT_METHODS,
    FreezeSettings,
    FullPrecision,
    Hyperparameters,
    IA3Settings,
    JobSpec,
    LoraSettings,
    Method,
    Optimizer,
    PrefixSettings,
    QuantizationSettings,
    Schedule,
    Strategy,
)
from trainer.eval_settings import EvalSettings

AUTO = "auto"

# How the trainer runs a step, which a plan assumes unless told otherwise.
TRAINER_AUTOCAST = True  # accelerate's bf16 mixed precision: autocast forward, fp32 outputs
# The fast path (trainer/fastpath.py, on unless TUNEQ_FASTPATH=0): the chunked loss with the
# chunk trainer.linear_ce picks for the vocabulary, fused LoRA layers; liger's kernels only where
# liger-kernel is installed on the GPU host, which the API cannot see: planned without them
# (they save memory, so the plan errs high).
TRAINER_LOSS_CHUNK_TOKENS: int | None | Literal["auto"] = "auto"
TRAINER_FUSED_LORA = True
TRAINER_LIGER = False


def trainer_chunk_tokens(vocab: int) -> int | None:
    """The chunk the trainer's chunked loss takes for this vocabulary; None for a trainer
    without the chunked loss (its whole-batch loss)."""
    try:
        from trainer.linear_ce import chunk_tokens
    except ImportError:
        return None
    return chunk_tokens(vocab)


@dataclass(frozen=True)
class PlanRequest:
    """A JobSpec whose method and batch_size may still be "auto"; the spec's own are then unused."""

    spec: JobSpec
    method: Method | Literal["auto"]
    batch_size: int | Literal["auto"]

    @property
    def hp(self) -> Hyperparameters:
        return self.spec.hyperparameters


def request_of(spec_like: PlanRequest | JobSpec | Mapping[str, Any]) -> PlanRequest:
    if isinstance(spec_like, PlanRequest):
        return spec_like
    if isinstance(spec_like, JobSpec):
        return PlanRequest(spec_like, spec_like.method, spec_like.hyperparameters.batch_size)
    if isinstance(spec_like, Mapping):
        return _request_of_mapping(spec_like)
    raise TypeError(f"spec: expected a JobSpec or a mapping, not {type(spec_like).__name__}")


# Fields the planner reads, converted as a validated spec would hold them.
_NUMBERS = {"r": int, "dropout": float, "bits": int, "num_virtual_tokens": int, "max_seq_len": int,
            "n_epochs": int, "gradient_accumulation_steps": int}
_FLAGS = ("use_dora", "prefix_projection", "train_embeddings", "checkpoint_offload", "optimizer_in_backward")


def _settings(cls: type[BaseModel], raw: Any, /, **fixed: Any) -> Any:
    """`cls` with the mapping's known, non-null values (then `fixed`) over its defaults, unvalidated."""
    given = dict(raw) if isinstance(raw, Mapping) else {}
    values = {**{k: v for k, v in given.items() if k in cls.model_fields and v is not None}, **fixed}
    for key, value in values.items():
        if key in _NUMBERS and value is not None:
            values[key] = _NUMBERS[key](value)
        elif key in _FLAGS:
            values[key] = bool(value)
    return cls.model_construct(**values)


def _request_of_mapping(d: Mapping[str, Any]) -> PlanRequest:
    raw_hp = d.get("hyperparameters")
    # A batch_size of None or "auto" is the planner's to pick; an absent one is the spec's default.
    batch: Any = Hyperparameters.model_fields["batch_size"].default
    if isinstance(raw_hp, Mapping) and "batch_size" in raw_hp:
        given = raw_hp["batch_size"]
        batch = AUTO if given in (None, AUTO) else int(given)
    hp = _settings(Hyperparameters, {k: v for k, v in (raw_hp or {}).items() if k != "batch_size"},
                   batch_size=batch if batch != AUTO else Hyperparameters.model_fields["batch_size"].default)
    speed = d.get("speed")
    if speed not in SPEEDS:
        speed = "lean" if d.get("gradient_checkpointing") else "fast"
    method = d.get("method") or JobSpec.model_fields["method"].default
    top = {k: v for k, v in d.items() if k in JobSpec.model_fields and v is not None and not isinstance(v, Mapping)}
    if top.get("full_precision") not in ("bf16", "fp32_master"):
        top.pop("full_precision", None)
    freeze = d.get("freeze")
    spec = _settings(
        JobSpec, top,
        model=d.get("model") or "", training_file=d.get("training_file") or "",
        method=JobSpec.model_fields["method"].default if method == AUTO else method,
        speed=speed, hyperparameters=hp,
        lora=_settings(LoraSettings, d.get("lora")),
        quantization=_settings(QuantizationSettings, d.get("quantization")),
        ia3=_settings(IA3Settings, d.get("ia3")),
        prefix=_settings(PrefixSettings, d.get("prefix")),
        # The eval block's generation and when it runs (scheduled checkpoints) count in the time.
        schedule=_settings(Schedule, d.get("schedule")),
        eval=_settings(EvalSettings, d["eval"]) if isinstance(d.get("eval"), Mapping) else None,
        # trainable_layers has no default: an absent one stays None, for the estimate to refuse.
        freeze=_settings(FreezeSettings, freeze, trainable_layers=freeze.get("trainable_layers"))
        if isinstance(freeze, Mapping) else None,
    )
    return PlanRequest(spec, str(method), batch)


def memory_inputs(
    request: PlanRequest,
    *,
    method: Method,
    batch_size: int,
    speed: str,
    seq_len: int | None = None,
    gpus: int = 1,
    strategy: Strategy = "ddp",
    optimizer: Optimizer | None = None,
    full_precision: FullPrecision | None = None,
    autocast: bool | None = None,
    loss_chunk_tokens: int | None = None,
    padded: bool = True,
    fast_path: bool = True,
    liger: bool | None = None,
    checkpoint_layers: int | None = None,
    checkpoint_offload: bool | None = None,
    optimizer_in_backward: bool | None = None,
) -> MemoryInputs:
    """The micro-step the trainer runs for this job (see estimate_for_spec); `speed` is resolved."""
    spec = request.spec
    k = None
    if speed == "balanced":
        k = checkpoint_layers if checkpoint_layers is not None else spec.checkpoint_layers
        k = None if k is None else int(k)
    in_backward = spec.optimizer_in_backward if optimizer_in_backward is None else optimizer_in_backward
    # A preference pair is two rows in one forward; DPO on whole weights keeps a frozen reference.
    pairs = spec.objective in PREFERENCE_OBJECTIVES
    return MemoryInputs(
        method=method,
        batch_size=int(batch_size) * (2 if pairs else 1),
        reference_model=spec.objective == "dpo" and method in WHOLE_WEIGHT_METHODS,
        seq_len=seq_len or spec.hyperparameters.max_seq_len,
        gradient_checkpointing=speed == "lean" or (speed == "balanced" and k != 0),
        checkpoint_layers=k,
        checkpoint_offload=spec.checkpoint_offload if checkpoint_offload is None else checkpoint_offload,
        # The trainer refuses it on several GPUs: plan those without it (estimate_for_spec notes it).
        optimizer_in_backward=in_backward and gpus == 1,
        optimizer=optimizer or spec.optimizer,
        lora=spec.lora,
        quantization=spec.quantization or QuantizationSettings(),
        ia3=spec.ia3 or IA3Settings(),
        prefix=spec.prefix or PrefixSettings(),
        freeze=spec.freeze,
        gpus=gpus,
        strategy=strategy,
        full_precision=full_precision or spec.full_precision,
        precision=spec.precision,
        gradient_accumulation_steps=spec.hyperparameters.gradient_accumulation_steps,
        padded=padded,
        autocast=TRAINER_AUTOCAST if autocast is None else autocast,
        loss_chunk_tokens=loss_chunk_tokens if fast_path else None,
        fused_lora=fast_path and TRAINER_FUSED_LORA,
        liger=fast_path and (TRAINER_LIGER if liger is None else liger),
    )


def estimate_for_spec(
    spec_like: PlanRequest | JobSpec | Mapping[str, Any],
    config: Any,
    *,
    method: str | None = None,
    batch_size: int | None = None,
    speed: str | None = None,
    loss_chunk_tokens: int | None | Literal["trainer"] = "trainer",
    **options: Any,
) -> MemoryEstimate:
    """Peak memory of a job as the trainer runs it (trainer.planning.memory).

    method, batch_size, speed and seq_len override the spec's (for "auto" and for suggestions);
    the other keywords (memory_inputs') override what the trainer does by default. fast_path False
    plans the plain loop (TUNEQ_FASTPATH=0): whole-batch loss, peft's LoRA layers, no liger.
    checkpoint_layers (or the spec's) is speed balanced's k; balanced without one is planned as
    lean, the most the trainer's choice of k can need. On several GPUs (which the trainer refuses
    it on) optimizer_in_backward is planned off, with a note, so that suggestions of more GPUs
    stay plannable.
    """
    request = request_of(spec_like)
    shape = shape_of(config)
    chunk = TRAINER_LOSS_CHUNK_TOKENS if loss_chunk_tokens == "trainer" else loss_chunk_tokens
    if chunk == AUTO:
        chunk = trainer_chunk_tokens(shape.vocab)
    batch = batch_size if batch_size is not None else request.batch_size
    if batch == AUTO:
        raise ValueError("batch_size: give a number to estimate; 'auto' is resolved by plan()")
    resolved_speed = speed or request.spec.speed
    if resolved_speed == AUTO:
        raise ValueError("speed: give fast or lean to estimate; 'auto' is resolved by plan()")
    x = memory_inputs(request, method=method or request.method, batch_size=batch, speed=resolved_speed,
                      loss_chunk_tokens=chunk, **options)
    e = estimate(shape, x)
    in_backward = options.get("optimizer_in_backward")
    gpus = options.get("gpus", 1)
    if (request.spec.optimizer_in_backward if in_backward is None else in_backward) and gpus > 1:
        e = replace(e, notes=[*e.notes, f"optimizer_in_backward runs on one GPU: planned without it on {gpus} GPUs"])
    return e


def fewest_checkpoint_layers(spec_like: Any, config: Any, budget_bytes: float, **options: Any) -> int | None:
    """Speed balanced's k: the fewest checkpointed decoder layers (the most kept whole) whose
    estimate fits budget_bytes; None when not even all of them checkpointed fits."""
    shape = shape_of(config)
    request = request_of(spec_like)
    for k in range(shape.layers + 1):  # the estimate only shrinks as k grows (tested)
        if estimate_for_spec(request, shape, speed="balanced", checkpoint_layers=k, **options).total <= budget_bytes:
            return k
    return None
