"""Run the real trainer (`python -m trainer run`) for full, lora and qlora on a full-size shape.

Random weights (speed and memory do not depend on the values), the tiny tokenizer (its ids are a
subset of the model's vocabulary), chat rows long enough to fill max_seq_len. Prints a table of
tokens/s and peak memory per method and writes it under --results.

    python3 bench/trainer_methods.py --shape llama-3.2-1b --seq 2048 --batch 8 --steps 12
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


def build_model_dir(shape: str, dest: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.tiny import build_config, build_tokenizer

    if (dest / "config.json").exists():
        return dest
    config = build_config(shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    build_tokenizer().save_pretrained(dest)
    del model
    return dest


def long_chat_file(path: Path, n: int, words_per_row: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocab = "alpha beta gamma delta river stone cloud tiger lemon piano ocean maple robot candle".split()
    with open(path, "w") as f:
        for _ in range(n):
            user = " ".join(rng.choice(vocab) for _ in range(words_per_row // 4))
            answer = " ".join(rng.choice(vocab) for _ in range(words_per_row))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def run_method(method: str, model_dir: Path, data: Path, work: Path, args: argparse.Namespace) -> dict:
    out = work / method
    spec = {
        "model": str(model_dir), "method": method, "training_file": str(data),
        "hyperparameters": {"max_steps": args.steps, "batch_size": args.batch, "max_seq_len": args.seq,
                            "learning_rate": 1e-4 if method != "full" else 1e-5, "warmup_steps": 1},
        "gradient_checkpointing": args.checkpointing,
    }
    if method != "full":
        spec["lora"] = {"r": 16, "alpha": 32}
    shutil.rmtree(out, ignore_errors=True)  # events.jsonl is appended to: start clean
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    t0 = time.time()
    cmd = [sys.executable, "-m", "trainer", "run", str(out / "spec.json"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    wall = time.time() - t0
    (out / "trainer.log").write_text(proc.stdout + proc.stderr)
    events_path = out / "events.jsonl"
    events = [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()] if events_path.exists() else []
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    errors = [e for e in events if e["type"] == "error"]
    timed = metrics[args.warmup:]
    return {
        "method": method,
        "ok": proc.returncode == 0,
        "error": errors[-1]["message"] if errors else (proc.stderr[-500:] if proc.returncode else None),
        "steps": len(metrics),
        "tokens_per_second": statistics.median(m["tokens_per_second"] for m in timed) if timed else None,
        "peak_gib": max((m["peak_memory_bytes"] or 0) for m in metrics) / 2**30 if metrics else None,
        "final_loss": metrics[-1]["train_loss"] if metrics else None,
        "trainable_params": next((e["data"]["trainable_params"] for e in events if e["type"] == "start"), 0),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="metric events left out of the median")
    ap.add_argument("--methods", default="lora,qlora,full")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tuneq-bench"))
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, args.work / args.shape)
    # ~1.1 tiny-tokenizer tokens per word plus spaces: enough words that every row is truncated.
    data = long_chat_file(args.work / "train.jsonl", n=args.batch * (args.steps + 2), words_per_row=args.seq)
    rows = [run_method(m, model_dir, data, args.work, args) for m in args.methods.split(",")]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [
        f"# trainer methods on {args.shape}, seq {args.seq}, micro-batch {args.batch}, "
        f"checkpointing {'on' if args.checkpointing else 'off'}",
        "",
        f"device: {device}; torch {torch.__version__}; {args.steps} steps, median of steps {args.warmup + 1}..{args.steps}",
        "",
        "| method | ok | tokens/s | peak GiB (max_memory_allocated) | trainable params | final loss | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tps = f"{r['tokens_per_second']:,.0f}" if r["tokens_per_second"] else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "-"
        lines.append(f"| {r['method']} | {'yes' if r['ok'] else 'NO: ' + str(r['error'])[:120]} | {tps} | {peak} | "
                     f"{r['trainable_params']:,} | {loss} | {r['wall_s']} |")
    table = "\n".join(lines)
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"trainer_methods_{args.shape}_seq{args.seq}_b{args.batch}{'_ckpt' if args.checkpointing else ''}"
    (args.results / f"{stem}.md").write_text(table + "\n")
    (args.results / f"{stem}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
