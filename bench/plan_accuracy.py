"""How close is the planner's peak memory to what the REAL trainer measures?

    python3 bench/plan_accuracy.py                     # on the H200: the default grid (24 cells)
    python3 bench/plan_accuracy.py --quick             # 12 cells
    python3 bench/plan_accuracy.py --cells "lora llama-3.2-1b S2048 lean" "full llama-0.5b S512 fast"
    python3 bench/plan_accuracy.py --settings          # offload, optimizer-in-backward, batch 8 (1B)
    python3 bench/plan_accuracy.py --dry-run           # here, on CPU: 4 tiny cells end to end

Every cell is one `python -m trainer run SPEC --out DIR` process (the path a job takes: fast path,
accelerate's bf16 mixed precision, the chunked loss, fused LoRA, liger where installed), on a
model directory that holds a full-size Llama config (trainer.tiny.build_config) and the tiny
tokenizer. full and lora start from random weights built on the GPU (TUNEQ_RANDOM_INIT=1,
trainer/model.py); qlora must quantise on load, so each of its shapes is saved once in bf16.
The data is four text rows, three longer than max_seq_len and one 7/8 as long, so every batch
of 4 is padded to exactly max_seq_len, as the planner assumes. Three optimizer steps; the peak is
the `peak_memory_bytes` of the step-3 metrics event (torch.cuda.max_memory_allocated since the
process started), after which the bench stops the trainer rather than wait for its export.

Predicted: trainer.planning.estimate_for_spec for the very spec the cell ran (its `allocated`,
which is what max_memory_allocated counts), told whether liger's kernels were on (the start
event says). Writes DIR/plan_accuracy_real_trainer.md and .json (dry run: ..._dryrun.*); on CPU
the peak cannot be measured and is recorded as n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 1024**3
SHAPES = ("llama-0.5b", "llama-3.2-1b", "llama-3.2-3b")
METHODS = ("full", "lora", "qlora")
SEQS = (512, 2048)
SPEEDS = ("fast", "lean")
BATCH, STEPS = 4, 3
# Seconds a cell costs besides its steps: interpreter, torch/transformers/peft imports, CUDA
# context, random init on the GPU, the loss probe; qlora also reads and quantises its weights.
CELL_START_S, QLORA_LOAD_S_PER_GB = 9.0, 1.5
DRY_SHAPE = {"vocab_size": 768, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
             "max_position_embeddings": 2048}


def cell_name(c: dict) -> str:
    """'lora llama-3.2-1b S2048 lean', then ' B8' for a micro-batch other than 4, ' offload'
    (checkpoint_offload) and ' inbwd' (optimizer_in_backward) where the cell sets them."""
    name = f"{c['method']} {c['shape']} S{c['seq']} {c['speed']}"
    if c.get("batch", BATCH) != BATCH:
        name += f" B{c['batch']}"
    return name + "".join(f" {flag}" for flag in FLAGS if c.get(flag))


# A cell's switches beyond method, shape, seq, speed and batch: name -> the spec's field.
FLAGS = {"offload": "checkpoint_offload", "inbwd": "optimizer_in_backward"}


def parse_cell(name: str) -> dict:
    """cell_name's inverse: 'lora llama-3.2-1b S2048 lean B8 offload' -> the cell."""
    words = name.split()
    if len(words) < 4 or words[0] not in METHODS or words[1] not in SHAPES or not words[2].startswith("S") \
            or words[3] not in SPEEDS:
        raise ValueError(f"{name!r}: names look like 'lora llama-3.2-1b S2048 lean [B8] [offload] [inbwd]'")
    c = {"shape": words[1], "method": words[0], "seq": int(words[2][1:]), "speed": words[3], "batch": BATCH}
    for w in words[4:]:
        if w.startswith("B") and w[1:].isdigit():
            c["batch"] = int(w[1:])
        elif w in FLAGS:
            c[w] = True
        else:
            raise ValueError(f"{name!r}: unknown word {w!r} (B<batch>, {', '.join(FLAGS)})")
    return c


