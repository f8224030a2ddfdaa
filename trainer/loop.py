"""The training recipe: setup -> loop (accumulate, clip, step, log, eval, checkpoint) -> export.

Loss normalisation. A step's loss is the mean over every trained (label) token of all its
micro-batches on all ranks: sum of token losses / total label tokens of the window. Averaging
per-micro-batch means instead would weight a token in a short example more than one in a long
example, and make the result depend on how a batch happens to be split. The window's token count
is known before its forward passes (labels are data): one process scales each micro-batch's summed
loss by 1 / total_tokens before backward. Several processes back-propagate the summed losses and
multiply the averaged gradients by world_size / total_tokens once the step's single all-reduce
(counts, loss sums, pause and checkpoint votes together) has told them total_tokens.

Packing changes none of this: a packed row's label tokens are its examples' label tokens, and
the attention never crosses an example boundary, so a step's loss is the same token mean.

Metrics: `tokens` counts input tokens (padding excluded) over all ranks since the start,
`tokens_per_second` is that rate over the last logging interval; `trained_tokens` counts label
tokens, the ones the loss is taken over; `mfu` is model FLOPs per second over the GPUs' bf16 peak
(trainer.throughput; null on a CPU); `train_mean_token_accuracy` is the share of label tokens the
model predicted exactly, over the interval. How the loss is computed (chunked through the LM head,
or from whole logits) is trainer.fastpath's choice; the numbers are the same either way.

Evaluation follows OpenAI's names: every eval_every_steps a pass over a fixed sample of the
validation file (`valid_loss`, `valid_mean_token_accuracy`, `valid_perplexity`), and at the end
a pass over all of it (`full_valid_*`). Forgetting is the loss on a general held-out file
(`forgetting_file`) before and after training: how much of what the base model knew is lost.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trainer import checkpoint as ckpt
from trainer.data import IGNORE_INDEX, collate, load_tokenized, mix_in, model_inputs, pack
from trainer.distributed import gather_model_state, gather_training_state, is_sharded, scale_gradients, sum_over_ranks
from trainer.errors import ConfigError, Paused
from trainer.events import EventWriter
from trainer.export import export_final
from trainer.eval_mode import evaluation
from trainer.fastpath import setup_model
from trainer.loss_heads import LossHead, PlainLoss, token_loss_sum  # noqa: F401 - token_loss_sum: tests
from trainer.optim import build_optimizer
from trainer.optim_in_backward import OptimizerInBackward
from trainer import profiling
from trainer.profiling import region
from trainer.model import count_parameters, load_tokenizer, resolve_precision
from trainer.throughput import mfu, model_flops, peak_flops
from trainer.sampler import DataOrder
from trainer.signals import StopFlags
from trainer.step_values import LateRead, pinned
from trainer.spec import JobSpec


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    micro_step: int = 0  # global micro-batches consumed; the data position
    trained_tokens: int = 0
    seen_tokens: int = 0
    # The forgetting file's metrics before any training; a resumed run cannot measure them again.
    forgetting_before: dict[str, float] | None = None


@dataclass
class QueuedStep:
    """A step whose work is queued on the device; its values are read one step later."""

    step: int
    micro_step: int
    lr: float
    values: LateRead  # STEP_VALUES, the votes, then the gradient norm


def as_values(norm: Any, device: torch.device) -> torch.Tensor:
    """The gradient norm as one float64 element to append to a step's values, on `device`.
    FSDP's norm is a DTensor; its full value is what float() used to read (the same collective)."""
    if not isinstance(norm, torch.Tensor):
        return torch.tensor([float(norm)], dtype=torch.float64, device=device)
    full = getattr(norm, "full_tensor", None)
    if callable(full):
        norm = full()
    # Without gradients torch answers a CPU zero; the norm of real gradients is already there.
    return norm.detach().reshape(1).to(device=device, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Pieces of one step, separate so that tests can drive them directly


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def queue_forward_backward(
    model: Any, micro_batches: list[dict[str, torch.Tensor]], accelerator: Any, loss_head: LossHead | None = None,
    votes: Callable[[], list[bool]] | None = None,
) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step, without waiting for the GPU.

    Returns the step's values summed over ranks, still on the device: [loss sum, correct tokens,
    label tokens, input tokens, rows, *votes] (see STEP_VALUES; read them with step_result).
    Gradients equal those of one big batch holding all micro-batches of all ranks. loss_head:
    how a micro-batch becomes its loss (trainer.loss_heads; default the plain full-logits loss).
    votes: flags asked for after the backward pass; vote i is non-zero when any rank's flag i is
    set (they ride in the step's one all-reduce).

    One process scales each micro-batch's summed loss by 1 / label tokens before backward, as
    the module docstring says. Several processes back-propagate the summed losses and learn the
    window's label tokens of all ranks in the step's single all-reduce, together with the loss
    sums and the votes; the averaged gradients are then multiplied by world_size / label tokens:
    the same gradients, with one collective per step instead of one before and one after backward.
    That factor is a device tensor, so the optimizer step is queued before the total is known here.
    """
    device = accelerator.device
    loss_head = loss_head or PlainLoss()
    world = accelerator.num_processes
    # The counts come from the host's copy of the batch: no device value is read for them.
    local = [float(sum(count_label_tokens(mb) for mb in micro_batches)),
             float(sum(int(mb["attention_mask"].sum()) for mb in micro_batches)),
             float(sum(int(mb["input_ids"].shape[0]) for mb in micro_batches))]
    scale = 1.0 / max(local[0], 1.0) if world == 1 else 1.0
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, correct tokens
    for i, mb in enumerate(micro_batches):
        # Gradients are all-reduced only after the last micro-batch of the window.
        sync = nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            summed, _, correct = loss_head(model, mb, device)
            accelerator.backward(summed * scale if world == 1 else summed)
        totals += torch.stack([summed.detach().double(), correct.double()])
    wanted = [float(bool(v)) for v in votes()] if votes is not None else []
    with region("all_reduce"):
        packed = sum_over_ranks(totals, local + wanted, accelerator)
    if world > 1:
        scale_gradients(model, world / packed[2].clamp(min=1.0))
    return packed


def optimizer_step(accelerator: Any, optimizer: Any, trainable: list[torch.Tensor], clip_to: float,
                   scheduler: Any = None) -> torch.Tensor:
    """Clip, step, zero the gradients; the step's gradient norm, on the device (not read here).

    With optimizer_in_backward the layers were stepped in backward, before the whole gradient
    existed: nothing is clipped, and the norm is the one the optimizer summed on the way."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    in_backward = isinstance(inner, OptimizerInBackward)
    if not in_backward:
        with region("clip"):
            grad_norm = accelerator.clip_grad_norm_(trainable, clip_to)
    with region("optimizer"):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return inner.take_grad_norm() if in_backward else grad_norm


# The order of queue_forward_backward's values.
STEP_VALUES = ("loss_sum", "correct_tokens", "label_tokens", "input_tokens", "rows")


def step_result(values: list[float]) -> dict[str, Any]:
    """The host's view of a step's values: counts as ints, votes as bools (after the named ones)."""
    named = dict(zip(STEP_VALUES, values))
    return {"loss_sum": named["loss_sum"], "label_tokens": int(named["label_tokens"]),
            "input_tokens": int(named["input_tokens"]), "correct_tokens": int(named["correct_tokens"]),
            "rows": int(named["rows"]), "votes": [v > 0 for v in values[len(STEP_VALUES):]]}


def forward_backward(
    model: Any, micro_batches: list[dict[str, torch.Tensor]], accelerator: Any, loss_head: LossHead | None = None,
    votes: Callable[[], list[bool]] | None = None,
) -> dict[str, Any]:
    """queue_forward_backward, read at once (tests, benches): the step's token-mean loss is
    result["loss_sum"] / result["label_tokens"]; result["votes"][i] is True when any rank's flag i is."""
    return step_result(queue_forward_backward(model, micro_batches, accelerator, loss_head, votes).tolist())


def perplexity(loss: float) -> float:
    # exp overflows a float beyond ~709; a loss that high means "no idea" either way.
    return math.exp(min(loss, 700.0))


@torch.no_grad()
def evaluate(
    model: Any, examples: list[dict], batch_size: int, pad_id: int, accelerator: Any, prefix: str = "valid",
    loss_head: LossHead | None = None,
) -> dict[str, float]:
    """Token-mean loss, next-token accuracy and perplexity over `examples`, sharded by rank."""
    with evaluation(model):
        totals = _evaluation_totals(model, examples, batch_size, pad_id, accelerator, loss_head)
    n = max(float(totals[2]), 1.0)
    loss = float(totals[0]) / n
    return {f"{prefix}_loss": loss, f"{prefix}_mean_token_accuracy": float(totals[1]) / n,
            f"{prefix}_perplexity": perplexity(loss)}


def _evaluation_totals(model: Any, examples: list[dict], batch_size: int, pad_id: int, accelerator: Any,
                       loss_head: LossHead | None) -> torch.Tensor:
    """(loss sum, correct tokens, label tokens) over all ranks."""
    device = accelerator.device
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, tokens
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    # Under FSDP every forward is a collective: a rank with one batch fewer runs a discarded one.
    n_batches = math.ceil(math.ceil(len(examples) / accelerator.num_processes) / batch_size)
    for i in range(0, n_batches * batch_size, batch_size):
        if not mine[i : i + batch_size]:
            model(**model_inputs(collate(examples[:1], pad_id), device))
            continue
        batch = collate(mine[i : i + batch_size], pad_id)
        loss, n, correct = (loss_head or PlainLoss())(model, batch, device)
        totals += torch.stack([loss.double(), correct.double(), n.double()])
    return accelerator.reduce(totals, "sum")


def eval_sample(examples: list[dict], size: int, seed: int) -> list[dict]:
    """A fixed, seeded sample for the periodic pass, so its values compare across steps."""
    if len(examples) <= size:
        return examples
    import numpy as np

    chosen = np.random.default_rng([seed, 7]).permutation(len(examples))[:size]
    return [examples[i] for i in sorted(chosen.tolist())]


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


# ---------------------------------------------------------------------------------------------
# The recipe


def train(
    spec: JobSpec, out_dir: Path, accelerator: Any, events: EventWriter, resume: bool = False, flags: StopFlags | None = None
) -> dict[str, Any]:
    from accelerate.utils import gather_object, set_seed
    from transformers import get_cosine_schedule_with_warmup

    flags = flags or StopFlags()
    hp, schedule = spec.hyperparameters, spec.schedule
    out_dir = Path(out_dir)
    device = accelerator.device
    is_main = accelerator.is_main_process
    started = time.time()

    # ---- setup: data, model, method, optimizer, schedule, resume --------------------------
    set_seed(hp.seed)
    precision = resolve_precision(spec.precision, device)
    tokenizer = load_tokenizer(spec.model)

    def load(path: str, what: str, data_format: str = "auto") -> Any:
        return load_tokenized(path, tokenizer, hp.max_seq_len, what, data_format, spec.train_on_inputs)

    train_data = load(spec.training_file, "training_file", spec.data_format)
    valid_data = load(spec.validation_file, "validation_file", spec.data_format) if spec.validation_file else None
    # Replay and general files may be in any format, whatever the task data is.
    mix_sources = [(load(m.file, f"mix[{k}].file").examples, m.weight) for k, m in enumerate(spec.mix)]
    forgetting_data = load(spec.forgetting_file, "forgetting_file") if spec.forgetting_file else None
    train_examples, mixed_counts = mix_in(train_data.examples, mix_sources, hp.seed)
    if spec.packing:
        train_examples = pack(train_examples, hp.max_seq_len)
    valid_sample = eval_sample(valid_data.examples, schedule.eval_examples, hp.seed) if valid_data else None
    model, fast = setup_model(spec, precision, device)
    trainable_params, total_params = count_parameters(model)
    optimizer = build_optimizer(model, spec, device)
    in_backward = isinstance(optimizer, OptimizerInBackward)
    if in_backward and accelerator.num_processes > 1:
        raise ConfigError(f"optimizer_in_backward: runs on one GPU (this run has {accelerator.num_processes} "
                          "processes): DDP reduces gradients after the hooks that would update with them")
    order = DataOrder(
        len(train_examples), hp.batch_size, accelerator.num_processes, accelerator.process_index, hp.seed
    )
    total_steps, total_micro = plan_steps(spec, order)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(spec, total_steps), total_steps)
    # The scheduler stays outside prepare(): accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    raw_model = accelerator.unwrap_model(model)
    loss_head = fast.loss.for_prepared(model)
    flops, peak = model_flops(raw_model), peak_flops(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip_to = hp.max_grad_norm if hp.max_grad_norm > 0 else float("inf")  # inf: measure, never clip

    # A checkpoint's data position counts global micro-batches, so it only means the same
    # examples under the same batch layout.
    layout = {"batch_size": hp.batch_size, "gradient_accumulation_steps": hp.gradient_accumulation_steps,
              "world_size": accelerator.num_processes}
    state, resumed_from = TrainState(), None
    newest = ckpt.latest_checkpoint(out_dir) if resume else None
    if newest is not None:
        saved = ckpt.load_checkpoint(newest, raw_model, optimizer, scheduler, accelerator.process_index, device)
        for key, now in layout.items():
            if saved["layout"][key] != now:
                raise ConfigError(
                    f"{key}: checkpoint {newest.name} was made with {saved['layout'][key]}, this run has {now}; "
                    "resume with the same value"
                )
        state = TrainState(**saved["train_state"])
        resumed_from = state.step

    def forgetting_pass() -> dict[str, float]:
        assert forgetting_data is not None
        got = evaluate(model, forgetting_data.examples, hp.batch_size, tokenizer.pad_token_id, accelerator, "forgetting",
                       loss_head)
        return {"loss": got["forgetting_loss"], "perplexity": got["forgetting_perplexity"],
                "mean_token_accuracy": got["forgetting_mean_token_accuracy"]}

    if forgetting_data is not None and state.forgetting_before is None:
        # Measured on the model as training starts: LoRA's B is zero, so this is the base model.
        state.forgetting_before = forgetting_pass()

    events.emit(
        "start",
        f"{spec.method} on {len(train_data.examples)} examples"
        + (f" + {sum(mixed_counts)} mixed in" if mixed_counts else "")
        + (f" packed into {len(train_examples)} rows" if spec.packing else "")
        + f", {total_steps} steps"
        + (f", resumed from step {resumed_from}" if resumed_from is not None else ""),
        total_steps=total_steps,
        examples=len(train_data.examples),
        epochs=round(order.epoch_of(total_micro or total_steps * hp.gradient_accumulation_steps), 3),
        method=spec.method,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        precision=precision,
        fast_path={**fast.describe(), "loss": loss_head.name, "optimizer_in_backward": in_backward},
        trainable_params=trainable_params,
        total_params=total_params,
        resumed_from_step=resumed_from,
        # Cut examples lose their ends; dropped ones had nothing trainable left within max_seq_len.
        truncated_examples=train_data.truncated,
        dropped_examples=train_data.dropped,
        data_format=train_data.format,
        mixed_examples=mixed_counts,
        packed_rows=len(train_examples) if spec.packing else None,
    )

    def save(metrics: dict[str, Any]) -> None:
        rngs = gather_object([ckpt.rng_state()])
        full_state = gather_training_state(raw_model, optimizer)  # FSDP: every rank gathers, rank 0 keeps
        if is_main:
            path = ckpt.save_checkpoint(
                out_dir, state.step, raw_model, optimizer, scheduler,
                {"train_state": asdict(state), "layout": layout, "epoch": order.epoch_of(state.micro_step), "metrics": metrics},
                rngs, schedule.keep_checkpoints, full_state=full_state,
            )
            events.emit("checkpoint", f"checkpoint at step {state.step}", step=state.step,
                        path=str(path.relative_to(out_dir)), metrics=metrics)
        accelerator.wait_for_everyone()

    # ---- loop --------------------------------------------------------------------------------
    # A step is queued on the GPU and its values (loss, counts, votes, gradient norm) are read only
    # after the next step has been queued (trainer.step_values): the host never waits for the GPU
    # in the middle of training. So step N's metrics are emitted, and its votes acted on, after
    # step N+1 is queued; before an evaluation, a checkpoint, a pause or the end, the step just
    # queued is read too ("drained"), so that every event of a step precedes what follows it.
    last_metrics: dict[str, Any] = {}
    valid_metrics: dict[str, Any] = {}
    window = {"loss_sum": 0.0, "label_tokens": 0, "input_tokens": 0, "correct_tokens": 0, "rows": 0, "time": time.time()}
    last_saved_step = state.step if resumed_from is not None else -1
    last_saved_time = time.time()
    pending: QueuedStep | None = None  # queued, not read yet
    profiler = profiling.from_env(accelerator.process_index, device)

    def step_votes() -> list[bool]:
        # A signal reaches the ranks at slightly different times, and their clocks differ; pausing
        # and checkpointing are collectives, so one rank's wish decides for all, after the same step
        # (every rank reads the same reduced votes, after the same step).
        minutes = schedule.checkpoint_every_minutes
        return [flags.pause_requested, bool(minutes) and time.time() - last_saved_time >= minutes * 60]

    def finish(queued: QueuedStep) -> list[bool]:
        """Read a queued step's values: count its tokens, log it when due; returns its votes."""
        nonlocal window, last_metrics
        *values, grad_norm = queued.values.read()
        result = step_result(values)
        state.trained_tokens += result["label_tokens"]
        state.seen_tokens += result["input_tokens"]
        for key in ("loss_sum", "label_tokens", "input_tokens", "correct_tokens", "rows"):
            window[key] += result[key]
        if queued.step % schedule.log_every_steps == 0 or queued.step == total_steps:
            # Not the time of this read: on a CPU the next step has already run by now, and the
            # last step would be read at once after the one before it.
            now = queued.values.ready_at
            tokens_per_second = window["input_tokens"] / max(now - window["time"], 1e-9)
            mean_row = window["input_tokens"] / max(window["rows"], 1)
            last_metrics = {
                "step": queued.step,
                "total_steps": total_steps,
                "epoch": round(order.epoch_of(queued.micro_step), 4),
                "train_loss": window["loss_sum"] / max(window["label_tokens"], 1),
                "train_mean_token_accuracy": window["correct_tokens"] / max(window["label_tokens"], 1),
                "learning_rate": queued.lr,
                "grad_norm": grad_norm,
                "tokens": state.seen_tokens,
                "tokens_per_second": tokens_per_second,
                "mfu": mfu(flops, tokens_per_second, mean_row, peak, accelerator.num_processes),
                "peak_memory_bytes": peak_memory_bytes(device),
            }
            events.emit("metrics", f"step {queued.step}/{total_steps} loss {last_metrics['train_loss']:.4f}",
                        **last_metrics)
            window = {"loss_sum": 0.0, "label_tokens": 0, "input_tokens": 0, "correct_tokens": 0, "rows": 0, "time": now}
        return result["votes"]

    try:
        while state.step < total_steps:
            if profiler is not None:
                profiler.before_step(state.step + 1)
            n_micro = hp.gradient_accumulation_steps
            if total_micro:
                n_micro = min(n_micro, total_micro - state.micro_step)
            with region("collate"):
                micro_batches = [
                    pinned(collate([train_examples[i] for i in order.indices(state.micro_step + k)], tokenizer.pad_token_id),
                           device)
                    for k in range(n_micro)
                ]
            lr = scheduler.get_last_lr()[0]  # the rate this step is taken with

            # accumulate, clip, step: all queued, nothing read
            with region("forward_backward"):
                packed = queue_forward_backward(model, micro_batches, accelerator, loss_head, step_votes)
            grad_norm = optimizer_step(accelerator, optimizer, trainable, clip_to, scheduler)

            state.step += 1
            state.micro_step += n_micro
            queued = QueuedStep(state.step, state.micro_step, lr, LateRead(torch.cat([packed, as_values(grad_norm, packed.device)])))

            # log the step before this one, which the GPU has finished meanwhile
            with region("log"):
                votes = finish(pending) if pending is not None else [False, False]
            pending = queued
            if profiler is not None:
                profiler.after_step(state.step)
            evaluating = valid_data is not None and valid_sample is not None and (
                (schedule.eval_every_steps and state.step % schedule.eval_every_steps == 0) or state.step == total_steps
            )
            due = bool(schedule.checkpoint_every_steps and state.step % schedule.checkpoint_every_steps == 0)
            if not (evaluating or due or any(votes) or state.step == total_steps):
                continue
            # Something follows this step: read it first, so its metrics come before it (and a
            # checkpoint holds the counts of the step it saves).
            votes = [a or b for a, b in zip(votes, finish(pending))]
            pending = None

            # eval: the sample every eval_every_steps; at the end also the whole file
            if evaluating:
                assert valid_data is not None and valid_sample is not None
                valid_metrics = evaluate(model, valid_sample, hp.batch_size, tokenizer.pad_token_id, accelerator,
                                         loss_head=loss_head)
                if state.step == total_steps:
                    full = (
                        {f"full_{k}": v for k, v in valid_metrics.items()}
                        if valid_sample is valid_data.examples
                        else evaluate(model, valid_data.examples, hp.batch_size, tokenizer.pad_token_id, accelerator,
                                      "full_valid", loss_head)
                    )
                    valid_metrics = {**valid_metrics, **full}
                events.emit("validation", f"step {state.step} valid loss {valid_metrics['valid_loss']:.4f}",
                            step=state.step, **valid_metrics)

            # checkpoint, and pause (a checkpoint, then exit 75), as the ranks voted in the all-reduce
            # of this step or the one before
            pause_voted, minutes_due = votes
            if due or minutes_due:
                save({**last_metrics, **valid_metrics})
                last_saved_step, last_saved_time = state.step, time.time()

            if pause_voted:
                print(f"trainer: pausing after step {state.step} (asked by {flags.source() or 'another rank'})",
                      file=sys.stderr, flush=True)
                if last_saved_step != state.step:
                    save({**last_metrics, **valid_metrics})
                raise Paused()
    finally:
        profiling.stop()  # writes what a profiled range recorded, even a range cut short

    # ---- export ------------------------------------------------------------------------------
    forgetting: dict[str, Any] = {}
    if forgetting_data is not None and state.forgetting_before is not None:
        before, after = state.forgetting_before, forgetting_pass()
        forgetting = {
            "forgetting_loss_before": before["loss"], "forgetting_loss_after": after["loss"],
            "forgetting_perplexity_before": before["perplexity"], "forgetting_perplexity_after": after["perplexity"],
            # The figure to watch: how much worse the model got at general text.
            "forgetting_loss_increase": after["loss"] - before["loss"],
        }
        events.emit(
            "forgetting",
            f"general loss {before['loss']:.4f} -> {after['loss']:.4f} "
            f"(perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f})",
            step=state.step, examples=len(forgetting_data.examples), before=before, after=after, **forgetting,
        )
    final_metrics = {
        "steps": state.step,
        "train_loss": last_metrics.get("train_loss"),
        "trained_tokens": state.trained_tokens,
        "tokens": state.seen_tokens,
        "runtime_s": round(time.time() - started, 3),
        **valid_metrics,
        **forgetting,
    }
    accelerator.wait_for_everyone()
    whole = gather_model_state(raw_model) if is_sharded(raw_model) else None  # FSDP: a collective
    if is_main:
        export_final(out_dir, raw_model, tokenizer, spec, final_metrics, events, precision, state_dict=whole)
    accelerator.wait_for_everyone()
    events.emit(
        "finished",
        f"finished after {state.step} steps",
        step=state.step,
        train_loss=final_metrics["train_loss"],
        trained_tokens=state.trained_tokens,
        final_dir="final",
        metrics=final_metrics,
    )
    return final_metrics
