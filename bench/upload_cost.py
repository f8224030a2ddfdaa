"""What uploading each checkpoint to the shared store costs the step loop.

The worker uploads every checkpoint the trainer writes (weights, optimizer, scheduler, each rank's
RNG, data position, checked against its manifest.json) from a thread of its own while the trainer
goes on. Here the same job runs through the service (`tuneq up`, bench/service_throughput.py's
service_stack) twice in one call:

  local   the store is a folder on this host (TUNEQ_STORAGE_URL empty): an upload is the sha256
          check and a hard link;
  s3      the store is an S3 server on this host (moto's, started here, `python -m moto.server`):
          an upload is the sha256 check and a multipart upload of every file.

Each job checkpoints every --every steps (keep_checkpoints 1). Per run: the median tokens/s of the
steady steps (from step 6, less the step after a checkpoint), split into the steps that overlap an
upload (from the worker's checkpoint_stored events: when it began and how long it took) and those
that do not, their ratio; the trainer's seconds per checkpoint write; the worker's seconds per
upload and its MB/s; the checkpoints superseded before their upload began; and how long the job
waited after its last step for the uploads to end. Step and upload times come from the job's
events in the stack's SQLite database (the API rounds event times to seconds).

    python bench/upload_cost.py                      # on the GPU: 1B full fine-tuning (about 4 minutes)
    python bench/upload_cost.py --methods full,lora  # and a LoRA pair
    python bench/upload_cost.py --dry-run            # CPU, tiny model: the wiring, with moto from .venv
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service_throughput import LORA, _service_job, service_stack, steady_stats, write_text_data  # noqa: E402

METHODS = {"full": {"type": "full"}, "lora": {"type": "lora", "lora": LORA}}
LEARNING_RATE = {"full": 1e-5, "lora": 2e-4}
FIRST_STEADY = 6


def build_tiny(args) -> Path:
    """The tiny model `tuneq up` wants among its models, built once for every run's home, with
    random weights: `tuneq up` would pretrain its own, for minutes on a busy host."""
    from tuneq.stack import TINY_MODEL

    out = args.work / TINY_MODEL
    if not (out / ".complete").exists():
        shutil.rmtree(out, ignore_errors=True)
        code = "import sys; sys.path.insert(0, sys.argv[1]); from trainer.tiny import build_tiny; build_tiny(sys.argv[2], pretrain_steps=0)"
        subprocess.run([sys.executable, "-c", code, str(ROOT), str(out)], cwd=ROOT, check=True, timeout=600)
        (out / ".complete").write_text("built by bench/upload_cost.py\n")
    return out


def build_model(args) -> Path:
    """bench/train_throughput.py's model (the 1B shape, random bf16 weights; in a dry run the tiny
    model), in a process of its own so that this one never holds the GPU."""
    if args.dry_run:
        return build_tiny(args)
    model_dir = args.work / "llama-3.2-1b"
    code = ("import sys; from argparse import Namespace; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from bench.train_throughput import build_model; "
            "build_model(Namespace(model_dir=Path(sys.argv[2]), dry_run=sys.argv[3] == '1', shape='llama-3.2-1b'))")
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(model_dir), "1" if args.dry_run else "0"], check=True,
                   cwd=ROOT, timeout=600)
    return model_dir


def create_bucket(env: dict[str, str]) -> None:
    """The bucket of env's TUNEQ_STORAGE_URL, made the way a deployment makes it (core.migrate)."""
    subprocess.run([sys.executable, "-c", "from core.migrate import prepare_storage; prepare_storage()"], cwd=ROOT,
                   env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
                   check=True, timeout=120)


