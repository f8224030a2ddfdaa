"""The training recipe: a Run is set up, trains, evaluates and checkpoints as it goes, and exports.

    run = Run(spec, out_dir, accelerator, events)
    run.setup()          # data, model and method, optimizer, schedule, resume
    run.train()          # the loop: queue a step, read the one before, evaluate/checkpoint/pause when due
    metrics = run.export()

One step (accumulate, clip, step) is trainer.step; evaluation is trainer.evaluate; the eval block's
answers and scores (at every scheduled checkpoint and at the end) are trainer.answers, and with
export.select "best" final/ holds the weights of the step with the best score.

Metrics: `tokens` counts input tokens (padding excluded) over all ranks since the start,
`tokens_per_second` is that rate over the last logging interval; `trained_tokens` counts label
tokens, the ones the loss is taken over; `mfu` is model FLOPs per second over the GPUs' bf16 peak
(trainer.throughput; null on a CPU); `train_mean_token_accuracy` is the share of label tokens the
model predicted exactly, over the interval. How the loss is computed (chunked through the LM head,
or from whole logits) is trainer.fastpath's choice; the numbers are the same either way.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint as ckpt
from trainer import packed_attention, profiling
from trainer.answers import eval_pass, load_eval_set
from trainer.data.batch import collate
from trainer.data.dataset import load_tokenized, mix_in, pack
from trainer.distributed import gather_model_state, gather_training_state, is_sharded
from trainer.errors import ConfigError, Paused, TrainerError
from trainer.eval_settings import selection_metric
from trainer.evaluate import eval_sample, evaluate, forgetting_change
from trainer.events import EventWriter
from trainer.export import export_final
from trainer.fastpath import setup_model
from trainer.graders import best_step
from trainer.model import count_parameters, load_tokenizer, resolve_precision
from trainer.optim import build_optimizer
from trainer.optim_in_backward import OptimizerInBackward
from trainer.preference import PreferenceLoss, reference_for
from trainer.profiling import region
from trainer.sampler import DataOrder
from trainer.signals import StopFlags
from trainer.spec import JobSpec
from trainer.startup import (
    Phases,
    kernel_cache_added,
    kernel_cache_entries,
    skipped_libraries,
    standby_detail,
    warmup_seconds,
)
from trainer.step import QueuedStep, Window, as_values, optimizer_step, queue_forward_backward, step_result
from trainer.step_values import LateRead, pinned
from trainer.vocabulary import eval_scores
from trainer.throughput import mfu, model_flops, peak_flops

# Tests only: seconds to sleep after each step. A test that keeps a job running until it pauses,
# preempts or cancels it needs the trainer alive, not busy: at full speed each such trainer takes
# a whole CPU core from the rest of the run.
TEST_STEP_SLEEP_ENV = "TUNEQ_TEST_STEP_SLEEP_S"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    micro_step: int = 0  # global micro-batches consumed; the data position
    trained_tokens: int = 0
    seen_tokens: int = 0
    # The forgetting file's metrics before any training; a resumed run cannot measure them again.
    forgetting_before: dict[str, float] | None = None
    # The eval pass with the best export.metric so far: {"step", "score", "metrics"}; with
    # export.select best its checkpoint is kept from rotation, and its weights are exported.
    best: dict[str, Any] | None = None


def plan_steps(spec: JobSpec, order: DataOrder) -> tuple[int, int]:
    """(optimizer steps, micro-batches in total or 0 when max_steps bounds the run)."""
    hp = spec.hyperparameters
    if hp.max_steps is not None:
        return hp.max_steps, 0
    total_micro = order.micro_batches_per_epoch * hp.n_epochs
    return math.ceil(total_micro / hp.gradient_accumulation_steps), total_micro


def warmup_steps(spec: JobSpec, total_steps: int) -> int:
    hp = spec.hyperparameters
    if hp.warmup_steps is not None:
        return min(hp.warmup_steps, total_steps)
    return int(round(hp.warmup_ratio * total_steps))


def peak_memory_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


class Run:
    """One training run of a spec, from its files to final/ (see the module docstring)."""

    def __init__(self, spec: JobSpec, out_dir: Path, accelerator: Any, events: EventWriter, resume: bool = False,
                 flags: StopFlags | None = None):
        self.spec, self.out_dir, self.accelerator, self.events = spec, Path(out_dir), accelerator, events
        self.resume, self.flags = resume, flags or StopFlags()
        self.hp, self.schedule = spec.hyperparameters, spec.schedule
        self.device = accelerator.device
        self.is_main = accelerator.is_main_process
        self.started = time.time()
        self.state = TrainState()
        self.resumed_from: int | None = None
        self.last_metrics: dict[str, Any] = {}
        self.valid_metrics: dict[str, Any] = {}
        self.eval_metrics: dict[str, Any] = {}
        self.evaluated_step: int | None = None  # the step of the last eval pass
        self.select_by = selection_metric(spec)  # eval_<name>, or None: final/ holds the last weights
        self.phases = Phases()
        self.phases.mark("import")
        self.kernel_cache_before = kernel_cache_entries()

    # ---- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate.utils import set_seed

        set_seed(self.hp.seed)
        self.precision = resolve_precision(self.spec.precision, self.device)
        self.phases.note("device")
        self.tokenizer = load_tokenizer(self.spec.model)
        self.phases.note("tokenizer")
        self._setup_data()
        self.phases.note("pack")
        self.phases.mark("data")
        self._setup_training()
        self._resume()
        if self.forgetting_data is not None and self.state.forgetting_before is None:
            # Measured on the model as training starts (after the method, init_from and any resume), not on
            # the base: prefix tuning starts with random virtual tokens, a continued job from its parent's weights.
            self.state.forgetting_before = self.forgetting_pass()
        self.phases.mark("prepare")
        self._emit_start()

    def _load(self, path: str, what: str, data_format: str = "auto") -> Any:
        return load_tokenized(path, self.tokenizer, self.hp.max_seq_len, what, data_format, self.spec.train_on_inputs)

    def _setup_data(self) -> None:
        spec, hp = self.spec, self.hp
        # A preference objective reads its files as preference lines, whatever they look like.
        data_format = "preference" if spec.is_preference else spec.data_format
        self.train_data = self._load(spec.training_file, "training_file", data_format)
        self.valid_data = (self._load(spec.validation_file, "validation_file", data_format)
                           if spec.validation_file else None)
        for what, data in (("training_file", self.train_data), ("validation_file", self.valid_data)):
            if data is not None and data.format == "preference" and not spec.is_preference:
                raise ConfigError(f"{what}: holds preference pairs (preferred_output, non_preferred_output); "
                                  "train them with objective dpo, simpo or orpo")
        # Replay and general files may be in any format, whatever the task data is.
        mix_sources = [(self._load(m.file, f"mix[{k}].file").examples, m.weight) for k, m in enumerate(spec.mix)]
        self.forgetting_data = self._load(spec.forgetting_file, "forgetting_file") if spec.forgetting_file else None
        self.phases.note("files")
        self.tokens_cached = self.train_data.cached
        self.train_examples, self.mixed_counts = mix_in(self.train_data.examples, mix_sources, hp.seed)
        if spec.packing:
            self.train_examples = pack(self.train_examples, hp.max_seq_len)
        self.valid_sample = (eval_sample(self.valid_data.examples, self.schedule.eval_examples, hp.seed)
                             if self.valid_data else None)
        self.eval_set = load_eval_set(spec.eval.file, self.tokenizer, spec.eval) if spec.eval else None

    def _setup_training(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        spec, hp, accelerator, device = self.spec, self.hp, self.accelerator, self.device
        model, self.fast = setup_model(spec, self.precision, device, note=self.phases.note)
        self.phases.mark("load")
        # Packed rows' example bounds go to a flash kernel instead of a mask transformers builds.
        self.packed_attention = bool(spec.packing and packed_attention.available(device)
                                     and packed_attention.install(model))
        self.trainable_params, self.total_params = count_parameters(model)
        optimizer = build_optimizer(model, spec, device)
        self.in_backward = isinstance(optimizer, OptimizerInBackward)
        if self.in_backward and accelerator.num_processes > 1:
            raise ConfigError(f"optimizer_in_backward: runs on one GPU (this run has {accelerator.num_processes} "
                              "processes): DDP reduces gradients after the hooks that would update with them")
        self.order = DataOrder(len(self.train_examples), hp.batch_size, accelerator.num_processes,
                               accelerator.process_index, hp.seed)
        self.total_steps, self.total_micro = plan_steps(spec, self.order)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(spec, self.total_steps),
                                                         self.total_steps)
        # The scheduler stays outside prepare(): accelerate would step it once per process.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.model.train()
        self.raw_model = accelerator.unwrap_model(self.model)
        # The forgetting file is plain text or chat: its loss is the token loss whatever the objective.
        self.token_loss_head = self.fast.loss.for_prepared(self.model)
        self.loss_head = self.token_loss_head
        if spec.is_preference:
            if spec.objective == "dpo" and is_sharded(self.raw_model):
                raise ConfigError("strategy: DPO's frozen reference is a whole copy of the model, which sharded "
                                  "(fsdp) training does not keep; give strategy 'ddp', or objective simpo or orpo")
            compute_dtype = torch.bfloat16 if self.precision == "bf16" else None
            reference = reference_for(spec, self.raw_model, self.token_loss_head, compute_dtype)
            self.loss_head = PreferenceLoss(spec, self.token_loss_head, reference)
        self.flops, self.peak = model_flops(self.raw_model), peak_flops(device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.clip_to = hp.max_grad_norm if hp.max_grad_norm > 0 else float("inf")  # inf: measure, never clip
        # A checkpoint's data position counts global micro-batches, so it only means the same
        # examples under the same batch layout.
        every_epoch = self.schedule.checkpoint_every_epoch
        self.epoch_checkpoints = hp.max_steps is None if every_epoch is None else every_epoch
        self.layout = {"batch_size": hp.batch_size, "gradient_accumulation_steps": hp.gradient_accumulation_steps,
                       "world_size": accelerator.num_processes}

    def _resume(self) -> None:
        newest = ckpt.latest_checkpoint(self.out_dir) if self.resume else None
        if newest is None:
            return
        saved = ckpt.load_checkpoint(newest, self.raw_model, self.optimizer, self.scheduler,
                                     self.accelerator.process_index, self.device)
        for key, now in self.layout.items():
            if saved["layout"][key] != now:
                raise ConfigError(
                    f"{key}: checkpoint {newest.name} was made with {saved['layout'][key]}, this run has {now}; "
                    "resume with the same value"
                )
        self.state = TrainState(**saved["train_state"])
        self.resumed_from = self.state.step

    def _emit_start(self) -> None:
        spec, device, examples = self.spec, self.device, len(self.train_data.examples)
        micro_batches = self.total_micro or self.total_steps * self.hp.gradient_accumulation_steps
        self.events.emit(
            "start",
            f"{spec.method} on {examples} examples"
            + (f" + {sum(self.mixed_counts)} mixed in" if self.mixed_counts else "")
            + (f" packed into {len(self.train_examples)} rows" if spec.packing else "")
            + f", {self.total_steps} steps"
            + (f", resumed from step {self.resumed_from}" if self.resumed_from is not None else ""),
            total_steps=self.total_steps,
            examples=examples,
            epochs=round(self.order.epoch_of(micro_batches), 3),
            method=spec.method,
            device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            precision=self.precision,
            fast_path={**self.fast.describe(), "loss": self.loss_head.name, "optimizer_in_backward": self.in_backward,
                       "packed_attention": self.packed_attention},
            trainable_params=self.trainable_params,
            total_params=self.total_params,
            resumed_from_step=self.resumed_from,
            # Cut examples lose their ends; dropped ones had nothing trainable left within max_seq_len.
            truncated_examples=self.train_data.truncated,
            dropped_examples=self.train_data.dropped,
            data_format=self.train_data.format,
            mixed_examples=self.mixed_counts,
            packed_rows=len(self.train_examples) if spec.packing else None,
        )

    # ---- train --------------------------------------------------------------------------------

    def train(self) -> None:
        """The loop. A step is queued on the GPU and its values (loss, counts, votes, gradient norm)
        are read only after the next step has been queued (trainer.step_values): the host never
        waits for the GPU in the middle of training. So step N's metrics are emitted, and its votes
        acted on, after step N+1 is queued; before an evaluation, a checkpoint, a pause or the end,
        the step just queued is read too ("drained"), so that every event of a step precedes what
        follows it."""
        state = self.state
        self.window = Window(started=time.time())
        self.window_end: LateRead | None = None  # the last logged step's values: the window starts at its end
        # What setup made lives to the end: keep it out of the collector's full passes, whose
        # traversal of every live object would otherwise stall a step now and then.
        gc.collect()
        gc.freeze()
        self.last_saved_step = state.step if self.resumed_from is not None else -1
        self.last_saved_time = time.time()
        pending: QueuedStep | None = None  # queued, not read yet
        profiler = profiling.from_env(self.accelerator.process_index, self.device)
        trace = profiling.step_trace(self.accelerator.process_index, self.device,
                                     {"method": self.spec.method, "speed": self.spec.speed, "out": str(self.out_dir),
                                      "total_steps": self.total_steps})
        nap = float(os.environ.get(TEST_STEP_SLEEP_ENV) or 0)
        try:
            while state.step < self.total_steps:
                if profiler is not None:
                    profiler.before_step(state.step + 1)
                micro_before = state.micro_step
                trace.begin(state.step + 1)
                queued = self._queue_step()
                trace.queued(queued.step)
                if nap:
                    time.sleep(nap)
                # Read the step before this one, which the GPU has finished meanwhile.
                with region("log"):
                    votes = self._read(pending) if pending is not None else [False, False]
                trace.read()
                pending = queued
                if profiler is not None:
                    profiler.after_step(state.step)
                evaluating = self._evaluation_due()
                checkpoint_due = bool(self.schedule.checkpoint_every_steps
                                      and state.step % self.schedule.checkpoint_every_steps == 0)
                checkpoint_due |= self.epoch_checkpoints and self._epoch_ended(micro_before, state.micro_step)
                if not (evaluating or checkpoint_due or any(votes) or state.step == self.total_steps):
                    continue
                # Something follows this step: read it first, so its metrics come before it (and a
                # checkpoint holds the counts of the step it saves).
                votes = [a or b for a, b in zip(votes, self._read(pending))]
                pending = None
                if evaluating:
                    self.evaluate()
                # The ranks voted to pause or checkpoint in the all-reduce of this step or the one before.
                pause_voted, minutes_due = votes
                if checkpoint_due or minutes_due:
                    self.checkpoint()
                if pause_voted:
                    self._pause()
                if not self.window.input_tokens and state.step < self.total_steps:
                    self._restart_window()
        finally:
            profiling.stop()  # writes what a profiled range recorded, even a range cut short
            trace.close()

    def _epoch_ended(self, before: int, after: int) -> bool:
        """Whether the micro-batches of a step crossed the end of an epoch."""
        per_epoch = self.order.micro_batches_per_epoch
        return after // per_epoch > before // per_epoch

    def _queue_step(self) -> QueuedStep:
        """Collate, accumulate, clip and step: all queued on the device, nothing read."""
        state, hp = self.state, self.hp
        n_micro = hp.gradient_accumulation_steps
        if self.total_micro:
            n_micro = min(n_micro, self.total_micro - state.micro_step)
        pad_id = self.tokenizer.pad_token_id
        with region("collate"):
            micro_batches = [self._batch(state.micro_step + k, pad_id) for k in range(n_micro)]
        lr = self.scheduler.get_last_lr()[0]  # the rate this step is taken with
        with region("forward_backward"):
            packed = queue_forward_backward(self.model, micro_batches, self.accelerator, self.loss_head, self._votes)
        grad_norm = optimizer_step(self.accelerator, self.optimizer, self.trainable, self.clip_to, self.scheduler)
        state.step += 1
        state.micro_step += n_micro
        values = LateRead(torch.cat([packed, as_values(grad_norm, packed.device)]))
        return QueuedStep(state.step, state.micro_step, lr, values)

    def _batch(self, micro_step: int, pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate([self.train_examples[i] for i in self.order.indices(micro_step)], pad_id)
        if self.packed_attention:
            batch = packed_attention.with_bounds(batch)
        return pinned(batch, self.device)

    def _votes(self) -> list[bool]:
        # A signal reaches the ranks at slightly different times, and their clocks differ; pausing
        # and checkpointing are collectives, so one rank's wish decides for all, after the same step
        # (every rank reads the same reduced votes, after the same step).
        minutes = self.schedule.checkpoint_every_minutes
        return [self.flags.pause_requested, bool(minutes) and time.time() - self.last_saved_time >= minutes * 60]

    def _read(self, queued: QueuedStep) -> list[bool]:
        """Read a queued step's values: count its tokens, log it when due; returns its votes."""
        *values, grad_norm = queued.values.read()
        result = step_result(values)
        if queued.step == (self.resumed_from or 0) + 1:
            self._emit_startup()
        self.state.trained_tokens += result["label_tokens"]
        self.state.seen_tokens += result["input_tokens"]
        self.window.add(result)
        if queued.step % self.schedule.log_every_steps == 0 or queued.step == self.total_steps:
            self._log(queued, grad_norm)
        return result["votes"]

    def _emit_startup(self) -> None:
        self.phases.mark("first_step")
        took = self.phases.seconds()
        self.events.emit("startup", f"first step {self.phases.total():.1f} s after the process started: "
                         + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()),
                         phases=took, seconds=self.phases.total(), process_started=self.phases.started,
                         detail={**self.phases.detail, "device_ready": warmup_seconds(), **standby_detail(),
                        "kernel_cache_added": kernel_cache_added(self.kernel_cache_before),
                                 "tokens_cached": self.tokens_cached, "skipped_libraries": skipped_libraries()})

    def _log(self, queued: QueuedStep, grad_norm: float) -> None:
        # Not the time of this read: on a CPU the next step has already run by now, and the last
        # step would be read at once after the one before it.
        now = queued.values.ready_at
        window = self.window
        tokens_per_second = window.tokens_per_second(now, queued.values.seconds_since(self.window_end))
        self.last_metrics = {
            "step": queued.step,
            "total_steps": self.total_steps,
            "epoch": round(self.order.epoch_of(queued.micro_step), 4),
            **window.train_metrics(self.spec.is_preference),
            "learning_rate": queued.lr,
            "grad_norm": grad_norm,
            "tokens": self.state.seen_tokens,
            "tokens_per_second": tokens_per_second,
            "mfu": self._mfu(tokens_per_second, window.mean_row()),
            "peak_memory_bytes": peak_memory_bytes(self.device),
        }
        self.events.emit("metrics", f"step {queued.step}/{self.total_steps} loss {self.last_metrics['train_loss']:.4f}",
                         **self.last_metrics)
        self.window, self.window_end = Window(started=now), queued.values

    def _restart_window(self) -> None:
        """The next step's rate counts from now: an evaluation or a checkpoint just before it is
        reported in its own event, not as a slow step."""
        self.window = Window(started=time.time())
        self.window_end = LateRead(torch.zeros(1, device=self.device))

    def _mfu(self, tokens_per_second: float, mean_row: float) -> float | None:
        return mfu(self.flops, tokens_per_second, mean_row, self.peak, self.accelerator.num_processes)

    def _pause(self) -> None:
        """A checkpoint (unless this step has one), then Paused: the worker requeues the job."""
        print(f"trainer: pausing after step {self.state.step} (asked by {self.flags.source() or 'another rank'})",
              file=sys.stderr, flush=True)
        if self.last_saved_step != self.state.step:
            self.checkpoint(answer_eval=False)  # a pause is prompt: no eval pass
        raise Paused()

    # ---- evaluate -----------------------------------------------------------------------------

    def _evaluation_due(self) -> bool:
        every, step = self.schedule.eval_every_steps, self.state.step
        return self.valid_data is not None and self.valid_sample is not None and (
            bool(every and step % every == 0) or step == self.total_steps)

    def evaluate(self) -> None:
        """The validation sample every eval_every_steps; at the end also the whole file."""
        assert self.valid_data is not None and self.valid_sample is not None
        pad_id, batch, started = self.tokenizer.pad_token_id, self.hp.batch_size, time.time()
        metrics = evaluate(self.model, self.valid_sample, batch, pad_id, self.accelerator, loss_head=self.loss_head)
        if self.state.step == self.total_steps:
            if self.valid_sample is self.valid_data.examples:
                full = {f"full_{k}": v for k, v in metrics.items()}
            else:
                full = evaluate(self.model, self.valid_data.examples, batch, pad_id, self.accelerator, "full_valid",
                                self.loss_head)
            metrics = {**metrics, **full}
        self.valid_metrics = metrics
        self.events.emit("validation", f"step {self.state.step} valid loss {metrics['valid_loss']:.4f}",
                         step=self.state.step, seconds=round(time.time() - started, 3), **metrics)

    def forgetting_pass(self) -> dict[str, float]:
        assert self.forgetting_data is not None
        got = evaluate(self.model, self.forgetting_data.examples, self.hp.batch_size, self.tokenizer.pad_token_id,
                       self.accelerator, "forgetting", self.token_loss_head)
        return {"loss": got["forgetting_loss"], "perplexity": got["forgetting_perplexity"],
                "mean_token_accuracy": got["forgetting_mean_token_accuracy"]}

    def answer_eval(self) -> None:
        """The eval block's pass on the model as it is now: scores in an `eval` event, in the
        metrics of what follows (the checkpoint, final/), and the best step so far updated."""
        assert self.spec.eval is not None and self.eval_set is not None
        step = self.state.step
        installed = self.packed_attention
        if installed:
            packed_attention.uninstall(self.raw_model)  # generation uses a KV cache it does not handle
        try:
            got = eval_pass(self.raw_model, self.tokenizer, self.eval_set, self.spec.eval, self.accelerator,
                            self.hp.seed + step)
        finally:
            if installed:
                packed_attention.install(self.raw_model)
        samples = got.pop("samples")
        self.eval_metrics, self.evaluated_step = got, step
        scores = ", ".join(f"{k.removeprefix('eval_')} {v:.3f}" for k, v in eval_scores(got).items())
        self.events.emit("eval", f"step {step} eval: {scores} ({got['eval_examples']} answers in "
                         f"{got['eval_seconds']:.1f} s)", step=step, samples=samples, **got)
        if self.select_by is not None:
            best = self.state.best
            candidates = ([(best["step"], best["metrics"])] if best else []) + [(step, got)]
            chosen = best_step(candidates, self.select_by)
            if chosen is not None and (best is None or chosen[0] != best["step"]):
                self.state.best = {"step": chosen[0], "score": chosen[1], "metrics": got}

    # ---- checkpoint ---------------------------------------------------------------------------

    def checkpoint(self, answer_eval: bool = True) -> None:
        from accelerate.utils import gather_object

        if answer_eval and self.spec.eval is not None and self.evaluated_step != self.state.step:
            self.answer_eval()
        state, started = self.state, time.time()
        # Eval scores only of a pass on these weights (a pause saves without one).
        metrics = {**self.last_metrics, **self.valid_metrics,
                   **(self.eval_metrics if self.evaluated_step == state.step else {})}
        rngs = gather_object([ckpt.rng_state()])
        full_state = gather_training_state(self.raw_model, self.optimizer)  # FSDP: every rank gathers, rank 0 keeps
        if self.is_main:
            extra = {"train_state": asdict(state), "layout": self.layout,
                     "epoch": self.order.epoch_of(state.micro_step), "metrics": metrics}
            path = ckpt.save_checkpoint(self.out_dir, state.step, self.raw_model, self.optimizer, self.scheduler,
                                        extra, rngs, self.schedule.keep_checkpoints, full_state=full_state,
                                        protect=state.best["step"] if state.best else None)
            self.events.emit("checkpoint", f"checkpoint at step {state.step}", step=state.step,
                             epoch=round(extra["epoch"], 3),
                             path=str(path.relative_to(self.out_dir)), metrics=metrics,
                             seconds=round(time.time() - started, 3))
        self.accelerator.wait_for_everyone()
        self.last_saved_step, self.last_saved_time = state.step, time.time()

    # ---- export -------------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        """The forgetting pass after training, final/ (adapter, merged model, metrics), "finished"."""
        from accelerate.utils import gather_object

        state, accelerator = self.state, self.accelerator
        forgetting = self._forgetting_after()
        if self.spec.eval is not None and self.evaluated_step != state.step:
            self.answer_eval()
        exported = self._select_weights()
        final_metrics = {
            "steps": state.step,
            "train_loss": self.last_metrics.get("train_loss"),
            "trained_tokens": state.trained_tokens,
            "tokens": state.seen_tokens,
            "runtime_s": round(time.time() - self.started, 3),
            **self.valid_metrics,
            **forgetting,
            **exported,
        }
        # Each rank's peak GPU memory (null on a CPU): a job across hosts reports it per host.
        peak = peak_memory_bytes(self.device)
        peaks = gather_object([peak]) if accelerator.num_processes > 1 else [peak]
        accelerator.wait_for_everyone()
        packed_attention.uninstall(self.raw_model)  # export may generate, with a cache it does not handle
        whole = gather_model_state(self.raw_model) if is_sharded(self.raw_model) else None  # FSDP: a collective
        if self.is_main:
            export_final(self.out_dir, self.raw_model, self.tokenizer, self.spec, final_metrics, self.events,
                         self.precision, state_dict=whole)
        accelerator.wait_for_everyone()
        self.events.emit("finished", f"finished after {state.step} steps"
                         + (f", exported the weights of step {exported['exported_step']}" if self.select_by else ""),
                         step=state.step, exported_step=exported["exported_step"],
                         train_loss=final_metrics["train_loss"], trained_tokens=state.trained_tokens,
                         final_dir="final", metrics=final_metrics, peak_memory_bytes_by_rank=peaks)
        return final_metrics

    def _select_weights(self) -> dict[str, Any]:
        """With export.select best, load the best step's weights from its checkpoint (unless that
        is the last step); the step exported and, with an eval block, the exported weights' scores."""
        best, step = self.state.best, self.state.step
        if self.select_by is None or best is None or best["step"] == step:
            metrics = self.eval_metrics if self.select_by is None or best is None else best["metrics"]
            return {"exported_step": step, **metrics,
                    **({"export_metric": self.select_by, "export_score": best["score"]} if best else {})}
        directory = ckpt.checkpoint_path(self.out_dir, best["step"])
        if not (directory / ckpt.STATE_FILE).is_file():
            raise TrainerError(f"export.select: the checkpoint of step {best['step']}, the best by {self.select_by}, "
                               "is missing from this host; final/ cannot hold its weights")
        ckpt.load_weights(self.raw_model, directory, self.device)
        print(f"trainer: exporting the weights of step {best['step']} ({self.select_by} {best['score']:.4f})",
              file=sys.stderr, flush=True)
        return {"exported_step": best["step"], **best["metrics"], "export_metric": self.select_by,
                "export_score": best["score"]}

    def _forgetting_after(self) -> dict[str, Any]:
        before = self.state.forgetting_before
        if self.forgetting_data is None or before is None:
            return {}
        after = self.forgetting_pass()
        forgetting = forgetting_change(before, after)
        self.events.emit(
            "forgetting",
            f"general loss {before['loss']:.4f} -> {after['loss']:.4f} "
            f"(perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f})",
            step=self.state.step, examples=len(self.forgetting_data.examples), before=before, after=after,
            **forgetting,
        )
        return forgetting


def train(spec: JobSpec, out_dir: Path, accelerator: Any, events: EventWriter, resume: bool = False,
          flags: StopFlags | None = None) -> dict[str, Any]:
    """Set up, train and export a run of `spec`; its final metrics."""
    run = Run(spec, out_dir, accelerator, events, resume, flags)
    run.setup()
    run.train()
    return run.export()
