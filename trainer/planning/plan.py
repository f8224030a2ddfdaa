"""Will a job fit on its GPUs, with what, and how long will it take.

The API calls `plan()` when a job is submitted, before any GPU is touched. Method "auto" takes
the first of AUTO_METHODS that fits; speed "auto" takes fast when it fits (with batch_size
"auto": at a micro-batch of AUTO_FAST_MIN_BATCH or more), else the fewest checkpointed layers
that fit (balanced), else lean; batch_size "auto" takes the largest power of two up to
AUTO_BATCH_MAX that fits. On several GPUs adapters run DDP, full and freeze FSDP unless the spec
(or `strategy`) says ddp. A requested method that does not fit is refused with a message that
names what would fit, with numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Any, Literal

from trainer.planning.compute import (ComputeEstimate, checkpoint_bytes, checkpoints_before_last, estimate_compute,
                                      eval_pass_seconds)
from trainer.planning.speeds import checkpoint_seconds, setting_key, speed_for, startup_seconds, stored_weight_bytes
from trainer.planning.memory import MemoryEstimate
from trainer.planning.request import AUTO, PlanRequest, estimate_for_spec, request_of
from trainer.planning.shape import Shape, gib, shape_of
from trainer.planning.suggest import suggest
from trainer.spec import METHODS, WHOLE_WEIGHT_METHODS, FullPrecision, JobSpec, Optimizer

# The ladder method "auto" walks down: the most capable method that fits.
AUTO_METHODS: tuple[str, ...] = ("full", "lora", "qlora")
AUTO_BATCH_MAX = 64
# With batch_size "auto" and speed "auto", fast (no checkpointing) is taken only when it fits at
# this micro-batch or more: a GPU that fits fast only at batch 1 or 2 is better used lean.
AUTO_FAST_MIN_BATCH = 4
DEFAULT_MARGIN = 0.10


@dataclass(frozen=True)
class MethodPlan:
    method: str
    batch_size: int | None  # None: not even batch 1 fits (auto batch)
    fits: bool
    headroom_bytes: int  # usable memory minus the estimate's total; negative when it does not fit
    estimate: MemoryEstimate
    speed: str = "fast"  # fast: no gradient checkpointing; lean: checkpointing; balanced: the bottom k layers
    strategy: str = "single"  # single, ddp or fsdp
    checkpoint_layers: int | None = None  # speed balanced's k

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["estimate"] = self.estimate.to_dict()
        d["gradient_checkpointing"] = self.speed in ("lean", "balanced")
        return d


@dataclass(frozen=True)
class Plan:
    model: dict[str, Any]
    gpu_memory_bytes: int
    gpus: int
    strategy: str  # of the chosen method (or of the requested one when refused)
    margin: float
    usable_bytes: int
    requested_method: str
    requested_batch_size: int | str
    requested_speed: str
    seq_len: int
    gradient_checkpointing: bool
    methods: dict[str, MethodPlan]
    method: str | None  # chosen; None when refused
    batch_size: int | None
    speed: str | None
    fits: bool
    message: str
    suggestions: list[dict[str, Any]]
    compute: ComputeEstimate | None

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["methods"] = {k: v.to_dict() for k, v in self.methods.items()}
        d["compute"] = self.compute.to_dict() if self.compute is not None else None
        return d


def choose_method(methods: Mapping[str, MethodPlan]) -> str | None:
    """For method "auto": full fine-tuning when it fits, else LoRA, else QLoRA, else None."""
    for m in AUTO_METHODS:
        if m in methods and methods[m].fits:
            return m
    return None


def resolve_strategy(method: str, gpus: int, strategy: str) -> str:
    """How the trainer spreads `method` over the GPUs (trainer.distributed.resolve_strategy):
    auto is FSDP for full and freeze, DDP for adapters; adapters never shard."""
    if gpus == 1 or method not in WHOLE_WEIGHT_METHODS:
        return "ddp"  # on one GPU neither replicates nor shards anything
    return "fsdp" if strategy == "auto" else strategy


class Search:
    """Estimates of one job on one kind of GPU, and the search over speeds and batch sizes."""

    def __init__(self, request: PlanRequest, shape: Shape, usable: int, gpus: int, options: dict[str, Any]):
        self.request, self.shape, self.usable, self.gpus, self.options = request, shape, usable, gpus, options
        self.spec = request.spec

    def estimate(self, method: str, batch: int, *, speed: str | None = None, seq: int | None = None,
                 gpus: int | None = None, strategy: str = "ddp", layers: int | None = None) -> MemoryEstimate:
        """The job's estimate with these changes; speed defaults to the spec's where it is concrete."""
        if speed is None:
            speed = self.spec.speed if self.spec.speed in ("lean", "balanced") else "fast"
        return estimate_for_spec(self.request, self.shape, method=method, batch_size=batch, speed=speed,
                                 seq_len=seq, gpus=gpus or self.gpus, strategy=strategy, checkpoint_layers=layers,
                                 **self.options)

    def balanced(self, method: str, batch: int, strategy: str) -> MemoryEstimate:
        """Balanced with the spec's k, else the fewest checkpointed layers that fit (all when none
        does), as the trainer resolves it on the GPU."""
        k = self.spec.checkpoint_layers
        if k is None:
            for k in range(self.shape.layers + 1):  # the estimate only shrinks as k grows
                e = self.estimate(method, batch, speed="balanced", strategy=strategy, layers=k)
                if e.total <= self.usable:
                    return e
        return self.estimate(method, batch, speed="balanced", strategy=strategy, layers=k)

    def at_speed(self, method: str, batch: int, speed: str, strategy: str) -> MemoryEstimate:
        if speed == "balanced":
            return self.balanced(method, batch, strategy)
        return self.estimate(method, batch, speed=speed, strategy=strategy)

    def method_plan(self, method: str, speed: str, strategy: str, min_batch: int) -> MethodPlan:
        """`method` at `speed`: at the requested batch, or the largest power of two from min_batch up
        that fits (batch_size "auto")."""
        label = strategy if self.gpus > 1 else "single"
        if self.request.batch_size != AUTO:
            batch = int(self.request.batch_size)
            e = self.at_speed(method, batch, speed, strategy)
            return MethodPlan(method, batch, e.total <= self.usable, self.usable - e.total, e, speed, label)
        chosen, e = None, self.at_speed(method, 1, speed, strategy)
        batch = AUTO_BATCH_MAX
        while batch >= min_batch:
            tried = self.at_speed(method, batch, speed, strategy)
            if tried.total <= self.usable:
                chosen, e = batch, tried
                break
            batch //= 2
        return MethodPlan(method, chosen, chosen is not None, self.usable - e.total, e, speed, label)

    def best(self, method: str, strategy: str) -> MethodPlan:
        """The first speed of `method` that fits, with its batch; else the leanest try."""
        # speed auto, as the trainer resolves it: fast when it fits, else the fewest checkpointed
        # layers that fit (balanced), else all of them (lean). Prefix tuning's past key/values
        # bypass checkpointing: the trainer refuses it there.
        speeds = ["fast", "balanced", "lean"] if self.spec.speed == AUTO else [self.spec.speed]
        if method == "prefix":
            speeds = ["fast"]
        last = None
        for speed in speeds:
            # Under auto, keeping activations only pays at a useful micro-batch.
            keeps = speed in ("fast", "balanced") and len(speeds) > 1
            mp = self.method_plan(method, speed, strategy, AUTO_FAST_MIN_BATCH if keeps else 1)
            k = mp.estimate.checkpoint_layers
            if speed == "balanced" and len(speeds) > 1 and not 0 < k < self.shape.layers:
                continue  # all or none checkpointed: that is lean or fast, tried on their own
            if speed == "balanced":
                mp = replace(mp, checkpoint_layers=k)
            if mp.fits:
                return mp
            last = mp
        assert last is not None
        return last


def min_gpu_memory_bytes(spec_like: PlanRequest | JobSpec | Mapping[str, Any], config: Any, gpus: int = 1, *,
                         margin: float = DEFAULT_MARGIN, strategy: Literal["auto", "ddp", "fsdp"] | None = None) -> int:
    """The least memory per GPU the job's method fits in, headroom included: at batch 1 when its
    batch_size is "auto" (each host picks its own), at speed lean when its speed is "auto" (the
    trainer picks it on the GPU). A GPU with less cannot run the job; one with this much can."""
    request = request_of(spec_like)
    method = request.method
    if method == AUTO:
        raise ValueError("method: give the chosen method; 'auto' is resolved by plan()")
    speed = request.spec.speed
    if method == "prefix":
        speed = "fast"  # its past key/values bypass checkpointing (see Search.best)
    elif speed == AUTO:
        speed = "lean"
    batch = 1 if request.batch_size == AUTO else int(request.batch_size)
    e = estimate_for_spec(request, config, method=method, batch_size=batch, speed=speed, gpus=gpus,
                          strategy=resolve_strategy(method, gpus, strategy or request.spec.strategy))
    return int(e.total / (1 - margin)) + 1


def plan(
    spec_like: PlanRequest | JobSpec | Mapping[str, Any],
    config: Any,
    gpu_memory_bytes: int,
    gpus: int = 1,
    dataset_tokens: int | None = None,
    *,
    margin: float = DEFAULT_MARGIN,
    strategy: Literal["auto", "ddp", "fsdp"] | None = None,
    optimizer: Optimizer | None = None,
    full_precision: FullPrecision | None = None,
    padded: bool = True,
    autocast: bool | None = None,
    loss_chunk_tokens: int | None | Literal["trainer"] = "trainer",
    peak_tflops: float | None = None,
    efficiency: float | None = None,
    liger: bool | None = None,
    gpu_model: str | None = None,
    warm_start: bool | Callable[[str], bool] = False,
) -> Plan:
    """Estimate every method for this job on `gpus` GPUs of `gpu_memory_bytes` each, pick one.

    A setting fits when its total stays under (1 - margin) of the GPU's memory. Unset keywords
    (None, "trainer") mean: as the spec says, else as the trainer runs. liger: whether the GPU
    hosts run liger's kernels (the API cannot see it; unset plans without them, which errs high).
    gpu_model: the GPU's name, for the time estimate's measured efficiencies (trainer.planning.speeds).
    warm_start: a one-process job starts in a trainer whose imports are done (the service's template
    or standby trainers): its start-up is the warm one measured from submission. A callable answers
    it per method (the template cannot take a job that needs bitsandbytes).
    """
    if gpu_memory_bytes <= 0:
        raise ValueError("gpu_memory_bytes must be positive")
    if not 0 <= margin < 1:
        raise ValueError(f"margin: {margin} is outside [0, 1)")
    request = request_of(spec_like)
    spec, target = request.spec, request.method
    if target not in (*METHODS, AUTO):
        raise ValueError(f"method: {target!r} is not one of {', '.join(METHODS)}, auto")
    shape = shape_of(config)
    usable = int(gpu_memory_bytes * (1 - margin))
    options = {"optimizer": optimizer, "full_precision": full_precision, "autocast": autocast,
               "loss_chunk_tokens": loss_chunk_tokens, "padded": padded, "liger": liger}
    search = Search(request, shape, usable, gpus, options)

    candidates = list(AUTO_METHODS)
    if target not in (AUTO, *AUTO_METHODS):
        candidates.append(target)
    methods = {m: search.best(m, resolve_strategy(m, gpus, strategy or spec.strategy)) for m in candidates}
    if target == AUTO:
        chosen = choose_method(methods)
    else:
        chosen = target if methods[target].fits else None
    # What the plan shows: the chosen method, else the one asked for (qlora, the leanest, for auto).
    focus = chosen or (target if target != AUTO else "qlora")
    shown = methods[focus]
    seq_len = spec.hyperparameters.max_seq_len

    suggestions: list[dict[str, Any]] = []
    headroom = f"{gib(usable)} usable ({gib(gpu_memory_bytes)} less {margin:.0%} headroom)"
    over = f", {shown.strategy.upper()} over {gpus} GPUs" if gpus > 1 else ""
    if chosen is not None:
        layers = (f" (bottom {shown.checkpoint_layers} of {shape.layers} layers checkpointed)"
                  if shown.speed == "balanced" else "")
        message = (f"{chosen} fits: {gib(shown.estimate.total)} per GPU of {headroom} at batch_size "
                   f"{shown.batch_size}, max_seq_len {seq_len}, speed {shown.speed}{layers}{over}")
    else:
        batch = 1 if request.batch_size == AUTO else int(request.batch_size)
        suggestions = suggest(search, focus, batch, shown.speed)
        what = f"{focus} fine-tuning" if target != AUTO else "no method (full, lora or qlora)"
        message = (
            f"{what} of this {shape.total_params / 1e9:.2f}B-parameter model does not fit: "
            f"{focus} needs {gib(shown.estimate.total)} per GPU at batch_size {batch}, max_seq_len {seq_len}, "
            f"speed {shown.speed} (gradient_checkpointing {str(shown.speed != 'fast').lower()}){over}"
            f"; usable is {gib(usable)} ({gib(gpu_memory_bytes)} less {margin:.0%} headroom)."
        )
        if suggestions:
            message += " What would fit: " + "; ".join(s["text"] for s in suggestions) + "."
        else:
            message += " Nothing within reach fits: use a GPU with more memory or a smaller model."

    compute = None
    if chosen is not None and (dataset_tokens is not None or _steps_fixed(request)):
        compute = _compute(request, shape, shown, gpus, dataset_tokens, peak_tflops, efficiency, gpu_model,
                           warm_start)
    return Plan(
        model={"model_type": shape.model_type, "params": shape.total_params, "layers": shape.layers,
               "hidden": shape.hidden, "vocab": shape.vocab, "tied": shape.tied},
        gpu_memory_bytes=int(gpu_memory_bytes),
        gpus=gpus,
        strategy=shown.strategy,
        margin=margin,
        usable_bytes=usable,
        requested_method=target,
        requested_batch_size=request.batch_size,
        requested_speed=spec.speed,
        seq_len=seq_len,
        gradient_checkpointing=shown.speed != "fast",
        methods=methods,
        method=chosen,
        batch_size=shown.batch_size if chosen else None,
        speed=shown.speed if chosen else None,
        fits=chosen is not None,
        message=message,
        suggestions=suggestions,
        compute=compute,
    )


def _steps_fixed(request: PlanRequest) -> bool:
    """Whether the job's steps and checkpoints are known without its file's token count: max_steps
    fixes the steps, and no checkpoint is asked at an epoch's end (which the count places). A plan
    asked while the file's check still counts its tokens is then timed all the same."""
    return request.hp.max_steps is not None and not request.spec.schedule.checkpoint_every_epoch


