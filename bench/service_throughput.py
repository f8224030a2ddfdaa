"""What a job delivers: `python -m trainer run` on a real packed dataset against the step bench.

The step bench (bench/train_throughput.py) times the trainer's step on rows of random ids. A job
runs the whole path: reading and packing the data, collating, the loop, its events. Here both
run in one call on the same GPU, same shape, same method and settings:

  bench   bench/train_throughput.py's row (its table is written beside this one);
  job-*   the trainer as the worker launches it, on text examples of 64..1024 tokens packed into
          rows of max_seq_len; log_every_steps 1, so every step's tokens/s is an event (timed by
          the GPU's clock, trainer.step_values). Variants set environment switches
          (TUNEQ_PACKED_ATTENTION=0: transformers' packed-sequence mask, as before; TUNEQ_LIGER=0:
          the fast path without liger's kernels).

Per job: the median tokens/s of the steady steps (from step 6, leaving out steps that evaluate or
checkpoint, and the profiled ones), the worst of them, the ratio to the bench row, the cost of each
evaluation and checkpoint, and the start-up phases (the trainer's "startup" event, plus the time
from spawning the process to it).

Each job's wall time (spawn to last step) is set against the plan's estimate (start-up, steps,
checkpoints before the last step); --record-speeds writes the measured speeds and the checkpoint
rate into trainer/planning/speeds.json.

    python bench/service_throughput.py                      # on the GPU (about 5 minutes)
    python bench/service_throughput.py --dry-run            # CPU, tiny model: the wiring
    python bench/service_throughput.py --report bench/results/service_throughput_h100.json --record-speeds
                                                            # no GPU: refresh speeds.json from a run, replan
    python bench/service_throughput.py --fit-startup H100   # no GPU: refit only the start-up, from every run on record
    python bench/service_throughput.py --no-step-bench --settings "" --service-settings qlora-lean,qlora-lean --trace
                                                            # each slow step, where its time went, what ran beside it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.host_sampler import STALL_SHARE  # noqa: E402 - after the path fix above

LORA = {"r": 16, "alpha": 32}
# setting: (method, the job's speed fields, the step bench's row of the same settings)
SETTINGS = {
    "lora-lean-offload": ("lora", {"speed": "lean", "checkpoint_offload": True}, "tuneq-lora-lean-offload"),
    "lora-lean": ("lora", {"speed": "lean"}, "tuneq-lora-lean"),
    "lora-fast": ("lora", {"speed": "fast"}, "tuneq-lora-fast"),
    "qlora-lean": ("qlora", {"speed": "lean"}, "tuneq-qlora-lean"),
    "full-lean": ("full", {"speed": "lean", "full_precision": "bf16"}, "tuneq-full-bf16-lean"),
}
LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "full": 1e-5}
DRY_RUN_GPU = "NVIDIA H100 80GB HBM3"  # the GPU model a dry run's estimates are planned for


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


def job_spec(setting: str, args, model_dir: Path, data: Path, valid: Path | None, schedule: dict) -> dict:
    """The spec a job of this setting runs (and the planner times)."""
    method, settings, _ = SETTINGS[setting]
    return {
        "model": str(model_dir), "method": method, **({"lora": LORA} if method != "full" else {}),
        "training_file": str(data), "packing": True, "data_format": "text",
        **({"validation_file": str(valid)} if valid else {}),
        "hyperparameters": {"batch_size": args.batch, "max_seq_len": args.seq, "max_steps": args.steps,
                            "learning_rate": LEARNING_RATE[method], "warmup_steps": 2, "seed": 0},
        "schedule": {"log_every_steps": 1, **schedule},
        "precision": "fp32" if args.dry_run else "bf16",
        **settings,
    }


def default_schedule(args) -> dict:
    """A default job's schedule: one evaluation and one checkpoint halfway, reported apart."""
    return {"eval_every_steps": args.steps // 2, "checkpoint_every_steps": args.steps // 2, "eval_examples": 16}


def model_config(args, model_dir: Path | None = None):
    """The benched model's config: the Llama-3.2-1B shape (the tiny model's own in a dry run)."""
    from transformers import AutoConfig

    from trainer.tiny import build_config

    if args.dry_run:
        return AutoConfig.from_pretrained(str(model_dir or args.work / "tt" / "tiny"))
    return build_config("llama-3.2-1b")


def run_job(name: str, args, model_dir: Path, data: Path, valid: Path | None, env_extra: dict, setting: str,
            schedule: dict) -> dict:
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    settings = SETTINGS[setting][1]
    spec = job_spec(setting, args, model_dir, data, valid, schedule)
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
    left_out = sorted({*left_out, *held_steps()})
    startup = next((e for e in events if e["type"] == "startup"), None)
    first_metrics = next(e for e in events if e["type"] == "metrics")
    last_metrics = [e for e in events if e["type"] == "metrics"][-1]
    return {
        "name": name, "ok": True, "env": env_extra, "setting": setting, "settings": settings,
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
        "schedule": schedule,
        "estimate": wall_estimate(spec, model_config(args, model_dir), args.device_name),
        "wall_s": round(wall, 1),
        "fast_path": next(e["data"]["fast_path"] for e in events if e["type"] == "start"),
        "packed_rows": next(e["data"]["packed_rows"] for e in events if e["type"] == "start"),
    }


def wall_estimate(spec: dict, config, gpu: str) -> dict:
    """What POST /v1/fine_tuning/plan would say for this spec on this GPU: start-up, steps and the
    checkpoints before the last step, at what trainer/planning/speeds.json holds for the GPU model."""
    from trainer.planning import plan

    p = plan(spec, config, 80 * 2**30, dataset_tokens=1, gpu_model=gpu, liger=True).to_dict()
    c = p.get("compute") or {}
    return {"gpu_model": gpu, "speed": p.get("speed"), "startup_s": c.get("startup_seconds"),
            "steps_s": c.get("seconds"), "checkpoints": c.get("checkpoints"),
            "checkpoint_gib": (c.get("checkpoint_bytes") or 0) / 2**30, "checkpoint_s": c.get("checkpoint_seconds"),
            "wall_s": c.get("wall_seconds"), "efficiency": c.get("efficiency"), "source": c.get("efficiency_source"),
            "checkpoint_source": c.get("checkpoint_source")}


def checkpoint_gib(job: dict, args, config) -> float:
    """GiB one checkpoint of this job's spec writes, as the planner counts them."""
    from trainer.planning import plan
    from trainer.planning.compute import checkpoint_bytes

    method = SETTINGS[job["setting"]][0]
    spec = job_spec(job["setting"], args, Path("m"), Path("t"), None, job.get("schedule") or {})
    p = plan(spec, config, 80 * 2**30, liger=True)
    return checkpoint_bytes(p.methods[method].estimate) / 2**30


def fit_checkpoint_rate(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(fixed seconds, GiB/s) of seconds = fixed + GiB / rate, least squares over (GiB, seconds)
    points; through the origin when the fixed part comes out negative or the sizes are all alike."""
    if not points:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx > 0 else 0.0
    fixed = my - slope * mx
    if sxx <= 0 or fixed < 0 or slope <= 0:
        fixed, slope = 0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return fixed, 1.0 / slope


def record_speeds(args, jobs: list[dict], day: str) -> None:
    """Write each setting's measured tokens/s, the checkpoint rate fit to the jobs' checkpoint
    seconds and the planner's checkpoint bytes for their specs, and (unless --keep-startup) the
    start-ups (fit_startup) into trainer/planning/speeds.json under the GPU model that ran them (a
    new entry for a GPU model it does not know)."""
    from trainer.planning import speeds

    data = json.loads(speeds.SPEEDS_FILE.read_text())
    found = speeds.gpu_entry(args.device_name, data)
    name, entry = found if found else (args.device_name, {"match": [args.device_name], "peak_tflops": 989.0, "runs": []})
    config = model_config(args)
    points: list[tuple[float, float]] = []
    for job in jobs:
        if not job["ok"] or not job["name"].endswith("-default") or job.get("setting") not in SETTINGS:
            continue
        method, settings, _ = SETTINGS[job["setting"]]
        key = speeds.setting_key(method, settings["speed"], settings.get("full_precision"))
        run = {"setting": key, "model": "llama-3.2-1b", **({"lora_r": LORA["r"]} if method != "full" else {}),
               "batch_size": args.batch, "seq_len": args.seq, "tokens_per_second": round(job["median_tps"]),
               "source": f"bench/results/{args.out.name}.md {job['name']} ({day})"}
        entry["runs"] = [r for r in entry.get("runs", []) if r["setting"] != key] + [run]
        size = checkpoint_gib(job, args, config)
        points += [(size, s) for s in job.get("checkpoints_s") or [] if s is not None]
    fit = fit_checkpoint_rate(points)
    if fit:
        sizes = sorted({round(x, 2) for x, _ in points})
        entry["checkpoint"] = {"fixed_s": round(fit[0], 3), "gib_per_s": round(fit[1], 3),
                               "source": f"bench/results/{args.out.name}.md ({day}): least squares over {len(points)} "
                                         f"checkpoints of the default jobs, {sizes} GiB each"}
    if not args.keep_startup:
        own = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else None
        runs = startup_runs(args.device_name, (args.out.name, own) if own else None)
        entry["startup"] = fit_startup(runs, entry.get("startup", {}), day)
    data["gpus"][name] = entry
    speeds.SPEEDS_FILE.write_text(speeds_text(data))
    speeds._table.cache_clear()


def startup_runs(gpu: str, own: tuple[str, dict] | None = None,
                 folder: Path = ROOT / "bench" / "results") -> list[tuple[str, dict]]:
    """The runs whose start-ups speeds.json's entry for this GPU model is fit to: every run of this
    bench on record in bench/results for that GPU model whose service waited for the stack to be
    ready (its first row has `ready_s`: the start-up path a served job takes today), plus `own`
    (name, result), the run being recorded, wherever it was written."""
    from trainer.planning import speeds

    entry = speeds.gpu_entry(gpu)
    runs: dict[str, dict] = {}
    for path in sorted(folder.glob("service_throughput*.json")):
        try:
            result = json.loads(path.read_text())
        except ValueError:
            continue
        found = speeds.gpu_entry(result.get("device") or "")
        if (result.get("args") or {}).get("trace_stacks_ms"):
            continue  # the trainers sampled their own stacks: not the path a served job takes
        if found and entry and found[0] == entry[0] and any("ready_s" in j for j in result.get("service") or []):
            runs[path.stem] = result
    if own is not None:
        runs[own[0]] = own[1]
    return sorted(runs.items())


def fit_startup(runs: list[tuple[str, dict]], old: dict, day: str) -> dict:
    """The start-up entry of speeds.json (trainer.planning.speeds), fit to every job of `runs`
    (startup_runs) that measured it; a part no job measured is kept. Medians, since one host's
    first job after its start takes seconds longer than the rest, as does now and then a load:
    - the load rate: every job's load phase, over the stored bf16 weights;
    - a fresh trainer's fixed part: the default `python -m trainer run` jobs' phases from their
      process start, less the load;
    - the warm fixed part: the service's jobs whose trainer had its imports done (forked from the
      template or a standby), their submission to the first step seen through the API, less the
      load."""
    from trainer.planning import model_shape
    from trainer.planning.speeds import stored_weight_bytes
    from trainer.tiny import build_config

    entry = dict(old)
    weights_gib = stored_weight_bytes(model_shape(build_config("llama-3.2-1b")).total_params) / 2**30
    entry["weights_gib"] = round(weights_gib, 3)
    loads: list[float] = []
    fresh: list[float] = []
    warm: list[float] = []
    for _, result in runs:
        for part in result.get("settings", {}).values():
            for j in part["jobs"]:
                if j.get("ok") and j.get("startup") and j["name"].endswith("-default") and j.get("setting") in SETTINGS:
                    phases = {k: v for k, v in j["startup"]["phases"].items() if k not in ("queue", "validate")}
                    if phases.get("load") is not None:
                        loads.append(phases["load"])
                        fresh.append(sum(phases.values()) - phases["load"])
        for j in result.get("service") or []:
            detail = (j.get("startup") or {}).get("detail") or {}
            load = ((j.get("startup") or {}).get("phases") or {}).get("load")
            if j.get("ok") and load is not None and j.get("submit_to_first_step_s") and (detail.get("forked") or detail.get("standby")):
                loads.append(load)
                warm.append(j["submit_to_first_step_s"] - load)
    names = ", ".join(f"bench/results/{name}.md" for name, _ in runs)
    if loads:
        entry["load_s_per_gib"] = round(statistics.median(loads) / weights_gib, 2)
    if fresh:
        entry["fixed_s"] = round(statistics.median(fresh), 2)
        entry["source"] = (f"fit {day}, medians over the runs {names}: load {statistics.median(loads):.2f} s of "
                           f"{len(loads)} jobs ({min(loads):.2f}-{max(loads):.2f}); a fresh trainer's phases less the "
                           f"load, {len(fresh)} `python -m trainer run` jobs ({min(fresh):.2f}-{max(fresh):.2f})")
    if warm:
        entry["warm_fixed_s"] = round(statistics.median(warm), 2)
        entry["warm_source"] = (f"fit {day}, over the same runs: submit to first step less the load, median of "
                                f"{len(warm)} service jobs whose trainer's imports were done "
                                f"({min(warm):.2f}-{max(warm):.2f}; the larger ones are each stack's first job)")
    return entry


def speeds_text(data: dict) -> str:
    """speeds.json as people read it: one line per GPU model's field, and per measured run."""
    out = ["{", f' "about": {json.dumps(data["about"])},', ' "gpus": {']
    gpus = list(data["gpus"].items())
    for i, (name, entry) in enumerate(gpus):
        fields = []
        for key, value in entry.items():
            if key == "runs":
                runs = ",\n".join(f"    {json.dumps(r)}" for r in value)
                fields.append(f'   "runs": [\n{runs}\n   ]')
            else:
                fields.append(f"   {json.dumps(key)}: {json.dumps(value)}")
        out += [f"  {json.dumps(name)}: {{", ",\n".join(fields), "  }" + ("," if i < len(gpus) - 1 else "")]
    return "\n".join([*out, " }", "}"]) + "\n"


def held_steps() -> set[int]:
    """The steps --trace-hold holds (and the one after each range, whose time the hold's end may
    reach): left out of the steady statistics, as an evaluation's step is."""
    from trainer.profiling import HOLD_ENV, parse_steps

    steps = parse_steps(os.environ.get(HOLD_ENV, ""))
    return set(range(steps[0], steps[1] + 1)) if steps else set()


def steady_stats(step_tps: list[float], left_out: list[int], first: int = 6) -> dict:
    """Median and worst tokens/s of steps first.. (1-based) less `left_out`."""
    steady = [x for n, x in enumerate(step_tps, 1) if n >= first and n not in left_out]
    if not steady:
        return {"median_tps": None, "worst_tps": None, "worst_share": None, "below_85": None}
    median = statistics.median(steady)
    return {"median_tps": median, "worst_tps": min(steady), "worst_share": min(steady) / median,
            "below_85": sum(1 for x in steady if x < STALL_SHARE * median)}


def bench_rows(args, settings: list[str]) -> dict[str, dict]:
    """bench/train_throughput.py's tuneq rows of these settings, in its own process (its own table
    beside ours); setting -> row."""
    names = [SETTINGS[x][2] for x in settings]
    out = args.out.with_name(args.out.name + "_step")
    cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--rows", ",".join(names), "--steps",
           str(args.bench_steps), "--work", str(args.work / "tt"), "--out", str(out)] + (["--dry-run"] if args.dry_run else [])
    subprocess.run(cmd, cwd=ROOT, check=False, timeout=900)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").exists() else {}
    return {x: {"name": SETTINGS[x][2], **rows.get(SETTINGS[x][2], {"error": "the step bench wrote no row"})}
            for x in settings}


