"""DPO throughput and peak memory: tuneq's preference step against TRL's DPOTrainer, same data.

Workload: the Llama-3.2-1B shape (trainer.tiny.build_config) with random bf16 weights (built once
by bench/train_throughput.py's build_model), the tiny byte-level tokenizer and its chat template,
and `--pairs` preference lines of random text: a user turn of about `--prompt` tokens, a preferred
and a non-preferred answer of about `--answer` tokens each. Both sides read the same lines through
the same chat template, batch `--batch` pairs per step, beta 0.1, LoRA r16 alpha 32 on all linear
layers (or full fine-tuning with bf16 weights, as TRL loads them), with gradient checkpointing on
or off alike (`--mode lean|fast`). The reference: the adapter switched off (LoRA, both sides) or a
frozen copy of the model (full: tuneq keeps one; TRL's ref_model=None makes one too).

Each row first trains `--warmup` steps, by default one pass over the pairs: the pairs' lengths
differ, and a shape seen for the first time costs kernel compilations (Triton's, in a cache
directory of the row's own, so that no row profits from another's) that a long job pays once.
Those steps are timed too, as the first pass's seconds. Then it resets the peak-memory statistics
and times `--steps` steps (torch.cuda.synchronize around each). tokens/s counts the input tokens of both rows of every pair
(padding excluded, as tuneq tokenizes them); peak = torch.cuda.max_memory_allocated over the
timed steps. Ratios compare with the TRL row of the same method in the same run.

    python bench/dpo_vs_trl.py                  # on the lent GPU (after bench/device_site.sh's archive)
    python bench/dpo_vs_trl.py --rows tuneq-lora,trl-lora --mode fast
    python bench/dpo_vs_trl.py --dry-run        # CPU, tiny model: proves tuneq's wiring (TRL if installed)

On the device, before any Python (TRL is in the carried archive, see bench/device_site.sh):
    mkdir -p /tmp/site && tar xzf .devsite/site.tar.gz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1

Writes bench/results/dpo_vs_trl_<gpu>.md and .json (a dry run: ..._cpu_dryrun.*), rewritten after
every row, so a run cut short keeps what it measured. Each row runs in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_throughput import (  # noqa: E402 - after the path fix above
    LORA,
    _device,
    _free,
    _load_hf,
    _lora_config,
    _peak_gib,
    _reset_peak,
    _sync,
    build_model,
    step_clock,
)

BETA = 0.1
LEARNING_RATE = {"lora": 5e-6, "full": 5e-7}
ROWS = {"tuneq-lora": ("tuneq", "lora"), "trl-lora": ("trl", "lora"),
        "tuneq-full": ("tuneq", "full"), "trl-full": ("trl", "full")}


def write_pairs(args) -> Path:
    """`--pairs` preference lines of random text of about the asked token lengths."""
    from transformers import AutoTokenizer

    path = args.work / f"pairs-{args.prompt}-{args.answer}.jsonl"
    if path.exists():
        return path
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    rng = random.Random(0)
    vocab = [t for t in range(3, len(tok)) if tok.decode([t]).strip().isalpha()]

    def text(tokens: int) -> str:
        return tok.decode([rng.choice(vocab) for _ in range(tokens)])

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(args.pairs):
            f.write(json.dumps({"input": {"messages": [{"role": "user", "content": text(args.prompt)}]},
                                "preferred_output": [{"role": "assistant", "content": text(args.answer)}],
                                "non_preferred_output": [{"role": "assistant", "content": text(args.answer)}]})
                    + "\n")
    return path


def _examples(args, data: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from trainer.data.dataset import load_tokenized

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    return load_tokenized(data, tok, args.max_len, data_format="preference").examples


def _step_tokens(examples: list[dict], batch: int, step: int) -> int:
    from trainer.data.tokenize import REJECTED_IDS

    chunk = [examples[(step * batch + k) % len(examples)] for k in range(batch)]
    return sum(len(e["input_ids"]) + len(e[REJECTED_IDS]) for e in chunk)


def run_tuneq(method: str, args, data: Path) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator

    from trainer.data.batch import collate
    from trainer.fastpath import setup_model
    from trainer.model import quiet_libraries, resolve_precision
    from trainer.optim import build_optimizer
    from trainer.preference import PreferenceLoss, reference_for
    from trainer.spec import JobSpec
    from trainer.step import forward_backward, optimizer_step
    from trainer.step_values import pinned

    quiet_libraries()
    device = _device(args)
    spec = JobSpec.model_validate({
        "model": str(args.model_dir), "method": method, "training_file": str(data), "objective": "dpo",
        "preference": {"beta": BETA}, **({"lora": LORA} if method == "lora" else {}),
        "hyperparameters": {"batch_size": args.batch, "max_seq_len": args.max_len,
                            "learning_rate": LEARNING_RATE[method]},
        "precision": "fp32" if args.dry_run else "bf16", "speed": args.mode,
        **({"full_precision": "bf16"} if method == "full" else {}),
    })
    accelerator = Accelerator(mixed_precision="no" if args.dry_run else "bf16", cpu=args.dry_run)
    precision = resolve_precision(spec.precision, accelerator.device)
    model, fast = setup_model(spec, precision, accelerator.device)
    optimizer = build_optimizer(model, spec, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    token_head = fast.loss.for_prepared(model)
    reference = reference_for(spec, accelerator.unwrap_model(model), token_head,
                              torch.bfloat16 if precision == "bf16" else None)
    loss_head = PreferenceLoss(spec, token_head, reference)
    trainable = [p for p in model.parameters() if p.requires_grad]
    examples = _examples(args, data)
    pad = 0

    def step(i: int) -> float:
        chunk = [examples[(i * args.batch + k) % len(examples)] for k in range(args.batch)]
        result = forward_backward(model, [pinned(collate(chunk, pad), device)], accelerator, loss_head)
        optimizer_step(accelerator, optimizer, trainable, 1.0)
        return result["loss_sum"] / max(result["loss_units"], 1)

    losses, times, warmup = [], [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync(device)
            _reset_peak(device)
        start = time.perf_counter()
        losses.append(step(i))
        _sync(device)
        (times if i >= args.warmup else warmup).append(time.perf_counter() - start)
    tokens = sum(_step_tokens(examples, args.batch, i) for i in range(args.warmup, args.warmup + args.steps))
    return {"tokens_per_second": tokens / sum(times), "peak_gib": _peak_gib(device), "step_s": times,
            "warmup_s": warmup,
            "loss_first": losses[0], "loss_last": losses[-1],
            "fast_path": {**fast.describe(), "loss": loss_head.name}}


def run_trl(method: str, args, data: Path) -> dict[str, Any]:
    import inspect

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    device = _device(args)
    model = _load_hf(args, method, device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                                  "rejected": r["non_preferred_output"]} for r in rows])
    clock: dict[str, Any] = {"times": [], "warmup": []}

    wanted = dict(
        output_dir=str(args.work / f"trl-{method}"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=LEARNING_RATE[method], beta=BETA,
        max_length=args.max_len, max_prompt_length=args.max_len, logging_steps=10_000, save_strategy="no",
        report_to="none", dataloader_num_workers=0, gradient_checkpointing=args.mode == "lean",
        **({"bf16": False, "use_cpu": True} if args.dry_run else {"bf16": True}),
    )
    # DPOConfig's fields move between TRL releases: only those this one has.
    known = set(inspect.signature(DPOConfig).parameters)
    config = DPOConfig(**{k: v for k, v in wanted.items() if k in known})
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_lora_config() if method == "lora" else None, callbacks=[step_clock(args, device, clock)])
    output = trainer.train()
    times = clock["times"]
    warmup = clock.get("warmup", [])
    if len(times) != args.steps:
        raise RuntimeError(f"timed {len(times)} steps, expected {args.steps}")
    examples = _examples(args, data)  # the same lines as tuneq tokenizes them: the same token count
    tokens = sum(_step_tokens(examples, args.batch, i) for i in range(args.warmup, args.warmup + args.steps))
    import trl

    return {"tokens_per_second": tokens / sum(times), "peak_gib": _peak_gib(device), "step_s": times,
            "warmup_s": warmup, "loss_last": float(output.training_loss), "trl": trl.__version__}


def child(args) -> int:
    family, method = ROWS[args.child_row]
    build_model(args)
    data = write_pairs(args)
    _free(_device(args))
    started = time.time()
    try:
        row = (run_tuneq if family == "tuneq" else run_trl)(method, args, data)
    except Exception as exc:  # noqa: BLE001 - one row failing must not lose the others
        row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    row.update(name=args.child_row, seconds=round(time.time() - started, 1))
    args.result.write_text(json.dumps(row))
    return 0


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(args, rows: dict[str, dict]) -> str:
    lines = [f"# DPO: tuneq against TRL's DPOTrainer ({'CPU dry run, tiny model' if args.dry_run else args.gpu})", "",
             f"Shape {'tiny' if args.dry_run else args.shape}, {args.batch} pairs per step, prompt ~{args.prompt} and "
             f"answers ~{args.answer} tokens, speed {args.mode}, beta {BETA}, {args.warmup} warm-up + {args.steps} "
             "timed steps. tokens/s counts both rows of every pair; ratio = tuneq / TRL of the same method, same run. "
             "First pass s: the warm-up steps' seconds (each row compiles its kernels afresh); median and worst: of "
             "the timed steps.",
             "", "| row | tokens/s | peak GiB | vs TRL tokens/s | vs TRL peak | median step s | worst step s "
             "| first pass s | note |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        method = ROWS[name][1]
        trl_row = rows.get(f"trl-{method}") if name.startswith("tuneq") else None
        ratio = peak = "-"
        if trl_row and "error" not in trl_row and "error" not in row:
            ratio = f"{row['tokens_per_second'] / trl_row['tokens_per_second']:.2f}x"
            if row.get("peak_gib") and trl_row.get("peak_gib"):
                peak = f"{row['peak_gib'] / trl_row['peak_gib']:.2f}x"
        note = row.get("error") or (f"trl {row['trl']}" if "trl" in row else "")
        steps = row.get("step_s") or []
        median = statistics.median(steps) if steps else None
        first = sum(row["warmup_s"]) if row.get("warmup_s") else None
        lines.append(f"| {name} | {_fmt(row.get('tokens_per_second'), ',.0f')} | {_fmt(row.get('peak_gib'), '.2f')} "
                     f"| {ratio} | {peak} | {_fmt(median, '.3f')} | {_fmt(max(steps) if steps else None, '.3f')} "
                     f"| {_fmt(first, '.1f')} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--answer", type=int, default=512)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--mode", choices=("lean", "fast"), default="lean")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: one pass over the pairs)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tuneq-bench-dpo")
    p.add_argument("--child-row", default=None)
    p.add_argument("--result", type=Path, default=None)
    args = p.parse_args(argv)
    if args.dry_run:
        args.prompt, args.answer, args.pairs, args.batch, args.warmup, args.steps = 24, 16, 8, 2, 1, 2
    if args.warmup is None:
        args.warmup = -(-args.pairs // args.batch)
    args.max_len = 2 * (args.prompt + args.answer) + 64  # the template's tokens too: nothing is cut
    args.work.mkdir(parents=True, exist_ok=True)
    if args.model_dir is None:
        args.model_dir = args.work / ("tiny-llama" if args.dry_run else args.shape)
    if args.child_row:
        return child(args)
    args.gpu = "cpu"
    if not args.dry_run:
        import torch

        args.gpu = torch.cuda.get_device_name(0)
    tag = "cpu_dryrun" if args.dry_run else ("h200" if "H200" in args.gpu else "h100" if "H100" in args.gpu else "gpu")
    out = ROOT / "bench" / "results" / f"dpo_vs_trl_{tag}"
    rows: dict[str, dict] = {}
    for name in args.rows.split(","):
        result = args.work / f"row-{name}.json"
        result.unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:]), "--child-row", name,
                   "--result", str(result)]
        triton_cache = args.work / f"triton-{name}"
        shutil.rmtree(triton_cache, ignore_errors=True)
        done = subprocess.run(command, cwd=ROOT, timeout=1800, env={**os.environ, "TRITON_CACHE_DIR": str(triton_cache)})
        rows[name] = json.loads(result.read_text()) if result.exists() else {"error": f"exit {done.returncode}"}
        table = report(args, rows)
        out.with_suffix(".md").write_text(table)
        out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "rows": rows}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