def _compute(request: PlanRequest, shape: Shape, chosen: MethodPlan, gpus: int, dataset_tokens: int | None,
             peak_tflops: float | None, efficiency: float | None, gpu_model: str | None = None,
             warm_start: bool | Callable[[str], bool] = False) -> ComputeEstimate:
    """The chosen setting's FLOPs and time: at the efficiency measured for this GPU model and setting
    (trainer.planning.speeds) where known, plus the start-up measured there and the checkpoints
    written before the last step at that host's measured rate (a stated default where unmeasured)."""
    hp = request.hp
    measured = None
    if efficiency is None and gpu_model:
        measured = speed_for(gpu_model, setting_key(chosen.method, chosen.speed, request.spec.full_precision))
    warm = gpus == 1 and (warm_start(chosen.method) if callable(warm_start) else warm_start)
    stored = stored_weight_bytes(shape.total_params)
    startup, startup_source = startup_seconds(gpu_model, stored, warm=warm) if gpu_model else (0.0, "")
    tokens = (dataset_tokens or 0) * hp.n_epochs
    if hp.max_steps is not None:
        tokens = hp.max_steps * hp.gradient_accumulation_steps * gpus * (chosen.batch_size or 1) * hp.max_seq_len
    freeze = request.spec.freeze
    steps, per_epoch = _steps(request, chosen, gpus, tokens, dataset_tokens)
    passes, per_pass = _eval_passes(request, shape, chosen, gpus, steps)
    saved = checkpoint_bytes(chosen.estimate)
    each, rate_source = checkpoint_seconds(gpu_model, saved)
    return estimate_compute(
        shape, method=chosen.method, tokens=tokens, gpus=gpus, seq_len=hp.max_seq_len,
        gradient_checkpointing=chosen.speed == "lean", lora=request.spec.lora,
        freeze_layers=freeze.trainable_layers if freeze is not None else None,
        peak_tflops=measured.peak_tflops if measured else peak_tflops,
        efficiency=measured.efficiency if measured else efficiency,
        startup_seconds=round(startup, 1), startup_source=startup_source, efficiency_source=measured.source if measured else "",
        eval_passes=passes, eval_seconds_per_pass=per_pass,
        checkpoints=_scheduled_checkpoints(request, steps, per_epoch),
        checkpoint_every_minutes=request.spec.schedule.checkpoint_every_minutes,
        checkpoint_seconds_each=each, checkpoint_bytes_each=saved, checkpoint_source=rate_source,
    )


