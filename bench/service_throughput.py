"""What a job delivers: `python -m trainer run` on a real packed dataset against the step bench.

The step bench (bench/train_throughput.py) times the trainer's step on rows of random ids. A job
runs the whole path: reading and packing the data, collating, the loop, its events. Here both
run in one call on the same GPU, same shape, same method and settings:

  bench   bench/train_throughput.py's row (its table is written beside this one);
  job-*   the trainer as the worker launches it, on text examples of 64..1024 tokens packed into
          rows of max_seq_len; log_every_steps 1, so every step's tokens/s is an event (timed by
          the GPU's clock, trainer.step_values). Variants set environment switches
          (TUNEQ_PACKED_ATTENTION=0: transformers' packed-sequence mask, as before).

Per job: the median tokens/s of the steady steps (from step 6, leaving out steps that evaluate or
checkpoint, and the profiled ones), the worst of them, the ratio to the bench row, the cost of each
evaluation and checkpoint, and the start-up phases (the trainer's "startup" event, plus the time
from spawning the process to it).

    python bench/service_throughput.py                      # on the GPU (about 5 minutes)
    python bench/service_throughput.py --dry-run            # CPU, tiny model: the wiring
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

LORA = {"r": 16, "alpha": 32}
SETTINGS = {"lean-offload": {"speed": "lean", "checkpoint_offload": True}, "lean": {"speed": "lean"},
            "fast": {"speed": "fast"}}


def write_text_data(model_dir: Path, path: Path, tokens: int, seed: int = 0, lo: int = 64, hi: int = 1024) -> Path:
    """Text examples cut from the tiny corpus, lengths uniform in [lo, hi] tokens, `tokens` in all."""
    from transformers import AutoTokenizer

    from trainer.tiny import CORPUS

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(CORPUS.read_text(encoding="utf-8"))["input_ids"]
    while len(ids) < 4 * hi:
        ids = ids + ids
    rng = random.Random(seed)
    total = 0
    with open(path, "w") as f:
        while total < tokens:
            n = rng.randint(lo, hi)
            at = rng.randrange(0, len(ids) - n)
            f.write(json.dumps({"text": tok.decode(ids[at : at + n])}) + "\n")
            total += n
    return path


def run_job(name: str, args, model_dir: Path, data: Path, valid: Path | None, env_extra: dict, settings: dict,
            schedule: dict) -> dict:
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {
        "model": str(model_dir), "method": "lora", "lora": LORA, "training_file": str(data), "packing": True,
        "data_format": "text",
        **({"validation_file": str(valid)} if valid else {}),
        "hyperparameters": {"batch_size": args.batch, "max_seq_len": args.seq, "max_steps": args.steps,
                            "learning_rate": 2e-4, "warmup_steps": 2, "seed": 0},
        "schedule": {"log_every_steps": 1, **schedule},
        "precision": "fp32" if args.dry_run else "bf16",
        **settings,
    }
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, **env_extra,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-m", "trainer", "run", str(out / "spec.json"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=args.job_timeout)
    wall = time.time() - spawned
    (out / "trainer.log").write_text(proc.stdout + proc.stderr)
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines() if x.strip()]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    if proc.returncode != 0 or not metrics:
        errors = [e["message"] for e in events if e["type"] == "error"]
        return {"name": name, "ok": False, "error": (errors[-1] if errors else proc.stderr[-800:])}
    # The step after an evaluation or a checkpoint; with a profile, its steps and the one after
    # them (whose time holds the profiler's writing of its tables).
    left_out = sorted({e["data"]["step"] + 1 for e in events if e["type"] in ("validation", "checkpoint")})
    if "TUNEQ_PROFILE_STEPS" in env_extra:
        a, b = map(int, env_extra["TUNEQ_PROFILE_STEPS"].split(":"))
        left_out = sorted({*left_out, *range(a, b + 1)})
    startup = next((e for e in events if e["type"] == "startup"), None)
    first_metrics = next(e for e in events if e["type"] == "metrics")
    last_metrics = [e for e in events if e["type"] == "metrics"][-1]
    return {
        "name": name, "ok": True, "env": env_extra, "settings": settings,
        **steady_stats([m["tokens_per_second"] for m in metrics], left_out),
        "left_out_steps": left_out,
        "step_tps": [round(m["tokens_per_second"]) for m in metrics],
        "last_step_tps": metrics[-1]["tokens_per_second"], "max_mfu": max((m.get("mfu") or 0) for m in metrics),
        "peak_gib": (metrics[-1].get("peak_memory_bytes") or 0) / 2**30,
        "evaluations_s": [e["data"].get("seconds") for e in events if e["type"] == "validation"],
        "checkpoints_s": [e["data"].get("seconds") for e in events if e["type"] == "checkpoint"],
        "startup": startup["data"] if startup else None,
        "spawn_to_first_step_s": round(first_metrics["time"] - spawned, 2),
        "spawn_to_last_step_s": round(last_metrics["time"] - spawned, 2),
        "estimate": wall_estimate(spec, model_dir, args),
        "wall_s": round(wall, 1),
        "fast_path": next(e["data"]["fast_path"] for e in events if e["type"] == "start"),
        "packed_rows": next(e["data"]["packed_rows"] for e in events if e["type"] == "start"),
    }


def wall_estimate(spec: dict, model_dir: Path, args) -> dict:
    """What POST /v1/fine_tuning/plan would say for this spec on this GPU: start-up plus steps, at
    the efficiency trainer/planning/speeds.json holds for the GPU model and setting."""
    from transformers import AutoConfig

    from trainer.planning import plan

    gpu = args.device_name
    p = plan(spec, AutoConfig.from_pretrained(str(model_dir)), 80 * 2**30, dataset_tokens=1, gpu_model=gpu,
             liger=True).to_dict()
    c = p.get("compute") or {}
    return {"gpu_model": gpu, "speed": p.get("speed"), "startup_s": c.get("startup_seconds"),
            "steps_s": c.get("seconds"), "wall_s": c.get("wall_seconds"), "efficiency": c.get("efficiency"),
            "source": c.get("efficiency_source")}


def record_speeds(args, jobs: list[dict]) -> None:
    """Write the measured tokens/s and start-up of the default job into trainer/planning/speeds.json,
    under the GPU model that ran it (a new entry for a GPU model it does not know)."""
    from trainer.planning import speeds

    # The last default job: a worker host has usually run one before (warm caches).
    job = next((j for j in reversed(jobs) if j["ok"] and "-default" in j["name"]), None)
    if job is None or not job.get("startup"):
        return
    data = json.loads(speeds.SPEEDS_FILE.read_text())
    found = speeds.gpu_entry(args.device_name, data)
    name, entry = found if found else (args.device_name, {"match": [args.device_name], "peak_tflops": 989.0, "runs": []})
    settings = SETTINGS[args.setting]
    key = speeds.setting_key("lora", settings["speed"])
    source = f"bench/results/{args.out.name}.md {job['name']} ({time.strftime('%Y-%m-%d')})"
    entry["runs"] = [r for r in entry.get("runs", []) if r["setting"] != key] + [
        {"setting": key, "model": "llama-3.2-1b", "lora_r": LORA["r"], "batch_size": args.batch, "seq_len": args.seq,
         "tokens_per_second": round(job["median_tps"]), "source": source}]
    phases = job["startup"]["phases"]
    from trainer.planning import model_shape
    from trainer.tiny import build_config

    weights_gib = 2 * model_shape(build_config("llama-3.2-1b")).total_params / 2**30  # bf16
    load = phases.get("load", 0.0)
    entry["startup"] = {"fixed_s": round(sum(phases.values()) - load, 2), "load_s_per_gib": round(load / weights_gib, 2),
                        "weights_gib": round(weights_gib, 3), "source": source + ": " + ", ".join(
                            f"{k} {v:.1f}" for k, v in phases.items())}
    data["gpus"][name] = entry
    speeds.SPEEDS_FILE.write_text(json.dumps(data, indent=1) + "\n")


def steady_stats(step_tps: list[float], left_out: list[int], first: int = 6) -> dict:
    """Median and worst tokens/s of steps first.. (1-based) less `left_out`."""
    steady = [x for n, x in enumerate(step_tps, 1) if n >= first and n not in left_out]
    if not steady:
        return {"median_tps": None, "worst_tps": None, "worst_share": None, "below_85": None}
    median = statistics.median(steady)
    return {"median_tps": median, "worst_tps": min(steady), "worst_share": min(steady) / median,
            "below_85": sum(1 for x in steady if x < 0.85 * median)}


def bench_row(args, setting: str) -> dict:
    """bench/train_throughput.py's tuneq row of this setting, in its own process; its table beside ours."""
    name = f"tuneq-lora-{setting}"
    out = args.out.with_name(args.out.name + "_step")
    cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--rows", name, "--steps", str(args.bench_steps),
           "--work", str(args.work / "tt"), "--out", str(out)] + (["--dry-run"] if args.dry_run else [])
    subprocess.run(cmd, cwd=ROOT, check=False, timeout=600)
    if not out.with_suffix(".json").exists():
        return {"name": name, "error": "the step bench wrote no table"}
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    return {"name": name, **rows.get(name, {"error": "no row"})}