def trl_rows(args, data: Path, model_dir: Path) -> list[dict]:
    """TRL's SFTTrainer on the same file with its own packing (bench/trl_packed.py), checkpointing
    on (TRL's default) and off."""
    rows = []
    for variant in args.trl.split(","):
        out = args.work / f"trl-{variant}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(ROOT / "bench" / "trl_packed.py"), "--model-dir", str(model_dir), "--data", str(data),
               "--out", str(out), "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
               *(["--no-checkpointing"] if "nockpt" in variant else []),
               *(["--strategy", "wrapped"] if "wrapped" in variant else []), *(["--dry-run"] if args.dry_run else [])]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.job_timeout)
        if not out.exists():
            rows.append({"name": f"trl-lora-{variant}", "ok": False, "error": proc.stderr[-800:]})
            continue
        row = json.loads(out.read_text())
        rows.append({**row, **steady_stats(row["step_tps"], [])})
    return rows


@contextlib.contextmanager
def service_stack(work: Path, model_dir: Path, name: str = "svc", env: dict | None = None, tiny: Path | None = None):
    """`tuneq up` (SQLite, embedded Redis, the API and one worker with this host's GPU) in a fresh
    home under work/name with model_dir among its models, `env` added to its environment; yields
    a Client with the admin key once the stack says it is ready (GET /readyz?workers=1: the API's,
    the checking child's, the standby trainers' and the template's warm-ups and the kernels'
    compilation done), as a user submits once `tuneq up` says so; the client's `ready` holds the seconds from `tuneq up` to healthy and to ready.
    Its log: work/name.log. `tiny`: a tiny-llama built before, linked in so that `tuneq up` does
    not build (pretrain) its own."""
    import httpx

    from tuneq.client import Client

    home = work / name
    shutil.rmtree(home, ignore_errors=True)
    (home / "models").mkdir(parents=True)
    for model in dict.fromkeys(filter(None, [model_dir, tiny])):
        subprocess.run(["cp", "-al", str(model), str(home / "models" / model.name)], check=True)
    from core.ports import free_port

    port = free_port()
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the stack
    stack = subprocess.Popen([sys.executable, "-m", "tuneq", "up", "--home", str(home), "--port", str(port)], cwd=ROOT,
                             env={**os.environ, **(env or {}), "TUNEQ_HOME": str(home), "PYTHONUNBUFFERED": "1"},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    began = time.time()
    ready: dict[str, float] = {}
    try:
        deadline = began + 300
        for what, route in (("healthy_s", "/healthz"), ("ready_s", "/readyz?workers=1")):
            while True:
                try:
                    if (home / "admin.key").is_file() and httpx.get(base + route, timeout=2).status_code == 200:
                        ready[what] = round(time.time() - began, 2)
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or stack.poll() is not None:
                    raise RuntimeError(f"the stack did not get past {route}: see " + str(work / f"{name}.log"))
                time.sleep(0.1)
        client = Client(base, api_key=(home / "admin.key").read_text().strip(), timeout=60)
        client.ready = ready  # type: ignore[attr-defined]
        yield client
    finally:
        os.killpg(stack.pid, signal.SIGTERM)
        try:
            stack.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
        log.close()


def service_body(args, model_dir: Path, file_id: str, setting: str | None = None) -> dict:
    """A job body as a user posts it: with no speed field (setting None: the default the planner
    picks for this GPU), or with a setting's method and speed fields."""
    method, fields, _ = SETTINGS[setting] if setting else ("lora", {}, None)
    return {"model": model_dir.name, "training_file": file_id,
            "method": {"type": method, **({method: LORA} if method != "full" else {})},
            "packing": True, "data_format": "text", **fields,
            "hyperparameters": {"batch_size": args.batch, "max_seq_len": args.seq, "max_steps": args.steps,
                                "learning_rate": LEARNING_RATE[method], "warmup_steps": 2, "seed": 0},
            "schedule": {"log_every_steps": 1}}


def service_jobs(args, model_dir: Path, data: Path) -> list[dict]:
    """Jobs through the whole stack: `tuneq up` (SQLite, embedded Redis, the API and one worker
    with this host's GPU), the file uploaded and each job created over HTTP, its events read back
    through the API as they come. First `args.service` jobs with no speed field (the default a
    user gets), then one per `--service-settings` setting. Submit to first (last) step is from just
    before the POST to the first (last) metrics event seen through the API. Each job's time
    estimate is what POST /v1/fine_tuning/plan answered for its body just before."""
    from upload_cost import build_tiny

    jobs: list[dict] = []
    wanted = [None] * args.service + [x for x in args.service_settings.split(",") if x]
    try:
        # The tiny model built beforehand: the time to ready is the stack's start, not a first
        # `tuneq up`'s one-time build of its demo model. The plan times jobs for this GPU model.
        with service_stack(args.work, model_dir, tiny=build_tiny(args),
                           env={"TUNEQ_PLAN_GPU_MODEL": args.device_name}) as c:
            uploaded = time.time()
            file_id = c.upload_file(data)["id"]
            upload_s = time.time() - uploaded
            for i, setting in enumerate(wanted):
                if setting:
                    label = f"service-{setting}"
                else:
                    label = "service-default" + ("-again" * (i > 0)) + (f"-{i + 1}" if i > 1 else "")
                if i and args.service_gap:
                    # A host that ran a job a while ago (its standby refilled), not one that just ended one.
                    time.sleep(args.service_gap)
                    label += f"-after-{args.service_gap:g}s"
                body = service_body(args, model_dir, file_id, setting)
                planned = c.plan_job(body)["time"]
                jobs.append(_service_job(c, body, label, args, upload_s))
                jobs[-1]["service_setting"] = setting or "default"
                jobs[-1]["estimate"] = {"startup_s": planned["startup_seconds"], "steps_s": planned["seconds"],
                                        "checkpoints": planned["checkpoints"], "checkpoint_s": planned["checkpoint_seconds"],
                                        "wall_s": planned["wall_seconds"], "source": planned["efficiency_source"],
                                        "startup_source": planned.get("startup_source"), "checkpoint_source": None}
                if i == 0:
                    jobs[-1].update(c.ready)  # the stack's start, before its first job
                text = json.dumps(jobs[-1], default=str)
                print(text[:400], flush=True)
    except Exception as exc:  # noqa: BLE001 - a broken stack is a row, not a lost run
        jobs.append({"name": "service", "ok": False, "error": f"{type(exc).__name__}: {exc}"[:800]})
    return jobs


def _service_job(c, body: dict, label: str, args, upload_s: float, keep_events: bool = False) -> dict:
    submitted = time.time()
    job = c.create_job(body)
    post_s = time.time() - submitted
    seen: list[dict] = []
    first_step_seen = last_step_seen = None
    last_id = None
    deadline = submitted + args.job_timeout
    while time.time() < deadline:
        new = c.events_since(job["id"], last_id, limit=100)
        if new:
            last_id = new[-1]["id"]
            seen += new
        if first_step_seen is None and any(e["type"] == "metrics" for e in new):
            first_step_seen = time.time()
        if any(e["type"] == "metrics" for e in new):
            last_step_seen = time.time()  # the last batch of steps seen, whichever step the job ends on
        if c.get_job(job["id"])["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    final = c.get_job(job["id"])
    seen += c.events_since(job["id"], last_id, limit=100)
    metrics = [e["data"] for e in seen if e["type"] == "metrics"]
    if final["status"] != "succeeded" or not metrics:
        errors = [e["message"] for e in seen if e["level"] == "error"]
        return {"name": label, "ok": False, "error": f"{final['status']}: {errors[-1:] or final.get('error')}"}
    left_out = sorted({e["data"]["step"] + 1 for e in seen if e["kind"] in ("validation", "checkpoint")} | held_steps())
    startup = next((e["data"] for e in seen if e["kind"] == "startup"), None)
    progress = final.get("progress") or {}
    return {
        "name": label, "ok": True, "setting": "service", "id": job["id"],
        **steady_stats([m["tokens_per_second"] for m in metrics], left_out),
        "left_out_steps": left_out, "step_tps": [round(m["tokens_per_second"]) for m in metrics],
        "last_step_tps": metrics[-1]["tokens_per_second"], "max_mfu": max((m.get("mfu") or 0) for m in metrics),
        "peak_gib": (metrics[-1].get("peak_memory_bytes") or 0) / 2**30,
        "evaluations_s": [], "checkpoints_s": [e["data"].get("seconds") for e in seen if e["kind"] == "checkpoint"],
        "startup": startup, "progress_startup": progress.get("startup"),
        "speed": next((e["data"].get("fast_path", {}).get("speed") or e["data"].get("speed")
                       for e in seen if e["kind"] == "start"), None),
        "start": next((e["data"] for e in seen if e["kind"] == "start"), None),
        "submit_to_first_step_s": round(first_step_seen - submitted, 2) if first_step_seen else None,
        "submit_to_last_step_s": round(last_step_seen - submitted, 2) if last_step_seen else None,
        "submitted_at": submitted, "post_s": round(post_s, 3), "upload_s": round(upload_s, 2),
        "spawn_to_first_step_s": None, "spawn_to_last_step_s": None,
        **({"events": seen} if keep_events else {}),
    }


JOB_COLUMNS = ("| job | median tok/s | / bench | worst step | worst / median | steps < 85 % | last step tok/s | max MFU | "
               "peak GiB | eval s | ckpt s | spawn to first step s | startup phases s |")


def _not_run(row: dict, empty_columns: int) -> str:
    """A table row for a run that failed: its name, the end of its error, the other cells empty."""
    return f"| {row['name']} | not run: {row['error'][-300:]!r} |" + " |" * empty_columns


def bench_reference(bench: dict) -> float | None:
    """The step bench row's tokens/s at its median step: what a job's median steady step is held
    against. The row's own figure is its tokens over all its steps' seconds, which a few stalled
    steps pull down (and a job's ratio up) while the job's median ignores such steps in the job."""
    steps = bench.get("step_s") or []
    tps = bench.get("tokens_per_second")
    if not tps or not steps:
        return tps
    return tps * statistics.fmean(steps) / statistics.median(steps)


def _bench_line(bench: dict) -> str:
    ref, mean = bench_reference(bench), bench.get("tokens_per_second")
    steps = bench.get("step_s") or []
    stalls = ""
    if steps:  # the jobs' own rule for a slow step, over every timed step of the row
        stats = steady_stats([1.0 / s for s in steps], [], first=1)
        stalls = (f", {stats['below_85']} of its {len(steps)} steps under 85 % of its median "
                  f"(worst {stats['worst_share']:.2f})")
    return (f"step bench row {bench['name']}: {f'{ref:,.0f}' if ref else None} tokens/s at its median step "
            f"({f'{mean:,.0f}' if mean else None} over all its steps{stalls}), peak {bench.get('peak_gib') or 0:.2f} GiB "
            f"({bench.get('error', 'ok')}); / bench divides a job's median by the former")


def _job_line(j: dict, ref: float | None) -> str:
    if not j["ok"]:
        return _not_run(j, 11)
    ratio = j["median_tps"] / ref if ref and j["median_tps"] else None
    phases = ", ".join(f"{k} {v}" for k, v in (j["startup"] or {}).get("phases", {}).items())
    return (f"| {j['name']} | {j['median_tps']:,.0f} | {ratio and f'{ratio:.3f}'} | {j['worst_tps']:,.0f} | "
            f"{j['worst_share']:.2f} | {j['below_85']} | {j['last_step_tps']:,.0f} | {j['max_mfu']:.3f} | "
            f"{j['peak_gib']:.2f} | {j['evaluations_s']} | {j['checkpoints_s']} | {j.get('spawn_to_first_step_s')} | {phases} |")


def time_estimates(args, jobs: list[dict], replanned: dict | None) -> list[str]:
    """The plan's wall time against each job's spawn to last step; after --report, both the estimate
    the job got when it ran and the one planned again from today's speeds.json."""
    own = f"{args.out.name}.md"
    lines = ["## Time estimates", "", "The plan's time estimate (POST /v1/fine_tuning/plan: start-up, steps at the "
             "efficiency trainer/planning/speeds.json holds for this GPU model and setting, and the checkpoints "
             "written before the last step at the rate measured on that host) against what the job took (target "
             "±15 %). `python -m trainer run` rows (job-...): a fresh trainer, from its spawn to its last step, "
             "planned with the fresh start-up. Service rows (service-...): the plan the API answered for the job's "
             "body (the warm start-up: the worker's template or a standby had done the trainer's imports), "
             "against its submission to its last step seen through the API.", ""]
    if replanned:
        lines += [f"Planned after the run ({replanned['date']}, `--report`) from trainer/planning/speeds.json as it "
                  "stands then. Where a row says \"fit to this run\", that file's efficiency or checkpoint rate was "
                  "refreshed from these very jobs (`--record-speeds`), so the row checks the planner's sum of start-up, "
                  "steps and checkpoints, not a prediction: the refreshed figures are validated only by a later, "
                  "independent run. \"At run time\" is what the planner said when the job ran, from the speeds.json "
                  "of then.", ""]
    lines += ["| job | estimated start-up s | estimated steps s | checkpoints before the last step | estimated "
              "checkpoint s | estimated wall s | measured wall s | error % | " + ("at run time: wall s, error % | " if replanned else "")
              + "efficiency from | checkpoint rate from |",
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if replanned else "") + "---|"]
    for j in jobs:
        est = j.get("estimate") or {}
        if not j["ok"] or not est.get("wall_s"):
            continue
        measured = j.get("spawn_to_last_step_s") or j.get("submit_to_last_step_s")
        if not measured:
            continue
        err = 100 * (est["wall_s"] - measured) / measured
        saves = f"{est.get('checkpoints')} x {est.get('checkpoint_gib', 0):.2f} GiB" if "checkpoints" in est else "not counted"
        line = (f"| {j['name']} | {est['startup_s']:.1f} | {est['steps_s']:.1f} | {saves} | "
                f"{est.get('checkpoint_s') or 0:.1f} | {est['wall_s']:.1f} | {measured:.1f} | {err:+.1f} | ")
        if replanned:
            then = j.get("estimate_at_run") or {}
            line += (f"{then['wall_s']:.1f}, {100 * (then['wall_s'] - measured) / measured:+.1f} | "
                     if then.get("wall_s") else "- | ")
        fit = [what for what, src in (("efficiency", est.get("source")), ("checkpoint rate", est.get("checkpoint_source")))
               if own in (src or "")]
        line += f"{est['source']} | {est.get('checkpoint_source') or 'not counted'} |"
        if replanned and fit:
            line = line[:-1] + f"(fit to this run: {', '.join(fit)}) |"
        lines.append(line)
    return lines + [""]


def report(args, result: dict) -> str:
    device = result["device"]
    lines = [f"# What a job delivers: `python -m trainer run` and the service on packed text vs the step bench ({device})", "",
             f"Llama-3.2-1B shape{' (tiny, dry run)' if args.dry_run else ''}, random weights, LoRA r16 alpha 32 all "
             f"linear (QLoRA: 4-bit NF4 base; full: bf16 weights), batch {args.batch} x {args.seq}, {args.steps} steps, "
             f"text examples of 64..1024 tokens packed into rows; bench/service_throughput.py, "
             f"{result.get('date') or time.strftime('%Y-%m-%d')}. "
             f"Steady = steps 6..{args.steps}, less the step after an evaluation or checkpoint (whose own seconds are "
             "in their columns), and with a profile its steps and the one after. tokens/s counts input tokens "
             "(padding excluded); the step bench's rows are all tokens.", ""]
    for setting, part in result["settings"].items():
        bench = part["bench"]
        ref = bench_reference(bench)
        lines += [f"## {setting}", "", _bench_line(bench), "", JOB_COLUMNS,
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_job_line(j, ref) for j in part["jobs"]]
        lines.append("")
    service = result.get("service") or []
    if service:
        lora = result["settings"].get("lora-fast") or result["settings"].get("lora-lean") or {}
        ref = bench_reference(lora.get("bench") or {})
        lines += ["## Through the service: a job with no speed field", "",
                  "`tuneq up` on this host (SQLite, embedded Redis, API, one worker), the file uploaded and the job "
                  "created over HTTP with no `speed` (the default: the fastest setting the planner says fits this "
                  "GPU), its events read back through the API every 0.1 s. Submit to first step: from just before "
                  "the POST to the first metrics event seen through the API (target: no more than the load phase + "
                  f"5 s). / bench: against {(lora.get('bench') or {}).get('name')}. The first job is submitted once "
                  "the stack says it is ready (GET /readyz?workers=1: the API's, its checking child's, the "
                  "standby trainers' and the trainer template's warm-ups and the kernels' compilation done); ready s: from `tuneq up` to that, on the first row. Rows named after a "
                  "setting (service-lora-lean, ...) are jobs that set that setting's fields, after the default ones.", "",
                  "| job | speed chosen | median tok/s | / bench | worst / median | steps < 85 % | peak GiB | ready s | "
                  "POST s | submit to first step s | load s | target s | met | phases s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for j in service:
            if not j["ok"]:
                lines.append(_not_run(j, 12))
                continue
            phases = (j.get("progress_startup") or {}).get("phases") or (j.get("startup") or {}).get("phases") or {}
            load = phases.get("load")
            target = load + 5 if load is not None else None
            first = j["submit_to_first_step_s"]
            met = "yes" if first is not None and target is not None and first <= target else "no"
            # The step bench's fast LoRA row is the reference of the default job only.
            steady = j["median_tps"] is not None  # None: the job ended before its steady steps
            ratio = j["median_tps"] / ref if steady and ref and j.get("service_setting", "default") == "default" else None
            tps = f"{j['median_tps']:,.0f}" if steady else "—"
            worst = f"{j['worst_share']:.2f}" if steady else "—"
            lines.append(f"| {j['name']} | {j.get('speed')} | {tps} | {ratio and f'{ratio:.3f}'} | {worst} | "
                         f"{j['below_85']} | {j['peak_gib']:.2f} | {j.get('ready_s')} | "
                         f"{j['post_s']} | {first} | "
                         f"{load} | {target and round(target, 2)} | {met} | "
                         + ", ".join(f"{k} {v}" for k, v in phases.items()) + " |")
        lines.append("")
    trl = result.get("trl") or []
    if trl:
        default = next((j for j in reversed(service) if j["ok"] and j.get("service_setting", "default") == "default"), None)
        lines += ["## TRL's SFTTrainer on the same file, with its own packing", "",
                  "bench/trl_packed.py: TRL's defaults (best-fit-decreasing packing, padding-free batches, bf16, "
                  "gradient checkpointing on unless the row says nockpt), the same LoRA, batch, rows and learning rate. "
                  "Ratio: the default job through the service (above) against the row (target >= 1.5x at no more "
                  "peak memory).", "",
                  "| row | median tok/s | worst / median | peak GiB | default job / row (tok/s) | default job peak - row peak GiB | packed rows |",
                  "|---|---|---|---|---|---|---|"]
        for r in trl:
            if not r["ok"]:
                lines.append(_not_run(r, 5))
                continue
            ratio = default["median_tps"] / r["median_tps"] if default and r["median_tps"] else None
            dpeak = default["peak_gib"] - r["peak_gib"] if default and r.get("peak_gib") is not None else None
            lines.append(f"| {r['name']} | {r['median_tps']:,.0f} | {r['worst_share']:.2f} | "
                         f"{r['peak_gib'] if r['peak_gib'] is None else round(r['peak_gib'], 2)} | "
                         f"{ratio and f'{ratio:.2f}'} | {dpeak if dpeak is None else f'{dpeak:+.2f}'} | {r.get('packed_rows')} |")
        lines.append("")
    jobs = [j for part in result["settings"].values() for j in part["jobs"]]
    lines += time_estimates(args, jobs + service, result.get("replanned"))
    lines += ["", "Start-up detail (s; device_ready: when the warm-up thread had the GPU's context, from "
              "the process's start; tokens_cached: the data check's tokens reused):", ""]
    lines += [f"- {j['name']}: {(j['startup'] or {}).get('detail')}" for j in jobs + service if j["ok"]]
    lines += ["", "Per-step tokens/s:", ""]
    lines += [f"- {j['name']} (left out: {j.get('left_out_steps')}): {j.get('step_tps')}" for j in jobs + service + trl if j["ok"]]
    return "\n".join(lines) + "\n"


def trace_report(args, result: dict, sampler) -> None:
    """Each traced job's normal step and its slow ones (host_sampler.slow_steps), into the result
    (job["trace"]) and a table of their own, <out>_trace.md; the samples into <out>_samples.json."""
    from host_sampler import read_trace, slow_steps, step_columns

    samples = {"gpu": sampler.gpu, "cpu": sampler.cpu, "names": sampler.names}
    sampler.save(args.out.with_name(args.out.name + "_samples.json"))
    for job in [*result["service"], *(j for part in result["settings"].values() for j in part["jobs"])]:
        rows = read_trace(args.trace_dir, job.get("id") or str(args.work / job["name"])) if job.get("ok") else None
        if rows is None:
            continue
        left_out = job.get("left_out_steps") or []
        median, slow = slow_steps(rows, samples, left_out)
        job["trace"] = {"columns": step_columns(rows, left_out), "median_step_s": median, "slow": slow}
    text = trace_tables(result)
    args.out.with_name(args.out.name + "_trace.md").write_text(text)
    print(text)


def trace_tables(result: dict) -> str:
    """<out>_trace.md: the traced jobs' normal steps, then each slow step (job["trace"])."""
    jobs = [*result["service"], *(j for part in result["settings"].values() for j in part["jobs"])]
    lines = [f"# Slow steps and what ran beside them ({result['device']}, {result['date']})", "",
             "Every job's steps traced by the trainer (TUNEQ_STEP_TRACE_DIR): on the GPU's clock, the idle gap "
             "before a step (the host late) and the step's own time; on the host's, the time to queue it and to read "
             "the step before, and the collector's passes. GPU clocks and power from nvidia-smi every 100 ms, the "
             "processes' CPU from /proc every 200 ms, with the host's CPU time stolen by the hypervisor and the "
             "involuntary switches of the busy processes' main threads (where the run recorded them). A step is slow "
             "below 85 % of the median's tokens/s. CPU ms: the main thread's CPU time while it queued the step (less "
             "than queue ms by the time it was off the CPU).", "",
             "| job | steady steps' median: gap ms / GPU ms / queue ms / CPU ms / read ms | host ms by region | "
             "gc passes (s) | slow steps |", "|---|---|---|---|---|"]
    ms = lambda v: "—" if v is None else f"{v * 1000:.1f}"  # noqa: E731
    extra = lambda xs: "; ".join(f"+{n:.0f} {w}" for w, n in xs if n >= 1) or "—"  # noqa: E731
    steal = lambda v: "—" if v is None else f"{v:.1%}"  # noqa: E731
    regions = lambda d: ", ".join(f"{k} {v * 1000:.1f}" for k, v in d.items()) or "—"  # noqa: E731
    detail: list[str] = []
    held: list[str] = []
    for job in jobs:
        if "trace" not in job:
            continue
        columns, slow = job["trace"]["columns"], job["trace"]["slow"]
        lines.append(f"| {job['name']} | {ms(columns['gpu_gap_s'])} / {ms(columns['gpu_s'])} / {ms(columns['queue_s'])}"
                     f" / {ms(columns.get('queue_cpu_s'))} / {ms(columns['read_s'])} | "
                     f"{regions(columns.get('host_s') or {})} | {columns['gc_passes']} ({columns['gc_s']:.3f}) | "
                     f"{len(slow)} |")
        if columns.get("held"):
            h = columns["held"]
            held.append(f"| {job['name']} | {', '.join(map(str, h['steps']))} | {ms(h['queue_s'])} | "
                        f"{ms(h['queue_cpu_s'])} | {regions(h['host_s'])} | {ms(columns['gpu_s'])} | "
                        f"{ms(h.get('ahead_s'))} |")
        for s in slow:
            gcs = ", ".join(f"gen{g} {t * 1000:.0f} ms" for g, t in s["gc"]) or "none"
            top = "; ".join(f"{name} {share:.0%}" for name, share in s["top_cpu"])
            detail.append(f"| {job['name']} | {s['step']} | {s['share']:.2f} | {ms(s['gpu_gap_s'])} | {ms(s['gpu_s'])} | "
                          f"{ms(s['queue_s'])} | {ms(s.get('queue_cpu_s'))} | {ms(s['read_s'])} | {regions(s.get('host_s') or {})} | "
                          f"{' / '.join(map(str, s.get('allocs') or []))} | {gcs} | {s['sm_mhz']} | {s['power_w']} | "
                          f"{' '.join(s['reasons']) or '—'} | {top} | {steal(s.get('steal'))} | "
                          f"{'; '.join(f'{w} {n}' for w, n in s.get('preempted') or []) or '—'} | "
                          f"{extra(s.get('extra_stacks') or [])} |")
    if detail:
        lines += ["", "| job | step | / median | gap ms | GPU ms | queue ms | CPU ms | read ms | host ms by region | "
                  "cudaMalloc / cudaFree / pinned allocs | gc | min SM MHz | max W | clock reasons | top CPU meanwhile | "
                  "max steal | main threads preempted | stack samples above a normal step's |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                  *detail]
    if held:
        lines += ["", "Held steps (--trace-hold): the GPU slept about a second before each, after the step before, "
                  "so the host began queueing the step with that much more lead. Where the host still waits for "
                  "the GPU, queue ms holds the rest of the sleep; lead gained ms (the sleep and the step's GPU time, "
                  "less queue ms) near zero says the host's lead has a cap (bench/launch_lead.py measures it from a "
                  "profiled timeline). Medians.", "",
                  "| job | held steps | queue ms | CPU ms | host ms by region | normal step's GPU ms | lead gained ms |",
                  "|---|---|---|---|---|---|---|", *held]
    return "\n".join(lines) + "\n"


def report_again(args) -> int:
    """--report: the tables of an earlier run's .json again, steady statistics recomputed from its
    steps and every job's time estimate planned again from speeds.json as it is now (first refreshed
    from that run with --record-speeds); the estimate the job got when it ran is kept beside it."""
    saved = json.loads(args.report.read_text())
    args.out = args.report.with_suffix("")
    args.device_name = saved["device"] if saved["device"] != "cpu" else DRY_RUN_GPU
    for key, value in (saved.get("args") or {}).items():
        setattr(args, key, value)
    jobs = [j for part in saved["settings"].values() for j in part["jobs"]]
    for j in jobs + saved.get("service", []):
        if j["ok"]:
            j.update(steady_stats(j["step_tps"], j.get("left_out_steps") or []))
            if j.get("setting") in SETTINGS and "schedule" not in j:  # a run from before rows kept their schedule
                j["schedule"] = default_schedule(args) if j["name"].endswith("-default") else {}
    if any("trace" in j for j in jobs + saved.get("service", [])):
        args.out.with_name(args.out.name + "_trace.md").write_text(trace_tables(saved))
    if args.record_speeds and not args.dry_run:
        record_speeds(args, jobs + saved.get("service", []), saved.get("date") or time.strftime("%Y-%m-%d"))
    config = model_config(args)
    for j in jobs:
        if j["ok"] and j.get("setting") in SETTINGS:
            j.setdefault("estimate_at_run", j.get("estimate"))
            spec = job_spec(j["setting"], args, Path("m"), Path("t"), None, j["schedule"])
            j["estimate"] = wall_estimate(spec, config, args.device_name)
    saved["replanned"] = {"date": time.strftime("%Y-%m-%d")}
    args.report.with_suffix(".md").write_text(report(args, saved))
    args.report.write_text(json.dumps(saved, indent=1))
    return 0


def refit_startup(gpu: str) -> int:
    """--fit-startup: the start-up entry of `gpu`'s speeds.json entry fit again (fit_startup)."""
    from trainer.planning import speeds

    data = json.loads(speeds.SPEEDS_FILE.read_text())
    found = speeds.gpu_entry(gpu, data)
    if found is None:
        print(f"--fit-startup: no GPU model of speeds.json matches {gpu!r}", file=sys.stderr)
        return 2
    runs = startup_runs(gpu)
    if not runs:
        print(f"--fit-startup: no run on record for {found[0]} waited for a ready stack", file=sys.stderr)
        return 2
    entry = found[1]
    entry["startup"] = fit_startup(runs, entry.get("startup", {}), time.strftime("%Y-%m-%d"))
    speeds.SPEEDS_FILE.write_text(speeds_text(data))
    print(json.dumps(entry["startup"], indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--settings", default="lora-lean-offload", help="comma separated: " + ", ".join(SETTINGS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=None, help="rows of each job's batch (default 8; a dry run's 2)")
    p.add_argument("--bench-steps", type=int, default=20)
    p.add_argument("--jobs", default="default", help="per setting: default (the job as the worker runs it, with one "
                   "evaluation and one checkpoint), old-attention (transformers' packed mask), no-liger (TUNEQ_LIGER=0: "
                   "the fast path without liger's kernels)")
    p.add_argument("--trl", default="", help="TRL rows on the same file (comma separated): ckpt, nockpt, wrapped, "
                   "wrapped-nockpt (wrapped: TRL's packing that cuts the file into rows, without masks between examples)")
    p.add_argument("--service", type=int, default=0, help="default jobs through the whole stack (tuneq up)")
    p.add_argument("--service-settings", default="",
                   help="after those, one job through the stack per setting (comma separated: " + ", ".join(SETTINGS) + ")")
    p.add_argument("--service-gap", type=float, default=0.0,
                   help="seconds the host stays idle between the service's jobs (0: each right after the last)")
    p.add_argument("--no-step-bench", action="store_true",
                   help="build the model only, no step-bench rows (the service's ratio column stays empty)")
    p.add_argument("--profile", default="", help="a job to profile (steps 30..32)")
    p.add_argument("--trace", action="store_true",
                   help="trace every job's steps (TUNEQ_STEP_TRACE_DIR) and sample the GPU's clocks and the host's "
                   "processes meanwhile; a third table lists each slow step, where its time went and what else ran")
    p.add_argument("--trace-stacks", type=float, default=0, metavar="MS",
                   help="with --trace: the trainers also sample their threads' Python stacks every MS milliseconds "
                   "(slows the host a little); each slow step lists the samples it had more of than a normal step")
    p.add_argument("--trace-hold", default="", metavar="A:B",
                   help="with --trace: hold the GPU busy for a second before each of steps A..B-1 of every job, so "
                   "that the trace times the host's own queueing of those steps (left out of the statistics)")
    p.add_argument("--work", type=Path, default=Path("/tmp/tuneq-service-throughput"))
    p.add_argument("--out", type=Path, default=None,
                   help="default: bench/results/service_throughput_h100 (with --dry-run: service_throughput_cpu_dryrun)")
    p.add_argument("--job-timeout", type=float, default=300)
    p.add_argument("--report", type=Path, default=None,
                   help="rewrite the tables of an earlier run's .json, its time estimates planned again from "
                   "trainer/planning/speeds.json as it is now (after --record-speeds: refreshed from that run)")
    p.add_argument("--record-speeds", action="store_true",
                   help="write each setting's default job's tokens/s, the checkpoint rate and the start-up into "
                   "trainer/planning/speeds.json (with --report: from that run's .json, no GPU needed)")
    p.add_argument("--keep-startup", action="store_true", help="with --record-speeds: leave the start-up entry as it is")
    p.add_argument("--fit-startup", default="", metavar="GPU",
                   help="only refit this GPU model's start-up entry in speeds.json from the runs on record "
                   "(startup_runs), no GPU needed; the efficiencies and the checkpoint rate stay")
    args = p.parse_args()
    args.seq = 64 if args.dry_run else 2048
    args.trace_dir = args.work / "trace"
    args.batch = args.batch or (2 if args.dry_run else 8)
    if args.dry_run:
        args.steps, args.bench_steps = min(args.steps, 8), 2
    if args.out is None:
        args.out = ROOT / "bench" / "results" / ("service_throughput_cpu_dryrun" if args.dry_run else "service_throughput_h100")
    if args.report:
        return report_again(args)
    if args.fit_startup:
        return refit_startup(args.fit_startup)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    args.device_name = device if device != "cpu" else DRY_RUN_GPU
    settings = [x for x in args.settings.split(",") if x]
    result: dict = {"device": device, "date": time.strftime("%Y-%m-%d"),
                    "args": {"steps": args.steps, "batch": args.batch, "seq": args.seq,
                             **({"trace_stacks_ms": args.trace_stacks} if args.trace_stacks else {}),
                             **({"trace_hold": args.trace_hold} if args.trace_hold else {})},
                    "settings": {}, "service": [],
                    "trl": []}

    def save() -> None:
        args.out.with_suffix(".md").write_text(report(args, result))
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))

    # The service's default job is measured against the fast LoRA row; the bench also builds the model.
    model_dir = args.work / "tt" / ("tiny" if args.dry_run else "llama-3.2-1b")
    if args.no_step_bench:
        from argparse import Namespace

        from train_throughput import build_model

        build_model(Namespace(model_dir=model_dir, dry_run=args.dry_run, shape="llama-3.2-1b"))
        benches = {x: {"name": SETTINGS[x][2], "error": "not run (--no-step-bench)"} for x in settings + ["lora-fast"]}
    else:
        benches = bench_rows(args, list(dict.fromkeys(settings + (["lora-fast"] if args.service else []))))
    data = write_text_data(model_dir, args.work / "train.jsonl", int(args.steps * args.batch * args.seq * 1.1))
    valid = write_text_data(model_dir, args.work / "valid.jsonl", 16 * args.seq, seed=1)
    sampler = None
    if args.trace:
        from host_sampler import HostSampler

        from trainer.profiling import HOLD_ENV, STACKS_ENV, TRACE_ENV

        shutil.rmtree(args.trace_dir, ignore_errors=True)
        os.environ[TRACE_ENV] = str(args.trace_dir)  # the stack's trainers and run_job's inherit it
        if args.trace_stacks:
            os.environ[STACKS_ENV] = str(args.trace_stacks)
        if args.trace_hold:
            os.environ[HOLD_ENV] = args.trace_hold
        sampler = HostSampler().__enter__()
    if args.service or args.service_settings:  # first: a fresh host's first job, as a user meets it
        result["service"] = service_jobs(args, model_dir, data)
        if "lora-fast" not in settings:
            result["settings"]["lora-fast"] = {"bench": benches["lora-fast"], "jobs": []}
        save()
    if args.trl:
        result["trl"] = trl_rows(args, data, model_dir)
        save()
    # What the API's data check does at upload: the trainer then reads these tokens from the cache.
    from trainer.data.validate import validate_file
    from trainer.model import load_tokenizer

    checked = time.time()
    tokenizer = load_tokenizer(str(model_dir))
    for path in (data, valid):
        validate_file(path, tokenizer, args.seq, data_format="text")
    print(f"data check (tokenized into the cache): {time.time() - checked:.1f} s")
    variants = {"old-attention": {"TUNEQ_PACKED_ATTENTION": "0"}, "no-liger": {"TUNEQ_LIGER": "0"}, "default": {}}
    for setting in settings:
        part = result["settings"].setdefault(setting, {"bench": benches[setting], "jobs": []})
        for name in args.jobs.split(","):
            env = dict(variants[name])
            schedule = default_schedule(args) if name == "default" else {}
            if name in args.profile.split(","):
                env.update(TUNEQ_PROFILE_STEPS="30:33", TUNEQ_PROFILE_DIR=str(args.work / f"profile-{setting}-{name}"))
            label = f"job-{setting}-{name}"
            part["jobs"].append(run_job(label, args, model_dir, data, valid if schedule else None, env, setting, schedule))
            save()
            if name in args.profile.split(","):
                prof = args.work / f"profile-{setting}-{name}" / "profile-rank0.txt"
                if prof.exists():
                    shutil.copy(prof, args.out.with_name(args.out.name + f"_profile_{setting}_{name}.txt"))
    if sampler is not None:
        sampler.__exit__(None, None, None)
        trace_report(args, result, sampler)
    if args.record_speeds and not args.dry_run:
        record_speeds(args, [j for part in result["settings"].values() for j in part["jobs"]] + result["service"],
                      result["date"])
    save()
    print(report(args, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
