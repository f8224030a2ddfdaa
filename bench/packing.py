"""Packing on and off over the same short chat examples: tokens/s and final loss.

The real trainer (`python -m trainer run`) on a full-size shape with random weights (speed does
not depend on the values) and the tiny tokenizer. Chat examples of mixed lengths, mostly far
shorter than max_seq_len, as instruction data usually is: unpacked batches are mostly padding,
packed rows are full. Both runs see every example once; the packed run takes as many rows per
step as hold about the tokens of one unpacked batch, so both take about the same number of
optimizer steps and their losses compare. Loss is the held-out loss at the end (full_valid_loss).

    python3 bench/packing.py                       # on the GPU: llama-3.2-1b, seq 2048
    python3 bench/packing.py --dry-run             # on a CPU: a tiny shape, a few seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = "alpha beta gamma delta river stone cloud tiger lemon piano ocean maple robot candle north".split()


def build_model_dir(shape: str, dest: Path) -> Path:
    if (dest / "config.json").exists():
        return dest
    if shape != "tiny":
        from trainer.tiny import build_shape

        return build_shape(dest, shape)
    # A few layers of the Llama block: the dry run checks the path, not the speed.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.tiny import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def short_chat_file(path: Path, n: int, max_words: int, seed: int) -> Path:
    """Answers of 4..max_words words, log-uniform: many short ones, a few long ones."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = int(math.exp(rng.uniform(math.log(4), math.log(max_words))))
            user = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(3, 20)))
            answer = " ".join(rng.choice(VOCAB) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def mean_tokens(path: Path, model_dir: Path, seq: int) -> float:
    from transformers import AutoTokenizer

    from trainer.data.validate import validate_file

    report = validate_file(path, AutoTokenizer.from_pretrained(model_dir), seq)
    return report["tokens"] / report["examples"]


def run(name: str, packing: bool, batch: int, model_dir: Path, train: Path, valid: Path, work: Path,
        args: argparse.Namespace) -> dict:
    out = work / name
    # A second run on a machine that kept /tmp would otherwise append to the old events.jsonl
    # and report a mix of both runs (seen on the H200: tokens/s from stale timestamps).
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "model": str(model_dir), "method": args.method, "training_file": str(train), "validation_file": str(valid),
        "packing": packing,
        "hyperparameters": {"n_epochs": 1, "batch_size": batch, "max_seq_len": args.seq, "seed": 0,
                            "learning_rate": 1e-4 if args.method != "full" else 1e-5, "warmup_steps": 2},
        "schedule": {"log_every_steps": 1},
        "gradient_checkpointing": args.checkpointing,
    }
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "trainer", "run", str(out / "spec.json"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    (out / "trainer.log").write_text(proc.stdout + proc.stderr)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    metrics = [e for e in events if e["type"] == "metrics"]
    errors = [e["message"] for e in events if e["type"] == "error"]
    if proc.returncode != 0 or not metrics:
        return {"name": name, "ok": False, "error": errors[-1] if errors else proc.stderr[-500:]}
    # Rate over the steps after the first few (compile, allocator warm-up), from event times.
    skip = min(args.warmup, len(metrics) - 2) if len(metrics) > 2 else 0
    a, b = metrics[skip], metrics[-1]
    seconds = max(b["time"] - a["time"], 1e-9)
    tokens = b["data"]["tokens"] - a["data"]["tokens"]
    start = next(e["data"] for e in events if e["type"] == "start")
    final = next(e["data"]["metrics"] for e in events if e["type"] == "finished")
    return {
        "name": name, "ok": True, "packing": packing, "batch_size": batch, "steps": b["data"]["step"],
        "rows": start.get("packed_rows") or start["examples"], "examples": start["examples"],
        "tokens": b["data"]["tokens"], "tokens_per_second": tokens / seconds,
        "train_s": round(seconds, 2), "wall_s": round(wall, 1),
        "last_train_loss": b["data"]["train_loss"], "full_valid_loss": final.get("full_valid_loss"),
        "peak_memory_gib": (b["data"]["peak_memory_bytes"] or 0) / 2**30 or None,
    }


def table(rows: list[dict], args: argparse.Namespace, device: str) -> str:
    lines = [
        f"# Packing: {args.shape}, {args.method}, max_seq_len {args.seq}, {args.examples} short chat examples",
        "",
        f"Device: {device}. Same examples, one epoch each; tokens/s counts real (non-padding) tokens.",
        "",
        "| run | batch | rows | steps | tokens | tokens/s | train s | last train loss | full_valid_loss | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['name']} | failed: {r['error']} |||||||||")
            continue
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
        lines.append(
            f"| {r['name']} | {r['batch_size']} | {r['rows']} | {r['steps']} | {r['tokens']} | {r['tokens_per_second']:.0f} "
            f"| {r['train_s']} | {r['last_train_loss']:.4f} | {r['full_valid_loss']:.4f} | {peak} |"
        )
    if all(r["ok"] for r in rows) and len(rows) == 2:
        plain, packed = rows
        lines += ["", f"Packing gain: {packed['tokens_per_second'] / plain['tokens_per_second']:.2f}x tokens/s; "
                      f"full_valid_loss {plain['full_valid_loss']:.4f} unpacked vs {packed['full_valid_loss']:.4f} packed."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--method", default="lora", choices=["lora", "full", "qlora"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16, help="examples per unpacked micro-batch")
    p.add_argument("--examples", type=int, default=4000)
    p.add_argument("--max-words", type=int, default=600, help="longest answer, in words")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--work", type=Path, default=Path("/tmp/tuneq-bench-packing"))
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--dry-run", action="store_true", help="a tiny shape and a few examples, on any machine")
    args = p.parse_args()
    if args.dry_run:
        args.shape, args.seq, args.batch, args.examples, args.max_words, args.warmup = "tiny", 256, 8, 96, 80, 1
        args.work = args.work / "dry-run"

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, args.work / f"model-{args.shape}")
    train = short_chat_file(args.work / "train.jsonl", args.examples, args.max_words, seed=1)
    valid = short_chat_file(args.work / "valid.jsonl", max(16, args.examples // 20), args.max_words, seed=2)
    # Rows per packed step that hold about the tokens of one unpacked batch: equal steps.
    per_example = mean_tokens(train, model_dir, args.seq)
    packed_batch = max(1, round(args.batch * per_example / args.seq))
    print(f"{args.examples} examples, {per_example:.0f} tokens on average; packed batch {packed_batch} rows of {args.seq}")

    rows = [
        run("unpacked", False, args.batch, model_dir, train, valid, args.work, args),
        run("packed", True, packed_batch, model_dir, train, valid, args.work, args),
    ]
    text = table(rows, args, device)
    print(text)
    if not args.dry_run:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "packing.md").write_text(text)
        (args.results / "packing.json").write_text(json.dumps({"device": device, "args": {
            k: str(v) for k, v in vars(args).items()}, "runs": rows}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