def setting_cells(shape: str = "llama-3.2-1b", seq: int = 2048, batch: int = 8) -> list[dict]:
    """The settings beyond speed, at a micro-batch above 4: checkpoint_offload and
    optimizer_in_backward for LoRA and full, lean and fast at batch 8."""
    c = {"shape": shape, "seq": seq, "batch": batch}
    return [
        {**c, "method": "lora", "speed": "lean"}, {**c, "method": "lora", "speed": "lean", "offload": True},
        {**c, "method": "lora", "speed": "fast"}, {**c, "method": "qlora", "speed": "lean", "offload": True},
        {**c, "method": "full", "speed": "lean", "inbwd": True},
        {**c, "method": "full", "speed": "lean", "offload": True, "inbwd": True},
        {**c, "method": "lora", "speed": "lean", "offload": True, "inbwd": True},
    ]


def grid(shapes=SHAPES, methods=METHODS, seqs=SEQS, speeds=SPEEDS) -> list[dict]:
    return [{"shape": s, "method": m, "seq": q, "speed": sp, "batch": BATCH}
            for s in shapes for q in seqs for sp in speeds for m in methods]


def default_cells() -> list[dict]:
    """24 cells for about 240-270 s of H200 (most of it process start): every method x seq x
    speed on the 1B shape; on the 0.5B shape (vocabulary 152k: the loss weighs most) seq 2048 and
    lean 512; the 3B shape at 2048 lean (full, lora) and 512 fast (lora)."""
    cells = grid(shapes=("llama-3.2-1b",))
    cells += grid(shapes=("llama-0.5b",), seqs=(2048,)) + grid(shapes=("llama-0.5b",), seqs=(512,), speeds=("lean",))
    cells += [{"shape": "llama-3.2-3b", "method": m, "seq": 2048, "speed": "lean", "batch": BATCH} for m in ("full", "lora")]
    cells.append({"shape": "llama-3.2-3b", "method": "lora", "seq": 512, "speed": "fast", "batch": BATCH})
    return cells + setting_cells()


def quick_cells() -> list[dict]:
    return grid(shapes=("llama-3.2-1b",))


def config_of(shape: str):
    from transformers import LlamaConfig

    from trainer.tiny import build_config

    return LlamaConfig(**DRY_SHAPE) if shape == "tiny" else build_config(shape)


def spec_of(c: dict, model_dir: str, data: str, dry: bool) -> dict:
    return {
        "model": model_dir, "method": c["method"], "training_file": data,
        # prompt/completion rows are cut at max_seq_len (raw text would be split into windows).
        "data_format": "prompt_completion", "train_on_inputs": True,
        "speed": c["speed"], "optimizer": "adamw", "precision": "auto" if dry else "bf16",
        "hyperparameters": {"batch_size": c["batch"], "max_seq_len": c["seq"], "max_steps": STEPS,
                            "learning_rate": 1e-5, "warmup_steps": 0,
                            # an update in backward comes before the whole gradient's norm exists
                            **({"max_grad_norm": 0} if c.get("inbwd") else {})},
        "schedule": {"log_every_steps": 1},
        **{field: True for flag, field in FLAGS.items() if c.get(flag)},
    }


def predict(c: dict, spec: dict, liger: bool = False) -> dict:
    from trainer.planning import estimate_compute, estimate_for_spec

    cfg = config_of(c["shape"])
    est = estimate_for_spec(spec, cfg, liger=liger)
    comp = estimate_compute(cfg, method=c["method"], tokens=c["batch"] * c["seq"], seq_len=c["seq"],
                            gradient_checkpointing=c["speed"] == "lean")
    return {"estimate": est.to_dict(), "flops_per_step": comp.total_flops, "step_seconds": comp.seconds}


