"""A host's first job with and without the worker's kernel warm-up (worker/kernel_warmup.py).

Two `tuneq up` stacks in a row, each on an empty Triton cache of its own (TRITON_CACHE_DIR), each
running one default job through the whole service (bench/service_throughput.py --service 1):

  warm-up   TUNEQ_WARM_KERNELS=true: the worker compiles the kernels as it starts, before the stack
            says it is ready (GET /readyz?workers=1), so the job should compile none;
  none      TUNEQ_WARM_KERNELS=false: the job compiles them itself, between its submission and
            its first step, as on a host that never ran a job.

The warm-up stack runs first, on the colder host (page cache, driver state), so that the order
cannot favour it. Per stack: seconds from `tuneq up` to ready, the kernels in the cache once the
stack ended, and the job's kernels compiled, load phase (weights and fast path apart), first
step, submission to first step, and its median tokens/s.

    python bench/kernel_warmup.py              # on the GPU (about 3 minutes); writes bench/results/kernel_warmup_<gpu>.md
    python bench/kernel_warmup.py --dry-run    # CPU, tiny model: the wiring (a CPU worker runs no warm-up)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.startup import kernel_cache_entries, kernel_names  # noqa: E402 - after the path

STACKS = {"warm-up": "true", "none": "false"}


def run_stack(name: str, warm: str, args) -> dict:
    cache = args.work / f"triton-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    out = args.work / f"stack-{name}"
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), "TUNEQ_WARM_KERNELS": warm}
    cmd = [sys.executable, str(ROOT / "bench" / "service_throughput.py"), "--settings", "", "--service", "1",
           "--no-step-bench", "--steps", str(args.steps), "--batch", str(args.batch),
           "--work", str(args.work / f"work-{name}"), "--out", str(out),
           *(["--dry-run"] if args.dry_run else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    (args.work / f"stack-{name}.log").write_text(proc.stdout + proc.stderr)
    report = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    job = next((j for j in report.get("service") or [] if j.get("ok")), None)
    row = {"stack": name, "warm_kernels": warm, "cache_entries": kernel_cache_entries(cache), "device": report.get("device")}
    if job is None:
        failed = (report.get("service") or [{}])[0]
        return {**row, "ok": False, "error": failed.get("error") or proc.stderr[-800:]}
    startup = job.get("startup") or {}
    detail = startup.get("detail") or {}
    phases = startup.get("phases") or {}
    # The kernels written after the job's submission: the ones the warm-up (if any) missed.
    late = sorted(name for name, mtime in kernel_names(cache) if mtime > job.get("submitted_at", 0.0))
    return {**row, "ok": True, "late_kernels": late, "ready_s": job.get("ready_s"), "kernels_compiled": detail.get("kernel_cache_added"),
            "load_s": phases.get("load"), "weights_s": detail.get("weights"), "liger_s": detail.get("liger"),
            "fast_path_s": detail.get("fast_path"), "first_step_s": phases.get("first_step"),
            "submit_to_first_step_s": job.get("submit_to_first_step_s"), "median_tps": job.get("median_tps")}


def table(rows: list[dict], args) -> str:
    def num(value, fmt: str = ".2f") -> str:
        return "—" if value is None else format(value, fmt)

    lines = [f"# A host's first job, with and without the kernel warm-up ({rows[0].get('device') or 'unknown'}, "
             f"{datetime.date.today()})", "",
             f"`python bench/kernel_warmup.py{' --dry-run' if args.dry_run else ''}`: two `tuneq up` stacks in a row, "
             "each on an empty Triton cache, each running one default LoRA job of "
             f"{args.steps} steps of {args.batch} packed rows through the service (the warm-up stack first). "
             "Seconds; load = the job's load phase, of which weights and fast path; kernels compiled = what the job added to the cache before "
             "its first step; cache = the kernels in the cache once the stack ended.", "",
             "| stack | ready s | cache | kernels compiled by the job | load s (weights / liger / fast path) | "
             "first step s | submit to first step s | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['stack']} | failed: {str(r['error'])[:200]} | | | | | | |")
            continue
        lines.append(f"| {r['stack']} | {num(r['ready_s'])} | {r['cache_entries']} | {r['kernels_compiled']} | "
                     f"{num(r['load_s'])} ({num(r['weights_s'])} / {num(r['liger_s'])} / {num(r['fast_path_s'])}) | "
                     f"{num(r['first_step_s'])} | **{num(r['submit_to_first_step_s'])}** | {num(r['median_tps'], ',.0f')} |")
    for r in rows:
        if r["ok"]:
            lines.append(f"\nKernels written after the job's submission, {r['stack']} stack: "
                         f"{', '.join(r['late_kernels']) or 'none'}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=None,
                   help="the job's rows per batch; default: the spec's default, which the warm-up covers")
    p.add_argument("--work", type=Path, default=Path("/tmp/tuneq-kernel-warmup"))
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/kernel_warmup_<gpu or cpu>")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.batch is None:
        from trainer.kernel_warmup import default_rows

        args.batch = 2 if args.dry_run else default_rows()
    rows = [run_stack(name, warm, args) for name, warm in STACKS.items()]
    if args.out is None:
        device = (rows[0].get("device") or "cpu").lower()
        kind = next((k for k in ("h200", "h100", "a100", "l40s", "a10") if k in device), "cpu")
        args.out = ROOT / "bench" / "results" / f"kernel_warmup_{kind}{'_dryrun' if args.dry_run else ''}"
    text = table(rows, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"date": str(datetime.date.today()), "args": vars(args),
                                                         "rows": rows}, indent=1, default=str))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
