"""Unsloth as a peer: tokens/s and peak memory of one training setting, on Unsloth's own path.

One row per process, because Unsloth must be imported before transformers, trl and peft, and
patches them for the rest of the process: a benchmark that has already run TRL or tuneq calls
`run_unsloth_subprocess`, which starts this file as a fresh interpreter and reads its JSON.

The workload matches the other peers of bench/train_throughput.py: the shape from trainer.tiny (Llama-3.2-1B by
default) with random bf16 weights, rows of `seq` random token ids, per-device batch `batch`,
LoRA r16 alpha 32 on every linear projection, QLoRA = Unsloth's NF4 load. Training goes through
Unsloth's patched TRL SFTTrainer, with Unsloth's own defaults except where the workload fixes
them. Tokens/s covers `steps` steps after `warmup`, wall time between a synchronize before the
first timed step and one after the last; peak is torch.cuda.max_memory_allocated over those steps.

On the lent GPU, after unpacking the carried packages (bench/device_site.sh):

    python3 bench/peers_unsloth.py --method lora --batch 8 --seq 2048 --warmup 3 --steps 8
    python3 bench/peers_unsloth.py --method lora --no-gradient-checkpointing ...
    python3 bench/peers_unsloth.py --method qlora ...     # or --method full

Here, on a CPU, with Unsloth's CPU backend and the tiny model (checks the wiring, not speed):

    python bench/peers_unsloth.py --method lora --dry-run

The last line on stdout is the row as JSON: tokens_per_second, peak_gib, steps, note, and what
ran (versions, trainer class, final loss).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "qlora", "full")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Learning rates do not change speed; these are the usual ones so the loss stays finite.
LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}
DEVICE_PREFIX = (
    "mkdir -p /tmp/site && tar xzf .devsite/site.tar.gz -C /tmp/site && "
    "export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 || exit;"
)


class PeerUnavailable(RuntimeError):
    """Unsloth cannot run here; the message says what is missing and how to get it."""


def _offline_environment(dry_run: bool) -> None:
    # Nothing can be fetched on the lent machine: without these, hub and statistics calls wait
    # for network timeouts instead of failing at once.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Unsloth writes its compiled modules into the working directory unless told otherwise.
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(Path(tempfile.gettempdir()) / "unsloth_compiled_cache"))
    if not dry_run:
        # A GPU row that silently fell back to Unsloth's CPU backend would report nonsense.
        os.environ.setdefault("UNSLOTH_DISABLE_CPU_FALLBACK", "1")


def _import_unsloth(dry_run: bool):
    """Import Unsloth first, as it requires, or say exactly why it cannot run."""
    late = [name for name in ("transformers", "trl", "peft") if name in sys.modules]
    if late and "unsloth" not in sys.modules:
        raise PeerUnavailable(
            f"{', '.join(late)} already imported in this process; Unsloth must come first. "
            "Run the row with run_unsloth_subprocess() or `python bench/peers_unsloth.py`."
        )
    try:
        import torch
    except ImportError as error:
        raise PeerUnavailable(f"torch is not importable: {error}") from error
    if not dry_run and not torch.cuda.is_available():
        raise PeerUnavailable("no CUDA GPU is visible; use --dry-run for the CPU check")
    _offline_environment(dry_run)
    try:
        import unsloth
    except ImportError as error:
        raise PeerUnavailable(
            f"unsloth is not importable ({error}). On the lent GPU, unpack the carried packages "
            f"first (carry [\".devsite\"]): {DEVICE_PREFIX}"
        ) from error
    return unsloth


def _model_dir(shape: str, dry_run: bool, model_dir: str | None) -> Path:
    """A saved checkpoint of the shape, built once and reused by the following rows."""
    from trainer.tiny import build_shape, build_tiny

    name = "tiny" if dry_run else shape
    out = Path(model_dir) if model_dir else Path(tempfile.gettempdir()) / "tuneq-peers" / name
    marker = out / ".complete"
    if marker.exists():
        return out
    # Built beside its final place and renamed, so an interrupted build is never reused.
    partial = out.with_name(out.name + f".partial-{os.getpid()}")
    if dry_run:
        build_tiny(partial, seed=0)
    else:
        build_shape(partial, shape, seed=0, dtype="bfloat16")
    (partial / ".complete").write_text("built by bench/peers_unsloth.py\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.rename(out)
    except OSError:
        # Another row finished the same build first; keep that one.
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
        if not marker.exists():
            raise
    return out


def _random_rows(rows: int, seq: int, vocab: int, seed: int):
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    # Ids 0-2 are pad, bos and eos: the collator would mask pad out of the loss, so keep clear.
    ids = torch.randint(3, vocab, (rows, seq), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def _step_clock(warmup: int, steps: int, cuda: bool, memory_file: Path | None = None):
    """A callback that times the steps after warm-up, resetting the peak-memory statistics first.
    With memory_file, one more step (after the timed ones) is recorded by bench.memory_peak."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.start: float | None = None
            self.end: float | None = None
            self.peak: int | None = None
            self.recorder = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + steps:
                if cuda:
                    torch.cuda.synchronize()
                    self.peak = torch.cuda.max_memory_allocated()
                self.end = time.perf_counter()
                if memory_file is not None:
                    from bench.memory_peak import PeakRecorder

                    self.recorder = PeakRecorder()
            elif self.recorder is not None:
                self.recorder.write(memory_file, f"{memory_file.stem} (Unsloth's SFTTrainer, bench/peers_unsloth.py)")
                self.recorder = None

    return StepClock()