def expected_seconds(cells: list[dict]) -> float:
    from trainer.planning import model_shape

    total = 0.0
    for c in cells:
        step = predict(c, spec_of(c, "m", "d", False))["step_seconds"]
        total += CELL_START_S + STEPS * step
    for shape in {c["shape"] for c in cells if c["method"] == "qlora"}:
        gb = 2 * model_shape(config_of(shape)).total_params / 1e9
        total += CELL_START_S + gb * QLORA_LOAD_S_PER_GB * (1 + sum(1 for c in cells if c["shape"] == shape and c["method"] == "qlora"))
    return total


# ---------------------------------------------------------------------------------------------
# Model directories and data
# ---------------------------------------------------------------------------------------------


def write_model_dir(shape: str, out: Path, with_weights: bool, device: str) -> Path:
    """config.json + tokenizer; with_weights: bf16 random weights too (built on `device`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.tiny import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    cfg = config_of(shape)
    cfg.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    if with_weights:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(out)
    return out


def write_data(model_dir: Path, seq: int, path: Path, batch: int = BATCH) -> Path:
    """`batch` rows: all but one cut at max_seq_len and one 7/8 as long, so each batch (the whole
    file) is padded to exactly max_seq_len."""
    from transformers import AutoTokenizer

    from trainer.tiny import CORPUS

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = CORPUS.read_text(encoding="utf-8")
    ids = tok(text)["input_ids"]
    while len(ids) < 2 * seq + 64:
        ids = ids + ids
    rows = [tok.decode(ids[k * 17 : k * 17 + seq + 64]) for k in range(batch - 1)]
    rows.append(tok.decode(ids[: seq * 7 // 8]))
    path.write_text("".join(json.dumps({"prompt": r, "completion": " end"}) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# One cell
# ---------------------------------------------------------------------------------------------


def read_events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line still being written
    return out


def run_cell(c: dict, model_dir: Path, work: Path, dry: bool, timeout_s: float) -> dict:
    """Run the trainer on this cell; stop it once step STEPS has reported its metrics."""
    run_dir = work / cell_name(c).replace(" ", "_")
    run_dir.mkdir(parents=True, exist_ok=True)
    data = write_data(model_dir, c["seq"], run_dir / "train.jsonl", c.get("batch", BATCH))
    spec = spec_of(c, str(model_dir), str(data), dry)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if c["method"] != "qlora":
        env["TUNEQ_RANDOM_INIT"] = "1"
    events_path = run_dir / "out" / "events.jsonl"
    t0 = time.time()
    with open(run_dir / "trainer.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(run_dir / "spec.json"), "--out",
                                 str(run_dir / "out")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        done = False
        while proc.poll() is None and time.time() - t0 < timeout_s:
            events = read_events(events_path)
            if any(e.get("type") == "metrics" and e.get("data", {}).get("step") == STEPS for e in events):
                done = True
                break
            time.sleep(0.2)
        if proc.poll() is None:
            # Its export (a full model's safetensors) would only cost time here.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    events = read_events(events_path)
    metrics = [e.get("data", {}) for e in events if e.get("type") == "metrics"]
    start = next((e.get("data", {}) for e in events if e.get("type") == "start"), {})
    result = {"seconds": round(time.time() - t0, 1), "spec": spec, "fast_path": start.get("fast_path"),
              "steps_seen": len(metrics), "examples": start.get("examples")}
    if not metrics:
        errors = [e.get("message") for e in events if e.get("type") == "error"]
        tail = (run_dir / "trainer.log").read_text().strip().splitlines()[-1:] or ["no output"]
        result["error"] = (errors[0] if errors else tail[0])[:200]
        return result
    peaks = [m.get("peak_memory_bytes") for m in metrics if m.get("peak_memory_bytes")]
    result["measured_allocated"] = max(peaks) if peaks else None
    result["tokens_per_second"] = metrics[-1].get("tokens_per_second")
    result["finished_steps"] = done
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def write_report(rows: list[dict], out: Path, device: str, dry: bool, stem: str = "") -> str:
    lines = [
        "# Planner accuracy against the real trainer (`python -m trainer run`)",
        "",
        f"Device: {device}. Micro-batch {BATCH} unless the cell says B<n> (one row 7/8 long: padded), "
        f"{STEPS} optimizer steps; 'offload' is checkpoint_offload, 'inbwd' optimizer_in_backward; "
        "AdamW (torch, fused on CUDA), bf16 mixed precision, fp32 master weights for full, LoRA r16 all-linear, "
        "QLoRA NF4; the trainer's default fast path (chunked loss, fused LoRA, liger when installed).",
        "Predicted: `estimate_for_spec(spec).allocated`; measured: the trainer's `peak_memory_bytes` "
        "(torch.cuda.max_memory_allocated since start). Target: every cell within ±10 %.",
        "",
        "| cell | predicted GiB | measured GiB | error % | peak at | loss | liger | predicted total GiB | cell s |",
        "|---|---:|---:|---:|---|---|---|---:|---:|",
    ]
    errs: list[tuple[float, str]] = []
    for r in rows:
        est = r["prediction"]["estimate"]
        pred = est["allocated"] / GiB
        m = r.get("measured") or {}
        fast = m.get("fast_path") or {}
        liger = ",".join(fast.get("liger_kernels") or []) or "-"
        meas = m.get("measured_allocated")
        if meas:
            err = 100.0 * (est["allocated"] - meas) / meas
            errs.append((abs(err), r["cell"]))
            shown = f"{meas / GiB:.2f} | {err:+.1f}"
        else:
            why = "n/a (CPU)" if dry and "error" not in m else m.get("error", "not run")
            shown = f"{why} | "
        lines.append(f"| {r['cell']} | {pred:.2f} | {shown} | {est['peak_at']} | {est['loss']} | {liger} | "
                     f"{est['total'] / GiB:.2f} | {m.get('seconds', '')} |")
    if errs:
        worst = max(errs)
        within = sum(1 for e, _ in errs if e <= 10)
        lines += ["", f"Mean |error| {sum(e for e, _ in errs) / len(errs):.1f} %, worst {worst[0]:.1f} % "
                  f"({worst[1]}); {within}/{len(errs)} cells within ±10 %."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or "plan_accuracy_real_trainer" + ("_dryrun" if dry else "")
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    return text


# ---------------------------------------------------------------------------------------------
# The planner against every peak recorded in bench/results (no GPU needed)
# ---------------------------------------------------------------------------------------------


def _recorded_spec(method: str, batch: int, seq: int, fast: dict, name: str, packing: bool = False) -> dict:
    spec = {"model": "m", "method": method, "training_file": "t", "precision": "bf16", "packing": packing,
            "hyperparameters": {"batch_size": batch, "max_seq_len": seq,
                                **({"max_grad_norm": 0} if fast.get("optimizer_in_backward") else {})},
            "speed": fast.get("speed", "fast"), "checkpoint_offload": bool(fast.get("checkpoint_offload")),
            "optimizer_in_backward": bool(fast.get("optimizer_in_backward"))}
    if method in ("lora", "qlora"):
        spec["lora"] = {"r": 16, "alpha": 32}
    if method == "full":
        spec["full_precision"] = "fp32" if "fp32" in name else "bf16"
    if "adam8" in name:
        spec["optimizer"] = "adamw_8bit"
    if spec["speed"] == "balanced":
        spec["checkpoint_layers"] = fast.get("checkpointed_layers")
    return spec


def recorded_measurements(results: Path) -> list[dict]:
    """(source, row, spec, shape, padded, measured GiB, fast path) of every recorded peak: this
    bench's cells, the service bench's jobs and the step bench's tuneq rows."""
    out = []
    for f in sorted(results.glob("plan_accuracy_real_trainer*.json")):
        if "dryrun" in f.name:
            continue
        d = json.loads(f.read_text())
        runs = d["rows"] if "rows" in d else [r for run in d.values() for r in run["rows"]]
        for r in runs:
            m = r.get("measured") or {}
            if m.get("measured_allocated"):
                out.append({"source": f.name, "row": r["cell"], "spec": m["spec"], "shape": r["config"]["shape"],
                            "padded": True, "measured": m["measured_allocated"] / GiB, "fast_path": m["fast_path"]})
    for f in sorted(results.glob("service_throughput_*.json")):
        if f.name.endswith("_step.json") or "dryrun" in f.name:
            continue
        d = json.loads(f.read_text())
        for j in d.get("jobs", []):
            if j.get("ok") and j.get("peak_gib"):
                spec = _recorded_spec("lora", 8, 2048, j["fast_path"], j["name"], packing=True)
                out.append({"source": f.name, "row": j["name"], "spec": spec, "shape": "llama-3.2-1b", "padded": False,
                            "measured": j["peak_gib"], "fast_path": j["fast_path"]})
    for f in sorted(results.glob("train_throughput_*.json")):
        d = json.loads(f.read_text())
        a = d.get("args") if isinstance(d.get("args"), dict) else {}
        for name, row in (d.get("rows") or {}).items():
            if not (name.startswith("tuneq-") and isinstance(row, dict) and row.get("peak_gib") and row.get("fast_path")):
                continue
            if (row.get("allocated_before_gib") or 0) > 0.5:
                continue  # void: an earlier row's memory was still held when it started (its table says)
            spec = _recorded_spec(name.split("-")[1], a.get("batch", 8), a.get("seq", 2048), row["fast_path"], name)
            out.append({"source": f.name, "row": name, "spec": spec, "shape": a.get("model", "llama-3.2-1b"),
                        "padded": False, "measured": row["peak_gib"], "fast_path": row["fast_path"]})
    return out