def job_events(db: Path, job_id: str) -> list[dict]:
    """The job's events with their full-precision times, in the order they were stored."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT type, created_at, data FROM job_events WHERE job_id = ? ORDER BY seq", (job_id,)).fetchall()
    return [{"type": t, "time": at, "data": json.loads(d) if d else {}} for t, at, d in rows]


def upload_split(events: list[dict]) -> dict:
    """Steady steps that overlap an upload against those that do not, and the uploads' figures."""
    metrics = [e for e in events if e["type"] == "metrics"]
    written = {e["data"]["step"]: e for e in events if e["type"] == "checkpoint"}
    stored = {e["data"]["step"]: e for e in events if e["type"] == "checkpoint_stored"}
    windows = [(e["data"]["started_at"], e["data"]["started_at"] + e["data"]["seconds"]) for e in stored.values()]
    after_checkpoint = {s + 1 for s in written}
    during, clear, during_steps = [], [], []
    for before, m in zip(metrics, metrics[1:], strict=False):
        step = m["data"]["step"]
        if step < FIRST_STEADY or step in after_checkpoint:
            continue
        lo, hi = before["time"], m["time"]
        if any(lo < b and a < hi for a, b in windows):
            during.append(m["data"]["tokens_per_second"])
            during_steps.append(step)
        else:
            clear.append(m["data"]["tokens_per_second"])
    uploads = [{"step": s, "bytes": e["data"]["bytes"], "seconds": e["data"]["seconds"],
                "queued_s": round(e["data"]["started_at"] - written[s]["time"], 2) if s in written else None,
                "mb_per_s": round(e["data"]["bytes"] / 1e6 / e["data"]["seconds"], 1) if e["data"]["seconds"] else None}
               for s, e in sorted(stored.items())]
    med_during = statistics.median(during) if during else None
    med_clear = statistics.median(clear) if clear else None
    last_step = metrics[-1]["time"] if metrics else None
    return {
        "steps_during_upload": len(during), "steps_clear": len(clear), "during_steps": during_steps,
        "median_tps_during": med_during, "median_tps_clear": med_clear,
        "during_over_clear": med_during / med_clear if med_during and med_clear else None,
        "checkpoint_write_s": [written[s]["data"].get("seconds") for s in sorted(written)],
        "checkpoint_steps": sorted(written), "uploads": uploads,
        "not_stored": sorted(set(written) - set(stored)),
        "wait_after_last_step_s": round(max(b for _, b in windows) - last_step, 2) if windows and last_step else None,
    }


def run_one(args, method: str, store: str, model_dir: Path, data: Path, tiny: Path) -> dict:
    from tests.s3server import moto_server, s3_env

    label = f"{method}-{store}"
    print(f"{label}: starting", flush=True)
    try:
        with moto_server(args.work / f"moto-{label}.log") if store == "s3" else _no_server() as endpoint:
            home = args.work / f"svc-{label}"
            env = {"TUNEQ_DATABASE_URL": f"sqlite:///{home / 'tuneq.db'}"}
            if store == "s3":
                env.update(s3_env(endpoint))
                create_bucket(env)
            else:
                env["TUNEQ_STORAGE_URL"] = ""
            with service_stack(args.work, model_dir, name=home.name, env=env, tiny=tiny) as c:
                file_id = c.upload_file(data)["id"]
                body = {"model": model_dir.name, "training_file": file_id, "method": METHODS[method],
                        "packing": True, "data_format": "text",
                        "hyperparameters": {"batch_size": args.batch, "max_seq_len": args.seq, "max_steps": args.steps,
                                            "learning_rate": LEARNING_RATE[method], "warmup_steps": 2, "seed": 0},
                        "schedule": {"log_every_steps": 1, "checkpoint_every_steps": args.every,
                                     "keep_checkpoints": args.keep}}
                row = _service_job(c, body, label, args, 0.0)
                if row["ok"]:
                    row.update(upload_split(job_events(home / "tuneq.db", row["id"])))
    except Exception as exc:  # noqa: BLE001 - a broken run is a row, not a lost bench
        row = {"name": label, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:800]}
    row["store"] = store
    print(json.dumps({k: v for k, v in row.items() if k not in ("step_tps", "startup", "progress_startup", "start")},
                     default=str)[:1500], flush=True)
    # The next run's disk: this one's checkpoints, store and moto's spilled objects.
    logs = args.work / f"svc-{label}" / "logs"
    if logs.is_dir():
        shutil.rmtree(args.work / f"logs-{label}", ignore_errors=True)
        logs.rename(args.work / f"logs-{label}")
    shutil.rmtree(args.work / f"svc-{label}", ignore_errors=True)
    return row


