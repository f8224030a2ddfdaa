"""How close is the planner's peak-memory prediction to what a GPU measures?

    python3 bench/plan_accuracy.py --out bench/results            # on a GPU (an H200 here)
    python3 bench/plan_accuracy.py --out /tmp/x --dry-run         # anywhere: predictions only

Grid: method (full, lora, qlora) x Llama shapes (~0.5B, 1.24B, ~3B) x seq (512, 2048) x
gradient checkpointing (off, on), micro-batch 4. Every cell runs in a fresh subprocess, so one
cell's allocator state, cached kernels or OOM never leaks into the next. A cell builds the model
from its config with random weights (speed and memory do not depend on the values), applies the
method, runs three steps (forward with labels, backward, grad clip, fused AdamW, zero_grad) on
random ids with one padded row (the trainer pads to the longest example), resets the peak after
step 1 (optimizer states exist from then on) and records torch.cuda.max_memory_allocated.

QLoRA has to load through from_pretrained to quantise, so each shape is saved once in bf16 to a
temporary directory first. Writes DIR/plan_accuracy.md and DIR/plan_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 1024**3

# name -> (hidden, layers, heads, kv_heads, ffn, vocab, tied). Own copy, so the benchmark does
# not move when the demo shapes elsewhere do.
SHAPES = {
    "llama-0.5b": (896, 24, 14, 2, 4864, 151_936, True),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128_256, True),
    "llama-3.2-3b": (3072, 28, 24, 8, 8192, 128_256, True),
}
METHODS = ("full", "lora", "qlora")
SEQS = (512, 2048)
BATCH = 4
STEPS = 3
LORA_R, LORA_ALPHA = 16, 32


def llama_config(shape: str):
    from transformers import LlamaConfig

    hidden, layers, heads, kv, ffn, vocab, tied = SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def predict(cell: dict) -> dict:
    from trainer.planner import estimate_compute, estimate_memory

    cfg = llama_config(cell["shape"])
    est = estimate_memory(
        cfg,
        method=cell["method"],
        batch_size=cell["batch"],
        seq_len=cell["seq"],
        gradient_checkpointing=cell["ckpt"],
        # torch's fused AdamW keeps m and v in the parameters' dtype, which is what runs here.
        optimizer="adamw_torch",
        lora_r=LORA_R,
        padded=True,
    )
    comp = estimate_compute(
        cfg, method=cell["method"], tokens=cell["batch"] * cell["seq"], seq_len=cell["seq"],
        gradient_checkpointing=cell["ckpt"], lora_r=LORA_R,
    )
    return {"estimate": est.to_dict(), "flops_per_step": comp.total_flops}


# ---------------------------------------------------------------------------------------------
# Inside the subprocess
# ---------------------------------------------------------------------------------------------


def save_shape(shape: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(out_dir)


def run_cell(cell: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    cfg = llama_config(cell["shape"])
    if cell["method"] == "qlora":
        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            cell["saved_dir"], quantization_config=qc, dtype=torch.bfloat16, device_map={"": 0},
            attn_implementation="sdpa",
        )
    else:
        with dev:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    if cell["method"] in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                       task_type="CAUSAL_LM"),
        )
    if cell["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    B, S, V = cell["batch"], cell["seq"], cfg.vocab_size
    ids = torch.randint(3, V, (B, S), device=dev)
    mask = torch.ones(B, S, dtype=torch.long, device=dev)
    mask[-1, -S // 8:] = 0  # one shorter example: the batch is padded, as the trainer's are
    labels = ids.masked_fill(mask == 0, -100)
    static = torch.cuda.memory_allocated()

    times = []
    for step in range(STEPS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step == 0:
            torch.cuda.reset_peak_memory_stats()
    return {
        "measured_allocated": torch.cuda.max_memory_allocated(),
        "measured_reserved": torch.cuda.max_memory_reserved(),
        "static_after_load": static,
        "trainable_params": sum(p.numel() for p in params),
        "step_seconds": min(times[1:]),
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def grid(shapes, methods, seqs) -> list[dict]:
    # Shape-major, small first, so a time budget cut still leaves every method measured.
    cells = []
    for shape in shapes:
        for seq in seqs:
            for ckpt in (False, True):
                for method in methods:
                    cells.append({"shape": shape, "method": method, "seq": seq, "ckpt": ckpt, "batch": BATCH})
    return cells


def cell_name(c: dict) -> str:
    return f"{c['method']} {c['shape']} S{c['seq']} B{c['batch']} ckpt {'on' if c['ckpt'] else 'off'}"


def write_report(rows: list[dict], out: Path, device: str, dry: bool) -> str:
    lines = [
        "# Planner accuracy: predicted vs measured peak memory",
        "",
        f"Device: {device}. Micro-batch {BATCH}, LoRA r{LORA_R} all-linear, fused AdamW (states in the "
        "parameters' dtype), one padded row per batch, peak after step 1 of 3.",
        "Predicted: the planner's `allocated` (comparable to `torch.cuda.max_memory_allocated`); "
        "`total` adds fragmentation and is compared with max_memory_reserved.",
        "",
        "| cell | predicted GiB | measured GiB | error % | predicted total GiB | reserved GiB | peak at | step s | MFU % |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    errs = []
    for r in rows:
        est = r["prediction"]["estimate"]
        pred = est["allocated"] / GiB
        m = r.get("measured")
        if m and "measured_allocated" in m:
            meas = m["measured_allocated"] / GiB
            err = 100.0 * (pred - meas) / meas
            errs.append(abs(err))
            mfu = 100.0 * r["prediction"]["flops_per_step"] / m["step_seconds"] / 790e12
            lines.append(
                f"| {r['cell']} | {pred:.2f} | {meas:.2f} | {err:+.1f} | {est['total'] / GiB:.2f} | "
                f"{m['measured_reserved'] / GiB:.2f} | {est['peak_at']} | {m['step_seconds']:.3f} | {mfu:.0f} |"
            )
        else:
            status = "dry run" if dry else (m or {}).get("error", "not run")
            lines.append(
                f"| {r['cell']} | {pred:.2f} | {status} |  | {est['total'] / GiB:.2f} |  | {est['peak_at']} |  |  |"
            )
    if errs:
        lines += ["", f"Mean |error| {sum(errs) / len(errs):.1f} %, max {max(errs):.1f} % over {len(errs)} cells."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_accuracy.md").write_text(text)
    (out / "plan_accuracy.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the .md and .json go")
    ap.add_argument("--dry-run", action="store_true", help="print predictions only; needs no GPU")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seqs", nargs="+", type=int, default=list(SEQS))
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting cells after this long")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--save-shape", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.save_shape:
        save_shape(*args.save_shape)
        return 0
    if args.cell:
        print("RESULT " + json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return 0

    t_start = time.time()
    cells = grid(args.shapes, args.methods, args.seqs)
    rows = [{"cell": cell_name(c), "config": c, "prediction": predict(c)} for c in cells]
    device = "none (dry run)"
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run for predictions only", file=sys.stderr)
            return 2
        device = torch.cuda.get_device_name(0)
        tmp = Path(tempfile.mkdtemp(prefix="plan_accuracy_"))
        saved: dict[str, str] = {}
        if "qlora" in args.methods:
            for shape in args.shapes:
                d = tmp / shape
                subprocess.run([sys.executable, __file__, "--save-shape", shape, str(d)], check=True)
                saved[shape] = str(d)
        for r in rows:
            if time.time() - t_start > args.budget_s:
                r["measured"] = {"error": "skipped: time budget"}
                continue
            c = dict(r["config"], saved_dir=saved.get(r["config"]["shape"]))
            t0 = time.time()
            p = subprocess.run(
                [sys.executable, __file__, "--cell", json.dumps(c)], capture_output=True, text=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
            got = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
            if got:
                r["measured"] = json.loads(got[-1][len("RESULT "):])
            else:
                tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
                r["measured"] = {"error": f"failed: {tail[0][:120]}"}
            r["cell_seconds"] = round(time.time() - t0, 1)
            m = r["measured"]
            pred = r["prediction"]["estimate"]["allocated"] / GiB
            meas = m.get("measured_allocated", 0) / GiB
            print(f"{r['cell']:<40} pred {pred:6.2f} GiB  meas {meas:6.2f} GiB  ({r['cell_seconds']} s)", flush=True)
    print(write_report(rows, Path(args.out), device, args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