def _steps(request: PlanRequest, chosen: MethodPlan, gpus: int, tokens: int,
           dataset_tokens: int | None) -> tuple[int, Fraction | None]:
    """(optimizer steps, steps per epoch: None while the file's tokens are not counted). Without
    max_steps the steps are counted as if every row were max_seq_len tokens long (fewer than a file
    of shorter examples takes)."""
    hp = request.hp
    per_step = max(1, (chosen.batch_size or 1) * hp.gradient_accumulation_steps * gpus * hp.max_seq_len)
    steps = hp.max_steps or max(1, tokens // per_step)
    return steps, (Fraction(max(1, dataset_tokens), per_step) if dataset_tokens is not None else None)


def _scheduled_checkpoints(request: PlanRequest, steps: int, per_epoch: Fraction | None) -> int:
    """Checkpoints before the last step, as the trainer schedules them (trainer.loop): every
    checkpoint_every_steps, and at each epoch's end when checkpoint_every_epoch says so (unset: when
    the run is counted in epochs, that is without max_steps)."""
    schedule, hp = request.spec.schedule, request.hp
    every_epoch = hp.max_steps is None if schedule.checkpoint_every_epoch is None else schedule.checkpoint_every_epoch
    epoch_ends: list[int] = []
    if every_epoch:
        epochs = hp.n_epochs - 1 if hp.max_steps is None else math.floor((steps - 1) / per_epoch)
        epoch_ends = [math.ceil(k * per_epoch) for k in range(1, min(epochs, steps) + 1)]
    return checkpoints_before_last(steps, schedule.checkpoint_every_steps, epoch_ends)


def _eval_passes(request: PlanRequest, shape: Shape, chosen: MethodPlan, gpus: int, steps: int) -> tuple[int, float]:
    """(eval passes, seconds of each) of the spec's eval block: one per scheduled checkpoint and
    one at the end; eval.max_examples prompts each."""
    block = request.spec.eval
    if block is None:
        return 0, 0.0
    every = request.spec.schedule.checkpoint_every_steps
    passes = (steps // every + (steps % every != 0)) if every else 1
    per_pass = eval_pass_seconds(shape, method=chosen.method, prompts=block.max_examples,
                                 batch_size=block.batch_size, max_new_tokens=block.max_new_tokens, gpus=gpus)
    return passes, per_pass