class _no_server:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _f(x, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def report(args, result: dict) -> str:
    device = result["device"]
    lines = [f"# Checkpoint uploads against the step loop ({device})", "",
             f"Llama-3.2-1B shape{' (tiny, dry run)' if args.dry_run else ''}, random weights, batch {args.batch} x "
             f"{args.seq}, {args.steps} steps, a checkpoint every {args.every} steps (keep_checkpoints {args.keep}), "
             "text examples of 64..1024 tokens packed into rows; the job through `tuneq up` on this host, the "
             f"store a local folder or an S3 server on this host (moto); bench/upload_cost.py, {time.strftime('%Y-%m-%d')}. "
             f"Steady = steps {FIRST_STEADY}..{args.steps} less the step after a checkpoint. During upload: the steady "
             "steps whose time overlaps an upload (the worker's checkpoint_stored events); clear: the others.", "",
             "| run | median tok/s | steps during upload | median during | steps clear | median clear | during / clear | "
             "ckpt write s (trainer) | upload s (worker) | upload MB | upload MB/s | not stored | wait after last step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if not r["ok"]:
            lines.append(f"| {r['name']} | not run: {r['error'][:300]!r} |" + " |" * 11)
            continue
        ups = r["uploads"]
        lines.append(
            f"| {r['name']} | {_f(r['median_tps'])} | {r['steps_during_upload']} | {_f(r['median_tps_during'])} | "
            f"{r['steps_clear']} | {_f(r['median_tps_clear'])} | {_f(r['during_over_clear'], '.3f')} | "
            f"{[round(x, 1) for x in r['checkpoint_write_s'] if x is not None]} | {[round(u['seconds'], 1) for u in ups]} | "
            f"{[round(u['bytes'] / 1e6) for u in ups]} | {[u['mb_per_s'] for u in ups]} | {r['not_stored']} | "
            f"{r['wait_after_last_step_s']} |")
    lines += ["", "Per-step tokens/s (steps during an upload listed after):", ""]
    lines += [f"- {r['name']}: {r['step_tps']}; during upload: {r['during_steps']}" for r in result["runs"] if r["ok"]]
    lines += ["", "Uploads (queued s: from the trainer's checkpoint event to the upload's start):", ""]
    lines += [f"- {r['name']}: {r['uploads']}" for r in result["runs"] if r["ok"]]
    return "\n".join(lines) + "\n"


def gpu_slug(device: str) -> str:
    for name in ("h200", "h100", "a100", "l40s"):
        if name in device.lower():
            return name
    return device.lower().replace(" ", "_")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--methods", default="full", help="comma separated: " + ", ".join(METHODS))
    p.add_argument("--stores", default="local,s3")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="checkpoint every this many steps")
    p.add_argument("--keep", type=int, default=1, help="keep_checkpoints")
    p.add_argument("--work", type=Path, default=Path("/tmp/tuneq-upload-cost"))
    p.add_argument("--out", type=Path, default=None, help="path less .md/.json (default bench/results/upload_cost_<gpu>)")
    p.add_argument("--job-timeout", type=float, default=600)
    args = p.parse_args()
    args.seq, args.batch = (64, 2) if args.dry_run else (2048, 8)
    if args.dry_run:
        args.steps, args.every = min(args.steps, 16), min(args.every, 4)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.out is None:
        args.out = ROOT / "bench" / "results" / ("upload_cost_cpu_dryrun" if args.dry_run else f"upload_cost_{gpu_slug(device)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": device, "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}

    def save() -> None:
        args.out.with_suffix(".md").write_text(report(args, result))
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))

    model_dir, tiny = build_model(args), build_tiny(args)
    data = write_text_data(model_dir, args.work / "train.jsonl", int(args.steps * args.batch * args.seq * 1.1))
    for method in args.methods.split(","):
        for store in args.stores.split(","):
            result["runs"].append(run_one(args, method, store, model_dir, data, tiny))
            save()
    print(report(args, result))
    return 0 if all(r["ok"] for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
