"""Priority preemption on a real GPU, through the whole stack (issue 3).

Starts `tuneq up` (SQLite, embedded Redis, the API and one worker that detects the host's GPUs),
submits a long low-priority LoRA job, waits until it trains, submits a high-priority job that needs
the same GPU, and records what happens: the low job is paused with a checkpoint, the high job
runs on the freed GPU and succeeds, then the low job resumes from its checkpoint and succeeds.

    python bench/preempt_gpu.py [--home /tmp/tq-preempt] [--port 8011]

Prints a timeline and writes bench/results/preempt_gpu.md/.json. Exit 0 only if every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.datasets import reverse_dataset  # noqa: E402 - after the path fix above

TERMINAL = {"succeeded", "failed", "cancelled"}


def events(c: httpx.Client, job_id: str) -> list[dict]:
    got, after = [], None
    while True:
        page = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100, **({"after": after} if after else {})}).json()
        got.extend(page["data"])
        if not page["has_more"]:
            return list(reversed(got))
        after = page["data"][-1]["id"]


def last_step(evs: list[dict]) -> int:
    steps = [e["data"].get("step", 0) for e in evs if e.get("type") == "metrics" and e.get("data")]
    return max(steps, default=0)


def wait(pred, timeout: float, what: str, stack: subprocess.Popen) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.poll() is not None:
            raise SystemExit(f"the stack exited ({stack.returncode}) while waiting for {what}")
        if pred():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default="/tmp/tq-preempt")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--low-epochs", type=int, default=400, help="long enough that the low job is still training when the high one arrives")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "preempt_gpu"))
    args = ap.parse_args()

    home = Path(args.home)
    env = {**os.environ, "TUNEQ_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    log = open(home.with_suffix(".log"), "w")  # noqa: SIM115 - lives as long as the stack
    t0 = time.monotonic()
    stack = subprocess.Popen([sys.executable, "-m", "tuneq", "up", "--home", str(home), "--port", str(args.port)],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    timeline: list[tuple[float, str]] = []

    def note(msg: str) -> None:
        timeline.append((round(time.monotonic() - t0, 1), msg))
        print(f"[{timeline[-1][0]:7.1f}s] {msg}", flush=True)

    base = f"http://127.0.0.1:{args.port}"
    key_file = home / "admin.key"
    checks: dict[str, bool] = {}
    try:
        def healthy() -> bool:
            try:
                return key_file.is_file() and httpx.get(base + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait(healthy, 300, "the stack to answer /health", stack)
        note("stack up")
        c = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key_file.read_text().strip()}"}, timeout=30)
        up = c.post("/v1/files", files={"file": ("train.jsonl", reverse_dataset(64, seed=1).encode())},
                    data={"purpose": "fine-tune"}).json()
        body = {"model": "tiny-llama", "training_file": up["id"], "method": {"type": "lora"}, "gpus": 1,
                "schedule": {"checkpoint_every_steps": 50}}
        low = c.post("/v1/fine_tuning/jobs", json={**body, "priority": -5, "suffix": "low",
                                                   "hyperparameters": {"n_epochs": args.low_epochs, "batch_size": 8}})
        assert low.status_code == 200, low.text
        low_id = low.json()["id"]
        note(f"low-priority job {low_id} created")
        wait(lambda: last_step(events(c, low_id)) >= 60, 300, "the low job to pass step 60", stack)
        step_at_high = last_step(events(c, low_id))
        note(f"low job training, step {step_at_high}")
        high = c.post("/v1/fine_tuning/jobs", json={**body, "priority": 10, "suffix": "high",
                                                    "hyperparameters": {"n_epochs": 20, "batch_size": 8}})
        assert high.status_code == 200, high.text
        high_id = high.json()["id"]
        note(f"high-priority job {high_id} created")

        wait(lambda: any(e.get("type") == "preempted" for e in events(c, low_id)), 180, "the low job's preempted event", stack)
        note("low job asked to pause (preempted event)")
        # A preempted job passes through `paused` straight back to `queued` (core/control.after_pause).
        wait(lambda: c.get(f"/v1/fine_tuning/jobs/{low_id}").json()["status"] in ("paused", "queued"), 180,
             "the low job to stop at a checkpoint", stack)
        note(f"low job stopped, now {c.get(f'/v1/fine_tuning/jobs/{low_id}').json()['status']}")
        wait(lambda: c.get(f"/v1/fine_tuning/jobs/{high_id}").json()["status"] == "running" or
             c.get(f"/v1/fine_tuning/jobs/{high_id}").json()["status"] in TERMINAL, 300, "the high job to start", stack)
        note(f"high job {c.get(f'/v1/fine_tuning/jobs/{high_id}').json()['status']}")
        wait(lambda: c.get(f"/v1/fine_tuning/jobs/{high_id}").json()["status"] in TERMINAL, 600, "the high job to end", stack)
        high_job = c.get(f"/v1/fine_tuning/jobs/{high_id}").json()
        note(f"high job {high_job['status']}")
        wait(lambda: c.get(f"/v1/fine_tuning/jobs/{low_id}").json()["status"] in TERMINAL, 600, "the low job to end", stack)
        low_job = c.get(f"/v1/fine_tuning/jobs/{low_id}").json()
        note(f"low job {low_job['status']}")

        low_events, high_events = events(c, low_id), events(c, high_id)
        starts = [e for e in low_events if e.get("type") == "start"]
        preempted = [e for e in low_events if e.get("type") == "preempted"]
        resumed_at = [e["data"].get("resumed_from_step") for e in starts if e.get("data")]
        gpus_seen = sorted({str((e.get("data") or {}).get("device")) for e in low_events + high_events if e.get("type") == "start"})
        checks = {
            "high job succeeded": high_job["status"] == "succeeded",
            "low job succeeded": low_job["status"] == "succeeded",
            "low job preempted exactly once, naming the high job": len(preempted) == 1 and high_id in preempted[0]["message"],
            "low job started twice (before and after preemption)": len(starts) == 2,
            "second start resumed from a checkpoint": len(resumed_at) == 2 and bool(resumed_at[1]),
        }
        result = {
            "device": ", ".join(gpus_seen),
            "low_job": low_id, "high_job": high_id, "low_step_when_high_arrived": step_at_high,
            "low_resumed_from_step": resumed_at[1] if len(resumed_at) > 1 else None,
            "low_final_step": last_step(low_events), "high_final_step": last_step(high_events),
            "start_event_devices": gpus_seen, "timeline": timeline, "checks": checks,
        }
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGINT)
        try:
            stack.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# Priority preemption on the GPU (bench/preempt_gpu.py)", "",
             f"Device: {result['device']}. Low job {low_id} (priority -5), high job {high_id} (priority 10), one GPU.", "",
             "| t (s) | event |", "|---|---|", *[f"| {t} | {m} |" for t, m in timeline], "",
             f"Low job step when the high job arrived: {step_at_high}; resumed from step {result['low_resumed_from_step']}; "
             f"final step {result['low_final_step']}. High job final step {result['high_final_step']}.", "",
             "| check | holds |", "|---|---|", *[f"| {k} | {'yes' if v else 'NO'} |" for k, v in checks.items()], ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
