"""The whole path on real parts: upload, create, train on a worker, poll, download, load.

QLoRA's whole path is the first job of test_methods.test_continue_merge_and_download_checkpoints,
which also merges and continues it: one trainer run checks both. The SDK's list of a finished
job's checkpoints (one per epoch) is checked on the job of test_wandb."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from core.storage import sha256_file
from tests.e2e.conftest import Stack, dump_logs, reverse_dataset

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "cancelled"}


def upload(c, text: str, name: str = "train.jsonl") -> dict:
    r = c.post("/v1/files", files={"file": (name, text.encode(), "application/jsonl")}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(stack: Stack, job_id: str, statuses: set[str], timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    with stack.client() as c:
        while time.monotonic() < deadline:
            job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(0.5)
    pytest.fail(f"job {job_id} did not reach {statuses} in {timeout}s\n{dump_logs(stack)}")


def all_events(c, job_id: str) -> list[dict]:
    events, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        events.extend(page["data"])
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    return list(reversed(events))  # OpenAI lists newest first


def train_losses(events: list[dict]) -> list[float]:
    return [e["data"]["train_loss"] for e in events if e.get("type") == "metrics" and e.get("data")]


def download_archive(c, job_id: str, name: str, dest: Path) -> Path:
    arts = c.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts").json()["data"]
    art = next(a for a in arts if a["name"] == name)
    r = c.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/{art['id']}/content")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def check_manifest(root: Path) -> dict:
    manifest_path = next(root.rglob("manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    for rel, meta in manifest["files"].items():
        assert sha256_file(manifest_path.parent / rel) == meta["sha256"], rel
    return manifest


def run_method(stack: Stack, method: dict, hp: dict, tmp_path: Path) -> tuple[dict, list[float], Path]:
    with stack.client() as c:
        train = upload(c, reverse_dataset(64, seed=1))
        valid = upload(c, reverse_dataset(16, seed=2), "valid.jsonl")
        assert train["status"] == "processed", train
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": train["id"], "validation_file": valid["id"],
            "method": method, "hyperparameters": hp, "seed": 7,
        })
        assert r.status_code == 200, r.text
        job = wait_for(stack, r.json()["id"], TERMINAL)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(stack)}"
        losses = train_losses(all_events(c, job["id"]))
        archive = "model.tar.gz" if method["type"] == "full" else "adapter.tar.gz"
        out = download_archive(c, job["id"], archive, tmp_path / "download")
    return job, losses, out


def assert_learned(losses: list[float]) -> None:
    assert len(losses) >= 10, losses
    first = sum(losses[:3]) / 3
    last = sum(losses[-3:]) / 3
    print(f"train loss {first:.3f} -> {last:.3f}: {[round(x, 2) for x in losses]}")
    assert last < 0.7 * first, f"loss did not fall enough: {first:.3f} -> {last:.3f}"


def test_lora_through_http(stack: Stack, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job, losses, out = run_method(
        stack, {"type": "lora", "lora": {"r": 16, "alpha": 64}},
        {"n_epochs": 5, "batch_size": 8, "learning_rate": 3e-3}, tmp_path,
    )
    assert_learned(losses)
    assert job["fine_tuned_model"] and job["trained_tokens"] > 0
    # The worker's trainer template forked its trainer: its import counts from the job's arrival,
    # and the job's body has every phase from the queue to the first step.
    with stack.client() as c:
        [startup] = [e["data"] for e in all_events(c, job["id"]) if e["kind"] == "startup"]
    assert startup["detail"]["forked"] is True and startup["phases"]["import"] < 1.0, startup
    assert {"queue", "launch", "import", "data", "load", "first_step", "total"} <= set(job["progress"]["startup"])
    check_manifest(out)
    adapter_dir = next(out.rglob("adapter_config.json")).parent
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_full_through_http(stack: Stack, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, losses, out = run_method(
        stack, {"type": "full"}, {"n_epochs": 5, "batch_size": 8, "learning_rate": 1e-3}, tmp_path,
    )
    assert_learned(losses)
    check_manifest(out)
    AutoModelForCausalLM.from_pretrained(next(out.rglob("config.json")).parent)


def test_cancel_running_job_on_postgres(pg_stack: Stack) -> None:
    stack = pg_stack
    with stack.client() as c:
        train = upload(c, reverse_dataset(64, seed=3))
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": train["id"], "method": "lora",
            "hyperparameters": {"max_steps": 100000, "batch_size": 2},
        })
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if train_losses(all_events(c, job_id)):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"job never reported a step\n{dump_logs(stack)}")
        r = c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["status"] in ("cancelling", "cancelled")
    job = wait_for(stack, job_id, TERMINAL, timeout=60)
    assert job["status"] == "cancelled"
    alive = subprocess.run(["pgrep", "-f", f"work/{job_id}"], capture_output=True, text=True)
    assert alive.stdout.strip() == "", f"trainer still running: {alive.stdout}"
    # A standby trainer that took the job is known by its working directory, not its command line.
    from worker.process import trainer_pids

    assert trainer_pids((pg_stack.home / "work" / job_id).resolve()) == []