def recorded_errors(results: Path) -> list[tuple[dict, Any, float, bool]]:
    """(measurement, estimate, error %, whether its LoRA trainer predates the fused MLP) of each."""
    from trainer.planning import estimate_for_spec

    out = []
    for r in recorded_measurements(results):
        fast = r["fast_path"] or {}
        e = estimate_for_spec(r["spec"], config_of(r["shape"]), liger=bool(fast.get("liger_kernels")), padded=r["padded"])
        err = 100 * (e.allocated / GiB - r["measured"]) / r["measured"]
        out.append((r, e, err, r["spec"]["method"] in ("lora", "qlora") and "fused_lora_mlps" not in fast))
    return out


def recorded_report(results: Path) -> str:
    lines = ["# The planner against every peak recorded in bench/results", "",
             "`python bench/plan_accuracy.py --recorded`: each recorded run's spec (this bench's cells, the service "
             "bench's jobs, the step bench's tuneq rows: batch 8 x 2048, no padding) planned again by "
             "`estimate_for_spec(...).allocated`, told whether liger ran, against its measured peak "
             "(torch.cuda.max_memory_allocated). Rows whose LoRA trainer predates the fused LoRA MLP "
             "(no `fused_lora_mlps` in its fast path) are shown apart: the planner models the trainer as it is now. "
             "Step-bench rows that started with an earlier row's memory still allocated are left out (void).", "",
             "| source | row | setting | predicted GiB | measured GiB | error % | peak at |", "|---|---|---|---:|---:|---:|---|"]
    now, old = [], []
    for r, e, err, stale in recorded_errors(results):
        s = r["spec"]
        setting = " ".join(x for x in (s["method"], s["speed"], s.get("full_precision", ""),
                                      "offload" if s.get("checkpoint_offload") else "", "inbwd" if s.get("optimizer_in_backward") else "",
                                      f"B{s['hyperparameters']['batch_size']} S{s['hyperparameters']['max_seq_len']}") if x)
        (old if stale else now).append(abs(err))
        lines.append(f"| {r['source']} | {r['row']}{' (before the fused MLP)' if stale else ''} | {setting} | "
                     f"{e.allocated / GiB:.2f} | {r['measured']:.2f} | {err:+.1f} | {e.peak_at} |")
    if now:
        lines += ["", f"Trainer as it is now: {len(now)} rows, mean |error| {sum(now) / len(now):.1f} %, worst "
                  f"{max(now):.1f} %, {sum(1 for e in now if e <= 10)} within ±10 %."]
    if old:
        lines += [f"Before the fused LoRA MLP: {len(old)} rows, worst {max(old):.1f} % (not the trainer planned)."]
    return "\n".join(lines) + "\n"


