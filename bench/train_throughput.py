"""Training throughput of tuneq against TRL, Unsloth and a plain loop, side by side.

Workload: the Llama-3.2-1B shape (trainer.tiny.build_config) with random bf16 weights, sdpa,
rows of `--seq` random token ids, per-device batch `--batch`, LoRA r16 alpha 32 on all linear
layers, QLoRA = bitsandbytes NF4 with double quantization and bf16 compute. Every row trains
`--warmup` steps, then the peak-memory statistics are reset and `--steps` steps are timed
(torch.cuda.synchronize around each); peak = torch.cuda.max_memory_allocated over them.

Rows (`--rows`, comma separated names or families: trl, plain, tuneq, unsloth, all):
  trl-*      TRL SFTTrainer with its defaults (checkpointing on), LoRA also without
             checkpointing and with use_liger_kernel, QLoRA, full (bf16 weights, TRL's default);
  plain-*    model(input_ids, labels=input_ids), backward, fused AdamW (QLoRA through peft's
             prepare_model_for_kbit_training with checkpointing);
  tuneq-*    the trainer's own step: trainer.fastpath.setup_model, trainer.optim.build_optimizer,
             accelerate's bf16 mixed precision and trainer.step.forward_backward, as the loop runs
             them, in speed lean and fast; full also with fp32 master weights, and full bf16
             in speed balanced with 8, 12 or 13 of the 16 decoder layers checkpointed (ckptK;
             a dry run scales K to the tiny model's layers);
  unsloth-*  bench/peers_unsloth.py (Unsloth's SFTTrainer path), each in its own interpreter.
Rows run in child processes grouped so that no library's global patches (liger, Unsloth) leak
into another family's rows; a row that fails is recorded as 'not run: <reason>'.

MFU = model FLOPs per token (trainer.throughput, the planner's formulas: 6N full, 4N + 6T
adapters, plus attention; recomputation not counted) x tokens/s / the bf16 matmul rate measured
in the same run (8192^3 matmuls). Ratios compare with the TRL row of the same method and mode.

    python bench/train_throughput.py                       # on the lent GPU, all rows (~6 min)
    python bench/train_throughput.py --rows trl,plain,tuneq  # ~4 min; then, in a second call:
    python bench/train_throughput.py --rows unsloth --merge  # adds the Unsloth rows to that table
    python bench/train_throughput.py --profile tuneq-lora-lean  # + a kernel profile of that row
    python bench/train_throughput.py --dry-run             # CPU, tiny model: proves the wiring

Writes bench/results/train_throughput_h200.md and .json (a dry run: ..._cpu_dryrun.*), again
after every row that ends, so a run killed halfway keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import memory_peak  # noqa: E402 - after the path fix above
from bench.host_sampler import STALL_SHARE  # noqa: E402

GiB = 1024**3
LORA = {"r": 16, "alpha": 32}
LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}

# name: (family, method, settings)
ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "trl-lora": ("trl", "lora", {}),
    "trl-lora-nockpt": ("trl", "lora", {"gradient_checkpointing": False}),
    "trl-lora-liger": ("trl", "lora", {"use_liger_kernel": True}),
    "trl-qlora": ("trl", "qlora", {}),
    "trl-full": ("trl", "full", {}),
    "plain-full": ("plain", "full", {}),
    "plain-lora": ("plain", "lora", {}),
    "plain-qlora": ("plain", "qlora", {}),
    "tuneq-lora-lean": ("tuneq", "lora", {"speed": "lean"}),
    "tuneq-lora-fast": ("tuneq", "lora", {"speed": "fast"}),
    "tuneq-qlora-lean": ("tuneq", "qlora", {"speed": "lean"}),
    "tuneq-qlora-fast": ("tuneq", "qlora", {"speed": "fast"}),
    # lean with the checkpointed layers' inputs in pinned host memory (Unsloth's checkpointing does the same).
    "tuneq-lora-lean-offload": ("tuneq", "lora", {"speed": "lean", "checkpoint_offload": True}),
    "tuneq-qlora-lean-offload": ("tuneq", "qlora", {"speed": "lean", "checkpoint_offload": True}),
    "tuneq-full-bf16-lean": ("tuneq", "full", {"speed": "lean", "full_precision": "bf16"}),
    # Unsloth's full row held 10.23 GiB to lean's 10.66 (2026-11-30): the same with the inputs offloaded.
    "tuneq-full-bf16-lean-offload": ("tuneq", "full", {"speed": "lean", "full_precision": "bf16", "checkpoint_offload": True}),
    # Layers updated inside backward (no global-norm clipping, so max_grad_norm 0); -noclip is the
    # same recipe with the ordinary step, to tell the two effects apart.
    "tuneq-full-bf16-lean-noclip": ("tuneq", "full", {"speed": "lean", "full_precision": "bf16", "max_grad_norm": 0.0}),
    "tuneq-full-bf16-lean-inbwd": ("tuneq", "full", {"speed": "lean", "full_precision": "bf16", "max_grad_norm": 0.0,
                                                     "optimizer_in_backward": True}),
    "tuneq-full-bf16-lean-offload-inbwd": ("tuneq", "full", {"speed": "lean", "full_precision": "bf16", "max_grad_norm": 0.0,
                                                             "optimizer_in_backward": True, "checkpoint_offload": True}),
    "tuneq-full-bf16-fast": ("tuneq", "full", {"speed": "fast", "full_precision": "bf16"}),
    # Between the two: only the bottom K of the 16 decoder layers checkpointed.
    "tuneq-full-bf16-ckpt8": ("tuneq", "full", {"speed": "balanced", "checkpoint_layers": 8, "full_precision": "bf16"}),
    "tuneq-full-bf16-ckpt12": ("tuneq", "full", {"speed": "balanced", "checkpoint_layers": 12, "full_precision": "bf16"}),
    "tuneq-full-bf16-ckpt13": ("tuneq", "full", {"speed": "balanced", "checkpoint_layers": 13, "full_precision": "bf16"}),
    "tuneq-full-bf16-ckpt11": ("tuneq", "full", {"speed": "balanced", "checkpoint_layers": 11, "full_precision": "bf16"}),
    # Unsloth's rows train with 8-bit AdamW; the same optimizer, for a like-for-like point.
    "tuneq-full-bf16-lean-adam8": ("tuneq", "full", {"speed": "lean", "full_precision": "bf16", "optimizer": "adamw_8bit"}),
    "tuneq-lora-ckpt3": ("tuneq", "lora", {"speed": "balanced", "checkpoint_layers": 3}),
    "tuneq-qlora-ckpt3": ("tuneq", "qlora", {"speed": "balanced", "checkpoint_layers": 3}),
    # The 2026-11-30 profile put ~2.2 ms of host time on each cuDNN attention call: the same rows
    # with cuDNN's SDPA backend off (flash / memory-efficient instead), to see if the host was the limit.
    "tuneq-lora-lean-nocudnn": ("tuneq", "lora", {"speed": "lean", "sdpa_cudnn": False}),
    "tuneq-full-bf16-lean-nocudnn": ("tuneq", "full", {"speed": "lean", "full_precision": "bf16", "sdpa_cudnn": False}),
    "tuneq-full-fp32-lean": ("tuneq", "full", {"speed": "lean", "full_precision": "fp32_master"}),
    "tuneq-full-fp32-fast": ("tuneq", "full", {"speed": "fast", "full_precision": "fp32_master"}),
    "unsloth-lora": ("unsloth", "lora", {"gradient_checkpointing": True}),
    "unsloth-lora-nockpt": ("unsloth", "lora", {"gradient_checkpointing": False}),
    "unsloth-qlora": ("unsloth", "qlora", {"gradient_checkpointing": True}),
    "unsloth-full": ("unsloth", "full", {"gradient_checkpointing": True}),
}

# tuneq row: (TRL row it is measured against, minimum tokens/s ratio, maximum peak ratio); None: report only
TARGETS: dict[str, tuple[str, float | None, float | None]] = {
    "tuneq-lora-lean": ("trl-lora", 1.3, 1.0),
    "tuneq-lora-fast": ("trl-lora-nockpt", 1.3, 1.0),
    "tuneq-qlora-lean": ("trl-qlora", 1.3, 1.0),
    "tuneq-qlora-fast": ("trl-qlora", 1.3, 1.0),
    "tuneq-lora-lean-offload": ("trl-lora", 1.3, 1.0),
    "tuneq-qlora-lean-offload": ("trl-qlora", 1.3, 1.0),
    "tuneq-full-bf16-lean": ("trl-full", 1.2, 1.2),
    "tuneq-full-bf16-lean-offload": ("trl-full", 1.2, 1.2),
    "tuneq-full-bf16-lean-noclip": ("trl-full", 1.2, 1.2),
    "tuneq-full-bf16-lean-inbwd": ("trl-full", 1.2, 1.2),
    "tuneq-full-bf16-lean-offload-inbwd": ("trl-full", 1.2, 1.2),
    "tuneq-full-bf16-fast": ("trl-full", 1.2, 1.2),
    "tuneq-full-bf16-ckpt8": ("trl-full", 1.2, 1.2),
    "tuneq-full-bf16-ckpt12": ("trl-full", 1.2, 1.2),
    "tuneq-full-bf16-ckpt13": ("trl-full", 1.2, 1.2),
    "tuneq-full-bf16-ckpt11": ("trl-full", 1.2, 1.2),
    "tuneq-full-bf16-lean-adam8": ("trl-full", 1.2, 1.2),
    "tuneq-lora-ckpt3": ("trl-lora-nockpt", 1.3, 1.0),
    "tuneq-qlora-ckpt3": ("trl-qlora", 1.3, 1.0),
    "tuneq-lora-lean-nocudnn": ("trl-lora", 1.3, 1.0),
    "tuneq-full-bf16-lean-nocudnn": ("trl-full", 1.2, 1.2),
    "tuneq-full-fp32-lean": ("trl-full", None, None),
    "tuneq-full-fp32-fast": ("trl-full", None, None),
}


# ---------------------------------------------------------------------------------------------
# In the child processes


# Set by --blocking-sync: the host sleeps while it waits on the GPU instead of spinning, so a step's
# CPU seconds count only the host's own work.
BLOCKING_SYNC = "TUNEQ_BENCH_BLOCKING_SYNC"
CUDA_DEVICE_SCHEDULE_BLOCKING_SYNC = 0x04


def blocking_sync() -> bool:
    """Make every host wait on this process's GPU a sleep (cudaSetDeviceFlags before the context
    exists): the final synchronize, a loss read, any wait hidden inside the step. True if set."""
    import ctypes

    import torch

    if not torch.cuda.is_available():
        return False
    for lib in ("libcudart.so.12", "libcudart.so"):  # the runtime torch loaded: dlopen returns it
        try:
            cudart = ctypes.CDLL(lib)
        except OSError:
            continue
        return cudart.cudaSetDeviceFlags(ctypes.c_uint(CUDA_DEVICE_SCHEDULE_BLOCKING_SYNC)) == 0
    return False


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        if os.environ.get(BLOCKING_SYNC) == "1":
            event = torch.cuda.Event(blocking=True)
            event.record()
            event.synchronize()
        else:
            torch.cuda.synchronize(device)


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _rows_of_ids(args, vocab: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    # Ids 0-2 are pad, bos and eos of the tokenizer: kept out so no collator masks them.
    return torch.randint(3, vocab, (n, args.seq), generator=g)


def _steal_s() -> float | None:
    """The host's CPU time its hypervisor gave to other guests so far (/proc/stat), summed over its
    CPUs; None where the kernel does not say."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _usage() -> dict[str, float]:
    """This process's kernel-side counters (getrusage): its CPU seconds in the kernel, page faults
    and the times it was switched out while it could run, all threads together. A stall with more of
    these than a normal step is memory management or the scheduler, not Python."""
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return {"sys_s": u.ru_stime, "minflt": u.ru_minflt, "majflt": u.ru_majflt, "nivcsw": u.ru_nivcsw}


