"""The CLI alone on the real stack: `tuneq submit` -> `tuneq watch` -> `tuneq download`, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack, dump_logs, reverse_dataset

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def tuneq(stack: Stack, tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNEQ_URL": stack.url, "TUNEQ_API_KEY": stack.key, "TUNEQ_CONFIG": str(tmp_path / "none.toml"),
           "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "tuneq", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_watch_download_with_the_cli_only(stack: Stack, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "train.jsonl").write_text(reverse_dataset(32, seed=3))
    submitted = tuneq(stack, tmp_path, "submit", "train.jsonl", "--model", "tiny-llama", "--method", "lora",
                      "--max-steps", "8", "--batch-size", "4", "--lr", "0.003")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    watched = tuneq(stack, tmp_path, "watch", job_id, timeout=600)
    assert watched.returncode == 0, f"{watched.stdout}\n{watched.stderr}\n{dump_logs(stack)}"
    assert "succeeded" in watched.stdout and "8/8" in watched.stdout and "tuneq download" in watched.stdout

    got = tuneq(stack, tmp_path, "download", job_id, "adapter")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0

    # The curves: TensorBoard's reader finds the train loss of every metrics event.
    events = json.loads(tuneq(stack, tmp_path, "events", job_id, "--json", "--limit", "100").stdout)
    losses = [(e["data"]["step"], e["data"]["train_loss"]) for e in events if e["type"] == "metrics"]
    assert [s for s, _ in losses] == list(range(1, 9))
    assert tuneq(stack, tmp_path, "download", job_id, "tb", "--tensorboard").returncode == 0
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    curve = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in curve] == [s for s, _ in losses]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(curve, losses))

    status = json.loads(tuneq(stack, tmp_path, "status", job_id, "--json").stdout)
    assert status["progress"]["step"] == status["progress"]["total_steps"] == 8
    assert status["progress"]["eta_seconds"] == 0 and status["progress"]["tokens_per_second"] > 0