def select(args) -> list[dict]:
    if args.dry_run:
        tiny = {"shape": "tiny", "seq": 64, "batch": BATCH}
        return [{**tiny, "method": m, "speed": "fast"} for m in ("full", "lora")] + [
            {**tiny, "method": "lora", "speed": "lean", "batch": 8, "offload": True},
            {**tiny, "method": "full", "speed": "lean", "inbwd": True}]
    cells = quick_cells() if args.quick else default_cells()
    if args.all:
        cells = grid()
    if args.settings:
        cells = setting_cells()
    if args.cells:
        try:
            cells = [parse_cell(n) for n in args.cells]
        except ValueError as err:
            raise SystemExit(f"--cells: {err}") from err
    return cells


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the .md and .json go")
    ap.add_argument("--stem", default="", help="their name (default plan_accuracy_real_trainer[_dryrun])")
    ap.add_argument("--dry-run", action="store_true", help="2 tiny cells through the trainer on CPU (peak n/a)")
    ap.add_argument("--quick", action="store_true", help="12 cells: the 1B shape only")
    ap.add_argument("--all", action="store_true", help="all 36 cells (about 330 s)")
    ap.add_argument("--cells", nargs="+", help="cells by name, e.g. 'lora llama-3.2-1b S2048 lean B8 offload'")
    ap.add_argument("--settings", action="store_true",
                    help="the 1B cells of checkpoint_offload, optimizer_in_backward and batch 8 (setting_cells)")
    ap.add_argument("--cell-timeout-s", type=float, default=120.0)
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no cell after this long")
    ap.add_argument("--estimate-only", action="store_true", help="print the cells and expected seconds, run nothing")
    ap.add_argument("--recorded", action="store_true",
                    help="no run: plan every peak recorded in bench/results again (plan_accuracy_recorded.md)")
    args = ap.parse_args()
    if args.recorded:
        text = recorded_report(ROOT / "bench" / "results")
        (Path(args.out) / "plan_accuracy_recorded.md").write_text(text)
        print(text)
        return 0

    cells = select(args)
    print(f"{len(cells)} cells, expected about {expected_seconds(cells) if not args.dry_run else 10 * len(cells):.0f} s",
          flush=True)
    if args.estimate_only:
        for c in cells:
            print(" ", cell_name(c))
        return 0
    t_start = time.time()
    import torch

    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        print("no CUDA device: run with --dry-run here", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if cuda else "CPU (dry run: peak memory not measurable)"
    work = Path(tempfile.mkdtemp(prefix="plan_accuracy_"))
    dirs: dict[tuple[str, bool], Path] = {}
    rows = []
    for c in cells:
        name = cell_name(c)
        weights = c["method"] == "qlora"
        key = (c["shape"], weights)
        if key not in dirs:
            dirs[key] = write_model_dir(c["shape"], work / f"{c['shape']}{'_w' if weights else ''}", weights,
                                        "cuda" if cuda else "cpu")
        if time.time() - t_start > args.budget_s:
            rows.append({"cell": name, "config": c, "measured": {"error": "skipped: time budget"},
                         "prediction": predict(c, spec_of(c, str(dirs[key]), "d", args.dry_run))})
            continue
        measured = run_cell(c, dirs[key], work, args.dry_run, args.cell_timeout_s)
        liger = bool((measured.get("fast_path") or {}).get("liger_kernels"))
        pred = predict(c, measured["spec"], liger=liger)
        rows.append({"cell": name, "config": c, "prediction": pred, "measured": measured})
        meas = measured.get("measured_allocated")
        print(f"{name:<34} pred {pred['estimate']['allocated'] / GiB:6.2f} GiB  "
              f"meas {(f'{meas / GiB:6.2f} GiB' if meas else measured.get('error', 'n/a')):>10}  "
              f"({measured['seconds']} s)", flush=True)
    print(write_report(rows, Path(args.out), device, args.dry_run, args.stem))
    print(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