def _timed(step: Callable[[int], Any], args, device) -> dict[str, Any]:
    """Warm up, reset the peak, time `steps` steps with a synchronize around each. Each step also
    gets the seconds until the host had enqueued it, this process's CPU seconds (all its threads; a
    synchronize that spins counts, unless --blocking-sync) and the host's steal over it, so that a
    stalled step shows whether the host worked, waited or was switched out."""
    losses = []
    for i in range(args.warmup):
        losses.append(float(step(i)))
    _sync(device)
    _reset_peak(device)
    times, enqueued, cpu, steal, kernel = [], [], [], [], []
    for i in range(args.warmup, args.warmup + args.steps):
        start, cpu0, steal0, usage0 = time.perf_counter(), time.process_time(), _steal_s(), _usage()
        loss = step(i)
        # When the host had handed the GPU the whole step: a stall here is the host's, one after it
        # the GPU's (or a wait inside the step, which --blocking-sync's CPU seconds tell apart).
        enqueued.append(round(time.perf_counter() - start, 4))
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        cpu.append(round(time.process_time() - cpu0, 4))
        kernel.append({k: round(v - usage0[k], 4) for k, v in _usage().items()})
        steal1 = _steal_s()
        steal.append(round(steal1 - steal0, 3) if steal0 is not None and steal1 is not None else None)
    tokens = args.batch * args.seq * args.steps
    return {"tokens_per_second": tokens / sum(times), "peak_gib": _peak_gib(device), "step_s": times,
            "step_cpu_s": cpu, "step_steal_s": steal, "step_enqueued_s": enqueued,
            "step_usage": kernel,
            "blocking_sync": os.environ.get(BLOCKING_SYNC) == "1", "loss_first": losses[0], "loss_last": losses[-1]}


