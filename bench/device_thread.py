"""Two start-up questions about CUDA on a GPU host, each answered by fresh processes.

1. Does the device warm-up thread (trainer.startup.warm_device) overlap a fresh trainer's CUDA
   start with its tokenizer load, or does it hold the main thread up? Per run, in a new process:
   import torch, then load the tiny model's tokenizer the trainer's way (trainer.model.load_tokenizer,
   which imports transformers' tokenizer classes), then run one op on the GPU.
     no thread        the tokenizer, then CUDA, one after the other;
     thread           warm_device() before the tokenizer, as `python -m trainer run` does;
     thread, joined   the same, but the tokenizer only once the thread is done: the tokenizer's own
                      time with CUDA up and nothing beside it.
   Runs alternate between variants, so that a drift of the host falls on all of them alike.

2. Does an idle process that imported what a standby imports (trainer.standby.preload) hold GPU
   memory, with liger's kernels and without? nvidia-smi's compute processes, while it waits.

    python bench/device_thread.py            # on the GPU (about a minute); writes bench/results/device_thread_<gpu>.md
    python bench/device_thread.py --dry-run  # CPU: the wiring (no CUDA: the thread does nothing)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("no thread", "thread", "thread, joined")

CHILD = r"""
import json, sys, time
began = time.time()
import torch
imported = time.time()
from trainer.startup import warm_device
variant, model = sys.argv[1], sys.argv[2]
warmup = warm_device() if variant != "no thread" else None
if variant == "thread, joined":
    warmup.join()
joined = time.time()
from trainer.model import load_tokenizer
load_tokenizer(model)
tokenized = time.time()
if torch.cuda.is_available():
    torch.ones(64, 64, device="cuda").sum().item()
done = time.time()
print(json.dumps({"torch_s": imported - began, "join_s": joined - imported, "tokenizer_s": tokenized - joined,
                  "cuda_after_s": done - tokenized, "total_s": done - began,
                  "thread_ready_s": (warmup.seconds if warmup else None)}))
"""

IDLE = r"""
import sys
from trainer.standby import preload
preload(liger=sys.argv[1] == "1")
print("ready", flush=True)
sys.stdin.read()
"""


def one_run(variant: str, model: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, variant, str(model)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
    if proc.returncode != 0:
        return {"variant": variant, "error": proc.stderr[-600:]}
    return {"variant": variant, **json.loads(proc.stdout.strip().splitlines()[-1])}


def gpu_processes() -> dict[int, int]:
    """pid -> MiB, of the compute processes nvidia-smi lists; empty without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return {}
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=60).stdout
    found = {}
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit():
            found[int(pid)] = int(mib.strip() or 0)
    return found


def idle_standby(liger: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", IDLE, "1" if liger else "0"], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    began = time.time()
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            return {"liger": liger, "error": proc.stderr.read()[-600:] if proc.poll() is not None else line}
        imported = time.time() - began
        time.sleep(2)  # the driver lists a context a moment after its creation
        listed = gpu_processes()
        return {"liger": liger, "import_s": round(imported, 2), "listed": proc.pid in listed,
                "gpu_mib": listed.get(proc.pid, 0)}
    finally:
        proc.kill()
        proc.wait()


def table(runs: list[dict], idle: list[dict], device: str, args) -> str:
    def med(variant: str, key: str) -> str:
        values = [r[key] for r in runs if r["variant"] == variant and r.get(key) is not None]
        return f"{statistics.median(values):.2f}" if values else "—"

    lines = [f"# A fresh trainer's CUDA start beside its tokenizer, and an idle standby's GPU memory ({device}, "
             f"{datetime.date.today()})", "",
             f"`python bench/device_thread.py{' --dry-run' if args.dry_run else ''}`: {args.runs} fresh processes per "
             "variant, alternating; medians, seconds. torch = `import torch`; wait = joining the warm-up thread "
             "(the last variant only); tokenizer = trainer.model.load_tokenizer of the tiny model, imports "
             "included; CUDA after = one GPU op once the tokenizer is loaded; thread ready = when the warm-up "
             "thread had its context, from the process's start.", "",
             "| variant | torch s | wait s | tokenizer s | CUDA after s | total s | thread ready s |",
             "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        lines.append(f"| {v} | {med(v, 'torch_s')} | {med(v, 'join_s')} | {med(v, 'tokenizer_s')} | "
                     f"{med(v, 'cuda_after_s')} | **{med(v, 'total_s')}** | {med(v, 'thread_ready_s')} |")
    errors = [r for r in runs if r.get("error")]
    if errors:
        lines.append(f"\n{len(errors)} runs failed; the first: {errors[0]['error'][:300]}")
    lines += ["", "An idle process after trainer.standby.preload (what a standby imports), as nvidia-smi lists it:", "",
              "| liger imported | import s | listed by nvidia-smi | GPU MiB |", "|---|---|---|---|"]
    for r in idle:
        if r.get("error"):
            lines.append(f"| {r['liger']} | failed: {str(r['error'])[:200]} | | |")
        else:
            lines.append(f"| {r['liger']} | {r['import_s']:.2f} | {r['listed']} | {r['gpu_mib']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/tuneq-device-thread"))
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/device_thread_<gpu or cpu>")
    args = p.parse_args()
    import torch

    from trainer.tiny import build_tiny

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    model = args.work / "tiny"
    if not (model / "config.json").is_file():
        build_tiny(model, pretrain_steps=0)
    runs = [one_run(v, model) for _ in range(args.runs) for v in VARIANTS]
    idle = [idle_standby(liger) for liger in (True, False)]
    if args.out is None:
        kind = next((k for k in ("h200", "h100", "a100", "l40s", "a10") if k in device.lower()), "cpu")
        args.out = ROOT / "bench" / "results" / f"device_thread_{kind}{'_dryrun' if args.dry_run else ''}"
    text = table(runs, idle, device, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"date": str(datetime.date.today()), "device": device,
                                                         "runs": runs, "idle": idle}, indent=1))
    return 0 if not any(r.get("error") for r in runs + idle) else 1


if __name__ == "__main__":
    sys.exit(main())