def run_unsloth(
    method: str,
    gradient_checkpointing: bool,
    batch: int,
    seq: int,
    warmup: int,
    steps: int,
    *,
    shape: str = "llama-3.2-1b",
    model_dir: str | None = None,
    dry_run: bool = False,
) -> dict:
    """Train `warmup + steps` steps with Unsloth and measure the last `steps`.

    Must run in a process that has not imported transformers, trl or peft yet (see module doc).
    """
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    for name, value, least in (("batch", batch, 1), ("seq", seq, 8), ("warmup", warmup, 1), ("steps", steps, 1)):
        if value < least:
            raise ValueError(f"{name}: must be at least {least}, got {value}")

    unsloth = _import_unsloth(dry_run)
    from unsloth import FastLanguageModel

    import torch
    import transformers
    import trl
    from trl import SFTConfig, SFTTrainer

    cuda = not dry_run
    if cuda and not SFTTrainer.__name__.startswith("Unsloth"):
        raise PeerUnavailable(
            f"trl.SFTTrainer is {SFTTrainer.__module__}.{SFTTrainer.__name__}, not Unsloth's patched "
            "trainer: Unsloth could not patch this TRL, so the row would measure plain TRL"
        )
    checkpointing = "unsloth" if gradient_checkpointing else False
    dtype = torch.bfloat16 if cuda else torch.float32
    path = _model_dir(shape, dry_run, model_dir)

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(path),
        max_seq_length=seq,
        dtype=dtype,
        load_in_4bit=method == "qlora",
        full_finetuning=method == "full",
        use_gradient_checkpointing=checkpointing,
        use_exact_model_name=True,
        local_files_only=True,
        # The tiny tokenizer stands in for Llama's (the rows are ids); its repairs change nothing here.
        fix_tokenizer=False,
    )
    if method != "full":
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            bias="none",
            target_modules=LORA_TARGETS,
            use_gradient_checkpointing=checkpointing,
            random_state=0,
        )

    vocab = model.get_input_embeddings().weight.shape[0]
    memory_dir = os.environ.get("TUNEQ_BENCH_MEMORY_DIR") if cuda else None
    memory_file = Path(memory_dir) / f"unsloth-{method}{'' if gradient_checkpointing else '-nockpt'}.md" if memory_dir else None
    extra = 1 if memory_file else 0  # the recorded step, after the timed ones
    dataset = _random_rows(batch * (warmup + steps + extra), seq, vocab, seed=0)
    clock = _step_clock(warmup, steps, cuda, memory_file)
    with tempfile.TemporaryDirectory(prefix="unsloth-peer-") as output_dir:
        config = SFTConfig(
            output_dir=output_dir,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            max_steps=warmup + steps + extra,
            learning_rate=LEARNING_RATE[method],
            warmup_steps=0,
            max_length=seq,
            packing=False,
            bf16=cuda,
            fp16=False,
            # One log line at the end: logging syncs the GPU, which would slow the timed steps.
            logging_steps=warmup + steps + extra,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            seed=0,
            dataloader_num_workers=0,
            use_cpu=not cuda,
        )
        trainer = SFTTrainer(
            model=model,
            processing_class=tokenizer,
            train_dataset=dataset,
            args=config,
            callbacks=[clock],
        )
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    if clock.start is None or clock.end is None:
        raise RuntimeError(
            f"the timed steps never ran: training stopped at step {trainer.state.global_step} "
            f"of {warmup + steps}"
        )
    elapsed = clock.end - clock.start
    peak = clock.peak / 2**30 if cuda and clock.peak is not None else None
    note = (
        f"unsloth {unsloth.__version__}, {method}, checkpointing {checkpointing!r}, "
        f"{type(trainer).__name__}, optim {getattr(config.optim, 'value', config.optim)}"
    )
    if dry_run:
        note += "; dry run on CPU with the tiny model and Unsloth's CPU backend: wiring only, not a speed"
    return {
        "tokens_per_second": batch * seq * steps / elapsed,
        "peak_gib": peak,
        "steps": steps,
        "note": note,
        "method": method,
        "gradient_checkpointing": gradient_checkpointing,
        "batch": batch,
        "seq": seq,
        "warmup": warmup,
        "shape": "tiny" if dry_run else shape,
        "final_loss": losses[-1] if losses else None,
        "versions": {
            "unsloth": unsloth.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "gpu": torch.cuda.get_device_name() if cuda else None,
    }


def _cli_args(method, gradient_checkpointing, batch, seq, warmup, steps, shape, model_dir, dry_run) -> list[str]:
    args = [
        "--method", method,
        "--batch", str(batch), "--seq", str(seq), "--warmup", str(warmup), "--steps", str(steps),
        "--shape", shape,
        "--gradient-checkpointing" if gradient_checkpointing else "--no-gradient-checkpointing",
    ]
    if model_dir:
        args += ["--model-dir", model_dir]
    if dry_run:
        args.append("--dry-run")
    return args


def run_unsloth_subprocess(*args, timeout_s: float = 540, **kwargs) -> dict:
    """run_unsloth(*args, **kwargs) in a fresh interpreter, since Unsloth must be imported first.

    Raises RuntimeError with the row's stderr if it fails or outlives timeout_s.
    """
    bound = inspect.signature(run_unsloth).bind(*args, **kwargs)
    bound.apply_defaults()
    command = [sys.executable, str(Path(__file__).resolve()), *_cli_args(**bound.arguments)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"the Unsloth row did not finish within {timeout_s:.0f} s: {' '.join(command)}") from error
    rows = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not rows:
        tail = (done.stderr or done.stdout)[-3000:]
        raise RuntimeError(f"the Unsloth row failed (exit {done.returncode}):\n{tail}")
    return json.loads(rows[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
        help='Unsloth\'s checkpointing (use_gradient_checkpointing="unsloth"); --no-... turns it off',
    )
    # Defaults: the shared throughput workload on the GPU, a few tiny steps for --dry-run.
    parser.add_argument("--batch", type=int, help="rows per step (8; dry run 2)")
    parser.add_argument("--seq", type=int, help="tokens per row (2048; dry run 64)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (3; dry run 1)")
    parser.add_argument("--steps", type=int, help="timed steps (8; dry run 2)")
    parser.add_argument("--shape", default="llama-3.2-1b", help="a shape from trainer.tiny.SHAPES")
    parser.add_argument("--model-dir", help="where the random-weight checkpoint is built once and reused")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model: checks the wiring only")
    args = parser.parse_args(argv)
    defaults = (2, 64, 1, 2) if args.dry_run else (8, 2048, 3, 8)
    for name, default in zip(("batch", "seq", "warmup", "steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)

    sys.path.insert(0, str(ROOT))
    try:
        row = run_unsloth(
            args.method, args.gradient_checkpointing, args.batch, args.seq, args.warmup, args.steps,
            shape=args.shape, model_dir=args.model_dir, dry_run=args.dry_run,
        )
    except (PeerUnavailable, ValueError) as error:
        print(f"peers_unsloth: {error}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