def _flops_per_token(model, seq: int) -> float:
    from trainer.throughput import model_flops

    return model_flops(model).per_token(seq)


def _device(args):
    import torch

    return torch.device("cpu" if args.dry_run else "cuda")


def _load_hf(args, method: str, device):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if not args.dry_run else torch.float32,
                              "attn_implementation": "sdpa"}
    if device.type == "cuda":
        kwargs["device_map"] = {"": 0}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if not args.dry_run else torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs)
    model.config.use_cache = False
    return model


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", lora_dropout=0.0,
                      task_type="CAUSAL_LM")


def run_plain(name: str, method: str, settings: dict, args) -> dict[str, Any]:
    import torch

    device = _device(args)
    model = _load_hf(args, method, device)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if method in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE[method], fused=device.type == "cuda")
    ids = _rows_of_ids(args, model.config.vocab_size, args.batch * (args.warmup + args.steps))

    def step(i: int):
        batch = ids[i * args.batch : (i + 1) * args.batch].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    result = _timed(step, args, device)
    result["flops_per_token"] = _flops_per_token(model, args.seq)
    del model, optimizer, params
    return result


def run_tuneq(name: str, method: str, settings: dict, args) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator

    from trainer.fastpath import setup_model
    from trainer.step import forward_backward, optimizer_step
    from trainer.model import quiet_libraries, resolve_precision
    from trainer.optim import build_optimizer
    from trainer.spec import JobSpec

    quiet_libraries()
    device = _device(args)
    settings = dict(settings)
    clip_to = settings.pop("max_grad_norm", 1.0)
    if settings.pop("sdpa_cudnn", True) is False and torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.dry_run and settings.get("checkpoint_layers"):
        # K is of the 1B shape's 16 layers; the tiny model keeps the same share.
        layers = json.loads((args.model_dir / "config.json").read_text())["num_hidden_layers"]
        settings = {**settings, "checkpoint_layers": max(1, settings["checkpoint_layers"] * layers // 16)}
    spec = JobSpec.model_validate({
        "model": str(args.model_dir), "method": method, "training_file": "unused.jsonl",
        **({"lora": LORA} if method in ("lora", "qlora") else {}),
        "hyperparameters": {"batch_size": args.batch, "max_seq_len": args.seq, "learning_rate": LEARNING_RATE[method],
                            "max_grad_norm": clip_to},
        "precision": "fp32" if args.dry_run else "bf16",
        **settings,
    })
    # What trainer.job gives a one-GPU job: accelerate's bf16 mixed precision.
    accelerator = Accelerator(mixed_precision="no" if args.dry_run else "bf16", cpu=args.dry_run)
    precision = resolve_precision(spec.precision, accelerator.device)
    model, fast = setup_model(spec, precision, accelerator.device)
    optimizer = build_optimizer(model, spec, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_head = fast.loss.for_prepared(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    raw = accelerator.unwrap_model(model)
    ids = _rows_of_ids(args, raw.config.vocab_size, args.batch * (args.warmup + args.steps + 2))

    def step(i: int):
        rows = ids[i * args.batch : (i + 1) * args.batch]
        batch = {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows.clone()}
        result = forward_backward(model, [batch], accelerator, loss_head)
        optimizer_step(accelerator, optimizer, trainable, clip_to or float("inf"))  # 0: measure, never clip
        return result["loss_sum"] / max(result["label_tokens"], 1)

    result = _timed(step, args, device)
    result["flops_per_token"] = _flops_per_token(raw, args.seq)
    result["fast_path"] = {**fast.describe(), "loss": loss_head.name,
                           "optimizer_in_backward": spec.optimizer_in_backward}
    if args.profile == name:
        result["profile"] = _profile(step, args, device, name)
    if (memory_dir := memory_peak.wanted()) is not None and device.type == "cuda":
        recorder = memory_peak.PeakRecorder()
        step(args.warmup + args.steps)
        recorder.write(memory_dir / f"{name}.md", f"{name} (bench/train_throughput.py)")
    del model, optimizer, trainable, raw, fast, loss_head
    return result


def _profile(step: Callable[[int], Any], args, device, name: str) -> str:
    """Two more steps under the profiler: the kernels that take the time, written beside the table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(args.warmup + args.steps, args.warmup + args.steps + 2):
            step(i)
        _sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    path = args.out.with_name(args.out.name + f"_profile_{name}.md")
    path.write_text(f"# Profile of {name}: two steps after the timed ones\n\n```\n{table}\n```\n")
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def step_clock(args, device, clock: dict[str, Any]) -> Any:
    """A Trainer callback that resets the peak after the warm-up steps and appends each timed
    step's seconds to clock["times"], and each warm-up step's to clock["warmup"] (synchronized
    around each step)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup:
                _sync(device)
                _reset_peak(device)
            _sync(device)
            clock["start"] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            _sync(device)
            seconds = time.perf_counter() - clock["start"]
            clock["times" if state.global_step > args.warmup else "warmup"].append(seconds)

    return StepClock()


def run_trl(name: str, method: str, settings: dict, args) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    device = _device(args)
    model = _load_hf(args, method, device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    n = args.batch * (args.warmup + args.steps)
    dataset = Dataset.from_dict({"input_ids": _rows_of_ids(args, model.config.vocab_size, n).tolist()})
    clock: dict[str, Any] = {"times": [], "warmup": [], "peak": None}

    config = SFTConfig(
        output_dir=str(args.work / f"trl-{name}"),
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        max_length=args.seq,
        learning_rate=LEARNING_RATE[method],
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        **({"bf16": False, "use_cpu": True} if args.dry_run else {}),
        **settings,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=_lora_config() if method in ("lora", "qlora") else None, callbacks=[step_clock(args, device, clock)],
    )
    output = trainer.train()
    times = clock["times"]
    if len(times) != args.steps:
        raise RuntimeError(f"timed {len(times)} steps, expected {args.steps}")
    result = {"tokens_per_second": args.batch * args.seq * args.steps / sum(times), "peak_gib": _peak_gib(device),
              "step_s": times, "loss_last": float(output.training_loss),
              "flops_per_token": _flops_per_token(trainer.model, args.seq)}
    del trainer, model, dataset
    return result


def measure_matmul_peak(args) -> dict[str, Any]:
    """Dense matmul FLOP/s of this device in the compute dtype (bf16 on the GPU)."""
    import torch

    device = _device(args)
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    seconds = time.perf_counter() - start
    return {"flops": 2 * n**3 * reps / seconds, "n": n, "dtype": str(dtype).replace("torch.", "")}


def build_model(args) -> None:
    """The shape with random weights, saved once with the tiny tokenizer; created on the GPU."""
    marker = args.model_dir / ".complete"
    if marker.exists():
        return
    import torch

    from trainer.tiny import build_config, build_tiny, build_tokenizer

    partial = args.model_dir.with_name(args.model_dir.name + f".partial-{os.getpid()}")
    if args.dry_run:
        build_tiny(partial, seed=0)
    else:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(build_config(args.shape), dtype=torch.bfloat16)
        model.save_pretrained(partial)
        build_tokenizer().save_pretrained(partial)
        del model
    # bench/peers_unsloth.py reuses a directory that carries this marker.
    (partial / ".complete").write_text("built by bench/train_throughput.py\n")
    if args.model_dir.exists():  # an earlier build that never finished
        import shutil

        shutil.rmtree(args.model_dir)
    partial.rename(args.model_dir)


RUNNERS = {"plain": run_plain, "tuneq": run_tuneq, "trl": run_trl}


def child(args) -> int:
    """Run `args.child_rows` in this process, appending each result to args.result as it ends."""
    import torch

    results: list[dict[str, Any]] = []

    def save() -> None:
        args.result.write_text(json.dumps(results))

    if os.environ.get(BLOCKING_SYNC) == "1" and not blocking_sync():
        os.environ[BLOCKING_SYNC] = "0"  # the rows say what they ran with

    device = _device(args)
    for name in args.child_rows.split(","):
        if name == "setup":
            build_model(args)
            results.append({"name": "setup", "matmul_peak": measure_matmul_peak(args),
                            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"})
            save()
            continue
        family, method, settings = ROWS[name]
        _free(device)
        before = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else 0.0
        started = time.time()
        try:
            row = RUNNERS[family](name, method, settings, args)
        except Exception as exc:  # noqa: BLE001 - one row failing must not lose the others
            row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        row.update(name=name, seconds=round(time.time() - started, 1), allocated_before_gib=round(before, 3))
        results.append(row)
        save()
    return 0


# ---------------------------------------------------------------------------------------------
# In the parent: groups of rows in children, then the table


def _groups(names: list[str]) -> list[list[str]]:
    """Rows that may share a process: one family each, liger-patched TRL on its own."""
    order = ["plain", "trl", "trl-liger", "tuneq", "tuneq-nocudnn"]
    buckets: dict[str, list[str]] = {}
    for name in names:
        family, _, settings = ROWS[name]
        key = "trl-liger" if family == "trl" and settings.get("use_liger_kernel") else family
        if settings.get("sdpa_cudnn") is False:
            key = "tuneq-nocudnn"  # a process-wide switch: these rows get their own process
        buckets.setdefault(key, []).append(name)
    return [buckets[k] for k in order if k in buckets]


def _read_rows(result: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(result.read_text()) if result.exists() else []
    except ValueError:  # caught while the child rewrites it: the next look reads it whole
        return []


def _run_child(args, rows: list[str], timeout: float,
               on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Run `rows` in a child; on_rows sees the rows ended so far each time another one ends."""
    result = args.work / f"result-{rows[0]}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child-rows", ",".join(rows), "--result", str(result),
               *args.passthrough]
    print(f"  running {', '.join(rows)} ...", flush=True)
    error = None
    logs = args.work / f"child-{rows[0]}.log"
    with logs.open("w") as log:
        child_process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        deadline, seen = time.time() + timeout, 0
        while child_process.poll() is None and time.time() < deadline:
            time.sleep(2)
            got = _read_rows(result)
            if on_rows is not None and len(got) > seen:
                seen = len(got)
                on_rows(got)
        if child_process.poll() is None:
            child_process.kill()
            child_process.wait()
            error = f"timed out after {timeout:.0f} s"
        elif child_process.returncode != 0:
            tail = logs.read_text().strip().splitlines()[-1:]
            error = f"child exited {child_process.returncode}: {tail}"
    got = _read_rows(result)
    seen = {r["name"] for r in got}
    for name in rows:
        if name not in seen:
            got.append({"name": name, "error": error or "no result"})
    return got


def _run_unsloth(args, name: str) -> dict[str, Any]:
    _, method, settings = ROWS[name]
    print(f"  running {name} ...", flush=True)
    try:
        from bench import peers_unsloth
    except Exception as exc:  # noqa: BLE001
        return {"name": name, "error": f"bench/peers_unsloth.py cannot be imported: {exc}"}
    kwargs = {"model_dir": str(args.model_dir), "dry_run": args.dry_run}
    if not args.dry_run:
        kwargs["shape"] = args.shape
    try:
        runner = getattr(peers_unsloth, "run_unsloth_subprocess", None)
        if runner is not None:
            row = runner(method, settings["gradient_checkpointing"], args.batch, args.seq, args.warmup, args.steps,
                         timeout_s=args.row_timeout, **kwargs)
        else:
            row = peers_unsloth.run_unsloth(method, settings["gradient_checkpointing"], args.batch, args.seq,
                                            args.warmup, args.steps)
    except Exception as exc:  # noqa: BLE001
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return {"name": name, "error": (lines[-1] if lines else type(exc).__name__)[:300]}
    return {"name": name, **row}


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _verdict(row: dict, ref: dict | None, target: tuple[str, float | None, float | None]) -> tuple[str, str, str]:
    """(ratio text, target text, met text)."""
    ref_name, min_speed, max_mem = target
    want = "report only" if min_speed is None else f"≥ {min_speed}× tokens/s, ≤ {max_mem}× peak vs {ref_name}"
    if "error" in row or ref is None or "error" in ref:
        return "—", want, "not measured"
    speed = row["tokens_per_second"] / ref["tokens_per_second"]
    mem = row["peak_gib"] / ref["peak_gib"] if row.get("peak_gib") and ref.get("peak_gib") else None
    ratio = f"{speed:.2f}× / {_fmt(mem, '.2f')}× mem vs {ref_name}"
    if min_speed is None:
        return ratio, want, "—"
    if mem is None:
        return ratio, want, "not measured (no peak memory on this device)"
    misses = []
    if speed < min_speed:
        misses.append(f"speed {speed:.2f}× < {min_speed}×")
    if mem > max_mem:
        misses.append(f"memory {_fmt(mem, '.2f')}× > {max_mem}×")
    return ratio, want, "yes" if not misses else "no: " + "; ".join(misses)


def _dominance(rows: dict[str, dict]) -> list[str]:
    """For every peer row: the tuneq rows of its method at least as fast with no more peak memory."""
    lines = []
    for name, row in rows.items():
        family, method, _ = ROWS[name]
        if family == "tuneq" or "error" in row:
            continue
        better = [t for t, r in rows.items() if ROWS[t][0] == "tuneq" and ROWS[t][1] == method and "error" not in r
                  and r["tokens_per_second"] >= row["tokens_per_second"]
                  and (r.get("peak_gib") or 0) <= (row.get("peak_gib") or 0)]
        lines.append(f"| {name} | {', '.join(better) if better else '**none: not matched**'} |")
    return lines


def report(args, setup: dict, rows: dict[str, dict]) -> str:
    peak = setup.get("matmul_peak", {}).get("flops")
    title = "CPU dry run (tiny model; proves the script, measures nothing)" if args.dry_run else setup.get("device", "GPU")
    out = [
        f"# Training throughput: tuneq vs TRL, Unsloth and a plain loop ({title})",
        "",
        f"Workload: {'tiny model' if args.dry_run else args.shape} random weights, batch {args.batch} x seq {args.seq}, "
        f"{args.warmup} warm-up + {args.steps} timed steps; LoRA r{LORA['r']} alpha {LORA['alpha']} all linear; "
        "QLoRA NF4 double-quant bf16 compute. Peak = torch.cuda.max_memory_allocated over the timed steps. "
        f"MFU against the measured {setup.get('matmul_peak', {}).get('dtype', '?')} matmul rate "
        f"{_fmt(peak / 1e12 if peak else None, '.3g')} TFLOP/s. Command: `python bench/train_throughput.py "
        f"{' '.join(args.argv)}`" + (" (merged into the rows of an earlier run)" if args.merge else "") + ".",
        "",
        "| run | tokens/s | peak GiB | MFU | ratio vs TRL (tokens/s / peak) | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            out.append(f"| {name} | not run: {row['error'].replace('|', '/')} | | | | | |")
            continue
        fpt = row.get("flops_per_token")
        mfu = fpt * row["tokens_per_second"] / peak if fpt and peak else None
        ratio, want, met = ("", "", "")
        if name in TARGETS:
            ratio, want, met = _verdict(row, rows.get(TARGETS[name][0]), TARGETS[name])
        out.append(f"| {name} | {row['tokens_per_second']:,.0f} | {_fmt(row.get('peak_gib'), '.2f')} | "
                   f"{_fmt(mfu, '.1%')} | {ratio} | {want} | {met} |")
    dominance = _dominance(rows)
    if dominance:
        out += ["", "Peer rows and the tuneq settings at least as fast with no more peak memory:", "",
                "| peer row | tuneq rows that match it |", "|---|---|", *dominance]
    fast_paths = {n: r["fast_path"] for n, r in rows.items() if "fast_path" in r}
    if fast_paths:
        out += ["", "What the tuneq rows ran with:", ""]
        out += [f"- {n}: {json.dumps(v)}" for n, v in fast_paths.items()]
    profiles = {n: r["profile"] for n, r in rows.items() if "profile" in r}
    out += [f"- profile of {n}: {p}" for n, p in profiles.items()]
    out += stalled_steps(rows)
    return "\n".join(out) + "\n"


def _median(xs: list) -> float | None:
    known = [x for x in xs if x is not None]
    return round(statistics.median(known), 4) if known else None


def _counters(usage: dict) -> str:
    return "".join(f", {k} {v}" for k, v in usage.items())


def stalled_steps(rows: dict[str, dict]) -> list[str]:
    """Each row's timed steps slower than STALL_SHARE of its median step, with when the host had
    enqueued each, its CPU seconds, the host's steal and the kernel's counters, beside the row's
    medians of those."""
    out = []
    for name, row in rows.items():
        times = row.get("step_s") or []
        if not times:
            continue
        median = statistics.median(times)
        none = [None] * len(times)
        cpu, steal = row.get("step_cpu_s") or none, row.get("step_steal_s") or none
        enqueued = row.get("step_enqueued_s") or none
        usage = row.get("step_usage") or [{}] * len(times)
        slow = [i for i, t in enumerate(times) if median / t < STALL_SHARE]
        usual = {k: _median([u.get(k) for u in usage]) for k in usage[0]}
        out.append(f"- {name}{' (blocking sync)' if row.get('blocking_sync') else ''}: {len(slow)} of {len(times)} "
                   f"steps under {STALL_SHARE * 100:.0f} % of the median step ({median:.4f} s; enqueued {_median(enqueued)} s; "
                   f"CPU {_median(cpu)} s{_counters(usual)})"
                   + "".join(f"; step {i + 1}: {times[i]:.4f} s, enqueued {enqueued[i]} s, CPU {cpu[i]} s, "
                             f"steal {steal[i]} s{_counters(usage[i])}" for i in slow))
    return ["", "Stalled steps (enqueued: seconds until the host had handed the GPU the whole step; the process's "
            "CPU seconds over the step, all threads; the host's steal; where recorded, the process's kernel CPU "
            "seconds, minor and major page faults and involuntary switches):", "", *out] if out else []


def select(spec: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "all":
            names += list(ROWS)
        elif part in ROWS:
            names.append(part)
        elif any(f == part for f, _, _ in ROWS.values()):
            names += [n for n, (f, _, _) in ROWS.items() if f == part]
        else:
            raise SystemExit(f"--rows: {part!r} is not a row or family; rows: {', '.join(ROWS)}")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="all")
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, short rows")
    parser.add_argument("--profile", default=None, help="a tuneq row to profile (two extra steps)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tuneq-train-throughput")
    parser.add_argument("--out", type=Path, default=None, help="results path without suffix")
    parser.add_argument("--row-timeout", type=float, default=None, help="seconds per row")
    parser.add_argument("--blocking-sync", action="store_true",
                        help="the host sleeps while it waits on the GPU, so a step's CPU seconds are its own work")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other rows of the existing results file (run the families in several calls)")
    parser.add_argument("--child-rows", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq = args.seq or (64 if args.dry_run else 2048)
    args.batch = args.batch or (2 if args.dry_run else 8)
    if args.dry_run:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    args.row_timeout = args.row_timeout or (300.0 if args.dry_run else 150.0)
    args.out = args.out or ROOT / "bench" / "results" / ("train_throughput_cpu_dryrun" if args.dry_run else "train_throughput_h200")
    args.model_dir = args.work / ("tiny" if args.dry_run else args.shape)
    args.work.mkdir(parents=True, exist_ok=True)
    args.argv = [a for a in argv if not a.startswith("--child-rows") and not a.startswith("--result")]
    if args.blocking_sync:
        os.environ[BLOCKING_SYNC] = "1"  # the children inherit it
    if args.child_rows:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return child(args)

    names = select(args.rows)
    args.passthrough = [a for a in argv if a != "--rows"]
    if "--rows" in argv:  # drop the value that followed --rows
        i = argv.index("--rows")
        args.passthrough = argv[:i] + argv[i + 2 :]
    args.passthrough = [a for a in args.passthrough if not a.startswith("--rows=")]
    started = time.time()
    print(f"train throughput: {len(names)} rows -> {args.out}.md", flush=True)
    setup = _run_child(args, ["setup"], timeout=300)[0]
    if "error" in setup:
        raise SystemExit(f"could not build the model or measure the matmul peak: {setup['error']}")
    results: dict[str, dict] = {}
    previous = args.out.with_suffix(".json")
    kept = json.loads(previous.read_text()).get("rows", {}) if args.merge and previous.exists() else {}

    def write() -> str:
        """The table of the rows ended so far (and the kept ones), on disk now: a kill loses only the running row."""
        ordered = {n: results[n] for n in names if n in results}
        if kept:
            ordered = {n: ordered.get(n) or kept[n] for n in ROWS if n in ordered or n in kept}
        text = report(args, setup, ordered)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"setup": setup, "rows": ordered, "seconds": round(time.time() - started, 1),
             "complete": all(n in results for n in names),
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}},
            indent=1, default=str,
        ))
        return text

    def ended(rows: list[dict[str, Any]]) -> None:
        results.update({row["name"]: row for row in rows})
        write()

    for group in _groups([n for n in names if ROWS[n][0] != "unsloth"]):
        ended(_run_child(args, group, timeout=60 + args.row_timeout * len(group), on_rows=ended))
    for name in (n for n in names if ROWS[n][0] == "unsloth"):
        ended([_run_unsloth(args, name)])
    text = write()
    print(text)
    print(f"done in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