def report(args, bench: dict, jobs: list[dict], device: str) -> str:
    ref = bench.get("tokens_per_second")
    lines = [f"# What a job delivers: `python -m trainer run` on packed text vs the step bench ({device})", "",
             f"Llama-3.2-1B shape{' (tiny, dry run)' if args.dry_run else ''}, random weights, LoRA r16 alpha 32 all "
             f"linear, batch {args.batch} x {args.seq}, {args.steps} steps; bench/service_throughput.py, "
             f"{time.strftime('%Y-%m-%d')}. Steady = steps 6..{args.steps}, less the step after an evaluation or "
             "checkpoint (whose own seconds are in their columns), and with a profile its steps and the one after "
             "(the profiler writing its tables). tokens/s counts input tokens (padding excluded); the bench row's "
             "rows are all tokens.", "",
             f"bench row {bench['name']}: {ref and round(ref):,} tokens/s, peak {bench.get('peak_gib') or 0:.2f} GiB "
             f"({bench.get('error', 'ok')})", "",
             "| job | median tok/s | / bench | worst step | worst / median | steps < 85 % | last step tok/s | max MFU | peak GiB | eval s | ckpt s | spawn to first step s | startup phases s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for j in jobs:
        if not j["ok"]:
            lines.append(f"| {j['name']} | not run: {j['error'][:200]!r} |" + " |" * 11)
            continue
        ratio = j["median_tps"] / ref if ref and j["median_tps"] else None
        phases = ", ".join(f"{k} {v}" for k, v in (j["startup"] or {}).get("phases", {}).items())
        lines.append(
            f"| {j['name']} | {j['median_tps']:,.0f} | {ratio and f'{ratio:.3f}'} | {j['worst_tps']:,.0f} | "
            f"{j['worst_share']:.2f} | {j['below_85']} | {j['last_step_tps']:,.0f} | {j['max_mfu']:.3f} | "
            f"{j['peak_gib']:.2f} | {j['evaluations_s']} | {j['checkpoints_s']} | {j['spawn_to_first_step_s']} | {phases} |")
    lines += ["", "The plan's time estimate (POST /v1/fine_tuning/plan: start-up plus steps, at the efficiency "
              "trainer/planning/speeds.json holds for this GPU model and setting) against the job's spawn to its "
              "last step (target ±15 %):", "",
              "| job | estimated start-up s | estimated steps s | estimated wall s | measured wall s | error % | efficiency from |",
              "|---|---|---|---|---|---|---|"]
    for j in jobs:
        est = j.get("estimate") or {}
        if not j["ok"] or not est.get("wall_s"):
            continue
        err = 100 * (est["wall_s"] - j["spawn_to_last_step_s"]) / j["spawn_to_last_step_s"]
        lines.append(f"| {j['name']} | {est['startup_s']:.1f} | {est['steps_s']:.1f} | {est['wall_s']:.1f} | "
                     f"{j['spawn_to_last_step_s']:.1f} | {err:+.1f} | {est['source']} |")
    lines += ["", "Start-up detail (s; device_ready: when the warm-up thread had the GPU's context, from "
              "the process's start; tokens_cached: the data check's tokens reused):", ""]
    lines += [f"- {j['name']}: {(j['startup'] or {}).get('detail')}" for j in jobs if j["ok"]]
    lines += ["", "Per-step tokens/s:", ""]
    lines += [f"- {j['name']} (left out: {j.get('left_out_steps')}): {j.get('step_tps')}" for j in jobs if j["ok"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--setting", default="lean-offload", choices=sorted(SETTINGS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--bench-steps", type=int, default=20)
    p.add_argument("--jobs", default="old-attention,default")
    p.add_argument("--profile", default="", help="a job to profile (steps 30..32)")
    p.add_argument("--work", type=Path, default=Path("/tmp/tuneq-service-throughput"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service_throughput_h100")
    p.add_argument("--job-timeout", type=float, default=300)
    p.add_argument("--report", type=Path, default=None, help="rewrite the table of an earlier run's .json")
    p.add_argument("--record-speeds", action="store_true",
                   help="write the default job's tokens/s and start-up into trainer/planning/speeds.json")
    args = p.parse_args()
    args.seq, args.batch = (64, 2) if args.dry_run else (2048, 8)
    if args.dry_run:
        args.steps, args.bench_steps = min(args.steps, 8), 2
        args.out = args.out.with_name("service_throughput_cpu_dryrun")
    if args.report:  # the table again, from the steps an earlier run recorded
        saved = json.loads(args.report.read_text())
        for j in saved["jobs"]:
            if j["ok"]:
                j.update(steady_stats(j["step_tps"], j.get("left_out_steps") or []))
        args.report.with_suffix(".md").write_text(report(args, saved["bench"], saved["jobs"], saved.get("device", "?")))
        args.report.write_text(json.dumps(saved, indent=1))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    args.device_name = device if device != "cpu" else "NVIDIA H100 80GB HBM3"  # a dry run estimates an H100
    bench = bench_row(args, args.setting)
    model_dir = args.work / "tt" / ("tiny" if args.dry_run else "llama-3.2-1b")
    data = write_text_data(model_dir, args.work / "train.jsonl", int(args.steps * args.batch * args.seq * 1.1))
    valid = write_text_data(model_dir, args.work / "valid.jsonl", 16 * args.seq, seed=1)
    # What the API's data check does at upload: the trainer then reads these tokens from the cache.
    from trainer.data.validate import validate_file
    from trainer.model import load_tokenizer

    checked = time.time()
    tokenizer = load_tokenizer(str(model_dir))
    for path in (data, valid):
        validate_file(path, tokenizer, args.seq, data_format="text")
    print(f"data check (tokenized into the cache): {time.time() - checked:.1f} s")
    variants = {"old-attention": {"TUNEQ_PACKED_ATTENTION": "0"}, "default": {}}
    jobs = []
    for name in args.jobs.split(","):
        env = dict(variants[name])
        schedule = {}
        if name == "default":  # also one evaluation and one checkpoint, reported apart
            schedule = {"eval_every_steps": args.steps // 2, "checkpoint_every_steps": args.steps // 2,
                        "eval_examples": 16}
        if name in args.profile.split(","):
            env.update(TUNEQ_PROFILE_STEPS="30:33", TUNEQ_PROFILE_DIR=str(args.work / f"profile-{name}"))
        # The same job again runs warm (page cache, kernel caches), as on a worker that ran one before.
        label = f"job-{args.setting}-{name}" + ("-again" if any(j["name"] == f"job-{args.setting}-{name}" for j in jobs) else "")
        jobs.append(run_job(label, args, model_dir, data,
                            valid if schedule else None, env, SETTINGS[args.setting], schedule))
        text = report(args, bench, jobs, device)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"device": device, "bench": bench, "jobs": jobs}, indent=1, default=str))
        if name in args.profile.split(","):
            prof = args.work / f"profile-{name}" / "profile-rank0.txt"
            if prof.exists():
                shutil.copy(prof, args.out.with_name(args.out.name + f"_profile_{name}.txt"))
    if args.record_speeds and not args.dry_run:
        record_speeds(args, jobs)
    print(report(args, bench, jobs, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
