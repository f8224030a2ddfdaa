"""The method family on one synthetic domain task, on the same budget: tokens/s, peak memory,
trainable parameters and final validation loss per method, written to
bench/results/methods_comparison.md (and .json).

Every method runs the real trainer (`python -m trainer run`) as its own process on the same data,
steps, micro-batch and sequence length; only the method and its usual learning rate differ.

    python bench/methods_comparison.py                      # on the lent GPU: Llama-3.2-1B shape
    python bench/methods_comparison.py --shape llama-0.5b   # a smaller shape
    python bench/methods_comparison.py --dry-run            # CPU, tiny model, a few steps

The full-size shapes have random weights (trainer.tiny.build_shape): speed and memory do not
depend on the values, but the validation loss then measures how fast each method fits the task
from a random start, not how well it adapts a pretrained model. The dry run uses the tiny model,
which is pretrained on the shipped corpus, and checks that the script and every method work.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (JobSpec method fields, learning rate); the rates are the API's defaults per method
# (api/job_spec.py BASE_LEARNING_RATE), DoRA as LoRA.
METHODS: dict[str, tuple[dict, float]] = {
    "full": ({"method": "full"}, 2e-5),
    "lora": ({"method": "lora", "lora": {"r": 16, "alpha": 32}}, 2e-4),
    "qlora": ({"method": "qlora", "lora": {"r": 16, "alpha": 32}}, 2e-4),
    "dora": ({"method": "lora", "lora": {"r": 16, "alpha": 32, "use_dora": True}}, 2e-4),
    "ia3": ({"method": "ia3"}, 3e-3),
    "rslora": ({"method": "lora", "lora": {"r": 16, "alpha": 32, "use_rslora": True}}, 2e-4),
    "loraplus": ({"method": "lora", "lora": {"r": 16, "alpha": 32, "loraplus_lr_ratio": 16}}, 2e-4),
    "qlora-int8": ({"method": "qlora", "lora": {"r": 16, "alpha": 32}, "quantization": {"bits": 8}}, 2e-4),
    "prefix": ({"method": "prefix"}, 3e-3),
    "freeze": ({"method": "freeze", "freeze": {"trainable_layers": 2}}, 2e-5),
}
DEFAULT_METHODS = "full,lora,qlora,dora,ia3"

# The task: a small "inventory" domain with a fixed answer format the model must learn.
ITEMS = "apple river stone cloud tiger lemon piano ocean maple robot candle forest silver garden".split()


def domain_rows(n: int, seed: int, words: int) -> list[dict]:
    """Sort a list of items and count them: learnable, checkable, long enough to fill a row."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        picked = [rng.choice(ITEMS) for _ in range(max(2, words))]
        answer = f"{len(picked)} items: " + ", ".join(sorted(picked))
        rows.append({"messages": [
            {"role": "system", "content": "You are the stock clerk. Sort and count the items."},
            {"role": "user", "content": "Items: " + ", ".join(picked)},
            {"role": "assistant", "content": answer},
        ]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_model(args: argparse.Namespace) -> Path:
    from trainer.tiny import build_shape, build_tiny

    dest = args.work / ("tiny-llama" if args.dry_run else args.shape)
    if (dest / "config.json").exists():
        return dest
    if args.dry_run:
        return build_tiny(dest)
    return build_shape(dest, args.shape)


# Runs the trainer in this process's child and records the child's peak resident memory, the
# only memory figure a CPU run has (the trainer reports CUDA's max_memory_allocated on a GPU).
_RSS_WRAPPER = (
    "import atexit, resource, runpy, sys; out = sys.argv.pop(1); "
    "atexit.register(lambda: open(out, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))); "
    "sys.argv = ['trainer'] + sys.argv[1:]; runpy.run_module('trainer', run_name='__main__')"
)


def run_method(name: str, model: Path, train: Path, valid: Path, args: argparse.Namespace) -> dict:
    fields, lr = METHODS[name]
    out = args.work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # events.jsonl is appended to: start clean
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "model": str(model), "training_file": str(train), "validation_file": str(valid), **fields,
        "hyperparameters": {"max_steps": args.steps, "batch_size": args.batch, "max_seq_len": args.seq,
                            "learning_rate": lr, "warmup_steps": max(1, args.steps // 10), "seed": 0},
        "gradient_checkpointing": args.checkpointing,
    }
    (out / "spec.json").write_text(json.dumps(spec))
    for stale in ("events.jsonl", "rss_kib"):
        (out / stale).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-c", _RSS_WRAPPER, str(out / "rss_kib"), "run", str(out / "spec.json"), "--out", str(out)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    (out / "trainer.log").write_text(proc.stdout + proc.stderr)
    path = out / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    valid_events = [e["data"] for e in events if e["type"] == "validation"]
    errors = [e["message"] for e in events if e["type"] == "error"]
    timed = metrics[args.warmup:] or metrics
    gpu_peak = max((m["peak_memory_bytes"] or 0 for m in metrics), default=0)
    rss = int((out / "rss_kib").read_text()) * 1024 if (out / "rss_kib").exists() else None
    last_valid = valid_events[-1] if valid_events else {}
    return {
        "method": name,
        "ok": proc.returncode == 0,
        "error": errors[-1] if errors else (proc.stderr[-400:] if proc.returncode else None),
        "steps": len(metrics),
        "tokens_per_second": statistics.median(m["tokens_per_second"] for m in timed) if timed else None,
        "peak_gpu_bytes": gpu_peak or None,
        "peak_rss_bytes": rss,
        "trainable_params": next((e["data"]["trainable_params"] for e in events if e["type"] == "start"), None),
        "total_params": next((e["data"]["total_params"] for e in events if e["type"] == "start"), None),
        "first_train_loss": metrics[0]["train_loss"] if metrics else None,
        "final_valid_loss": last_valid.get("full_valid_loss", last_valid.get("valid_loss")),
        "learning_rate": lr,
        "wall_s": round(wall, 1),
    }


def table(rows: list[dict], args: argparse.Namespace, device: str, torch_version: str) -> str:
    gib = 2**30
    if args.dry_run:
        title = "# Methods comparison — CPU DRY RUN (tiny model), not a measurement"
        note = ("A check that the script and every method run end to end. The tiny model (2 layers, hidden 64) "
                "on 2 loaded CPU cores says nothing about the methods' speed or memory on a GPU; the peak column "
                "is the trainer process's peak resident host memory (mostly libraries). The committed GPU table "
                "replaces this one.")
    else:
        title = f"# Methods comparison on the {args.shape} shape"
        note = ("Random weights (speed and memory do not depend on the values): the validation loss says how far "
                "each method fits the task from a random start on the same budget, not how well it adapts a "
                "pretrained model.")
    lines = [
        title, "",
        f"device: {device}; torch {torch_version}; task: sort and count inventory items (chat, synthetic); "
        f"budget per method: {args.steps} steps x micro-batch {args.batch} x max_seq_len {args.seq}; "
        f"gradient checkpointing {'on' if args.checkpointing else 'off'}; tokens/s is the median over steps "
        f"{args.warmup + 1}..{args.steps}; validation loss over {args.valid_rows} held-out rows at the end.", "",
        note, "",
        "| method | ok | learning rate | tokens/s | peak memory GiB | trainable params | "
        "first train loss | final valid loss | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r["peak_gpu_bytes"] if r["peak_gpu_bytes"] else r["peak_rss_bytes"]
        kind = "" if r["peak_gpu_bytes"] else " (host RSS)"
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['method']} | {'yes' if r['ok'] else 'NO: ' + str(r['error'])[:100]} | {r['learning_rate']:g} | "
            f"{fmt(r['tokens_per_second'], '{:,.0f}')} | {fmt(peak / gib if peak else None, '{:.2f}')}{kind} | "
            f"{fmt(r['trainable_params'], '{:,}')} | {fmt(r['first_train_loss'], '{:.3f}')} | "
            f"{fmt(r['final_valid_loss'], '{:.3f}')} | {r['wall_s']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b", help="a trainer.tiny.SHAPES name")
    ap.add_argument("--dry-run", action="store_true", help="CPU-sized: the tiny model, few steps, short rows")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 200; dry run 12)")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default 8; dry run 4)")
    ap.add_argument("--seq", type=int, default=None, help="max_seq_len (default 1024; dry run 96)")
    ap.add_argument("--warmup", type=int, default=3, help="metric events left out of the tokens/s median")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tuneq-methods-bench"))
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.steps = args.steps or (12 if args.dry_run else 200)
    args.batch = args.batch or (4 if args.dry_run else 8)
    args.seq = args.seq or (96 if args.dry_run else 1024)
    args.valid_rows = 16 if args.dry_run else 64
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")

    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args)
    # ~2 tokens per item word with its comma: rows fill most of max_seq_len, capped by it.
    words = max(2, args.seq // 6)
    train = write_jsonl(args.work / "train.jsonl", domain_rows(args.batch * args.steps, 1, words))
    valid = write_jsonl(args.work / "valid.jsonl", domain_rows(args.valid_rows, 2, words))
    rows = []
    for name in names:
        rows.append(run_method(name, model, train, valid, args))
        print(json.dumps(rows[-1]), flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    text = table(rows, args, device, torch.__version__)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "methods_comparison.md").write_text(text)
    (args.results / "methods_comparison.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                     "device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
