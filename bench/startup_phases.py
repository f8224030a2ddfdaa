"""Start-up of a job on this host, phase by phase: `python -m trainer run` on the tiny model
started directly (the data check's tokens cached), the same with the token cache off, under
`accelerate launch` (how a one-GPU job started before), and handed to a standby trainer through
the worker's own launch code (worker.process.TrainerProcess with worker.standby.StandbyPool: the
standby started and imported beforehand, as a worker keeps one).

    python bench/startup_phases.py            # CPU or GPU; writes bench/results/startup_phases_<device>.md

Per variant and run: spawn to the first step's metrics event, and the trainer's startup event
(import, data, load, prepare, first_step; detail). Runs alternate between variants, so that a
drift of the host's load falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "direct, tokens cached": ([], {}),
    "direct, token cache off": ([], {"TUNEQ_TOKEN_CACHE_DIR": "off"}),
    "accelerate launch, tokens cached": (["-m", "accelerate.commands.launch", "--num_processes", "1",
                                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"], {}),
    "worker standby, tokens cached": (None, {}),
}


def run_standby(spec: Path, out: Path, work: Path) -> float:
    """Hand the job to a ready standby the way the worker does; returns when it was handed."""
    from core.settings import Settings
    from worker.process import TrainerProcess
    from worker.standby import StandbyPool
    from worker.workdir import trainer_argv

    settings = Settings(home=work / "home", standby_trainers=1)
    pool = StandbyPool()
    pool.start(settings)
    if not pool.idle[0].wait_ready(600):
        raise RuntimeError("the standby trainer did not get ready")
    out.mkdir(parents=True)
    argv = trainer_argv(settings, spec, out, resume=False)
    handed = time.time()
    proc = TrainerProcess(argv, cwd=out, log_path=out / "trainer.log", env=pool.env(settings), standbys=pool)
    if not proc.standby:
        raise RuntimeError("the job did not go to the standby trainer")
    proc.wait(600)
    pool.close()
    return handed


def run_once(launch: list[str] | None, env_extra: dict, spec: Path, out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    if launch is None:
        spawned = run_standby(spec, out, out.parent)
    else:
        env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        spawned = time.time()
        subprocess.run([sys.executable, *launch, "-m", "trainer", "run", str(spec), "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, timeout=600, check=False)
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines() if x.strip()]
    first = next(e for e in events if e["type"] == "metrics")
    startup = next(e for e in events if e["type"] == "startup")["data"]
    return {"spawn_to_first_step_s": round(first["time"] - spawned, 2), **startup}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/tuneq-startup-phases"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--only", default="", help="run only the variants whose name contains this")
    args = p.parse_args()
    import torch

    from bench.service_throughput import write_text_data
    from trainer.data.validate import validate_file
    from trainer.model import load_tokenizer
    from trainer.tiny import build_tiny

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "tiny"
    if not (model / "config.json").exists():
        build_tiny(model)
    data = write_text_data(model, args.work / "train.jsonl", 200_000)
    os.environ.setdefault("TUNEQ_TOKEN_CACHE_DIR", str(args.work / "token-cache"))
    validate_file(data, load_tokenizer(str(model)), 256, data_format="text")  # the API's data check
    spec = args.work / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "method": "lora", "training_file": str(data), "data_format": "text",
                                "packing": True, "precision": "auto",
                                "hyperparameters": {"batch_size": 2, "max_seq_len": 256, "max_steps": 2}}))
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS if args.only in name}
    load = os.getloadavg()[0]
    for k in range(args.runs):
        for name in results:
            launch, env = VARIANTS[name]
            results[name].append(run_once(launch, env, spec, args.work / f"out-{k}"))
            print(name, results[name][-1]["spawn_to_first_step_s"], flush=True)
    lines = [f"# Start-up phases of a job (`python -m trainer run`, tiny model, {device})", "",
             f"bench/startup_phases.py, {time.strftime('%Y-%m-%d')}, {args.runs} runs per variant, alternating; "
             f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. Training file: text "
             "examples, about 200k tokens, packed into rows of 256; the data check (validate_file with the "
             "tokenizer) ran first, as at upload. Seconds; phases are the trainer's startup event; before the "
             "trainer's process: spawn (for the standby: the hand-over) to first step less the trainer's own (a "
             "launcher's interpreter, if any). A standby's import is from the job's arrival; its own imports, "
             "done before the job, are in the detail (standby_import).", "",
             "| variant | spawn to first step s (median) | before the trainer's process | import | data | load | prepare | first_step | data detail |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        med = {k: statistics.median(r["phases"][k] for r in runs) for k in runs[0]["phases"]}
        d = runs[-1].get("detail") or {}
        keys = ("device", "tokenizer", "files", "pack", "tokens_cached", "standby", "standby_import", "standby_idle")
        detail = ", ".join(f"{k} {d[k]}" for k in keys if k in d)
        before = statistics.median(r["spawn_to_first_step_s"] - r["seconds"] for r in runs)
        lines.append(f"| {name} | {statistics.median(r['spawn_to_first_step_s'] for r in runs):.2f} | {before:.2f} | "
                     + " | ".join(f"{med.get(k, 0):.2f}" for k in ("import", "data", "load", "prepare", "first_step"))
                     + f" | {detail} |")
    text = "\n".join(lines) + "\n"
    out = args.out or ROOT / "bench" / "results" / f"startup_phases_{'cpu' if device == 'cpu' else 'gpu'}.md"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
