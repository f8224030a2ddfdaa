"""The TensorBoard event files the worker writes parse back with TensorBoard's own reader."""

from __future__ import annotations

import tarfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.storage import LocalStorage
from worker.tensorboard_log import ARTIFACT, KIND, TensorBoardLog

LOSSES = [2.5, 1.75, 1.25, 0.875]


def trainer_events(first_step: int = 1) -> list[dict]:
    evs = [{"type": "start", "time": 1000.0, "data": {"total_steps": 4}}]
    for i, loss in enumerate(LOSSES[first_step - 1:], start=first_step):
        evs.append({"type": "metrics", "time": 1000.0 + i, "data": {
            "step": i, "total_steps": 4, "train_loss": loss, "learning_rate": 1e-3 * i, "tokens_per_second": 100.0,
            "peak_memory_bytes": None, "mfu": 0.25}})
    evs.append({"type": "validation", "time": 1010.0, "data": {"step": 4, "valid_loss": 1.5, "valid_mean_token_accuracy": 0.5}})
    evs.append({"type": "metrics", "data": {"train_loss": 9.0}})  # no step: nothing to draw
    return evs


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_of_metrics_and_validation_events(tmp_path: Path) -> None:
    tb = TensorBoardLog(tmp_path / "tensorboard")
    for ev in trainer_events():
        tb.add(ev)
    tb.close()
    got = scalars(tmp_path / "tensorboard")
    assert [(s, round(v, 4)) for s, v in got["train/loss"]] == list(enumerate(LOSSES, start=1))
    assert [s for s, _ in got["train/learning_rate"]] == [1, 2, 3, 4] and got["train/mfu"][0][1] == 0.25
    assert got["valid/loss"] == [(4, 1.5)] and got["valid/mean_token_accuracy"] == [(4, 0.5)]
    assert "train/peak_memory_gib" not in got  # null on CPU: no point


def test_publish_archives_every_run_for_tensorboard_logdir(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    assert TensorBoardLog(tmp_path / "nothing").publish(storage, "ftjob-x", 1) is None
    first = TensorBoardLog(tmp_path / "work" / "tensorboard")
    for ev in trainer_events()[:3]:  # steps 1-2, then the worker died
        first.add(ev)
    first.close()
    resumed = TensorBoardLog(tmp_path / "work" / "tensorboard")
    for ev in trainer_events(first_step=3):
        resumed.add(ev)
    stored = resumed.publish(storage, "ftjob-x", 2)
    assert stored is not None and stored.name == ARTIFACT and stored.kind == KIND
    assert stored.key == "jobs/ftjob-x/tensorboard-2.tar.gz"
    with tarfile.open(storage.path(stored.key)) as tar:
        tar.extractall(tmp_path / "download", filter="data")
    # Both runs' files, one curve: what `tensorboard --logdir download/tensorboard` shows.
    assert len(list((tmp_path / "download" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    got = scalars(tmp_path / "download" / "tensorboard")
    # Files are read in name (start time) order; these two started within one second.
    assert sorted((s, round(v, 4)) for s, v in got["train/loss"]) == list(enumerate(LOSSES, start=1))


def test_eval_scores_become_eval_curves(tmp_path: Path) -> None:
    tb = TensorBoardLog(tmp_path / "tensorboard")
    for step, score in [(10, 0.25), (20, 0.875)]:
        tb.add({"type": "eval", "time": 1000.0 + step, "data": {
            "step": step, "eval_exact_match": score, "eval_sim": score / 2, "eval_seconds": 1.5, "samples": []}})
    tb.close()
    got = scalars(tmp_path / "tensorboard")
    assert got["eval/exact_match"] == [(10, 0.25), (20, 0.875)] and got["eval/sim"][1] == (20, 0.4375)
    assert got["eval/seconds"] == [(10, 1.5), (20, 1.5)]


def test_the_worker_writes_curves_without_importing_torch(tmp_path: Path) -> None:
    """tensorboardX would import torch (a second of CPU, hundreds of MiB) only to accept tensors; the
    worker's curves are floats. In a process of its own: this one imported torch long ago."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\n"
            "from worker.tensorboard_log import TensorBoardLog\n"
            f"tb = TensorBoardLog(__import__('pathlib').Path({str(tmp_path / 'tb')!r}))\n"
            f"for ev in json.loads({json.dumps(json.dumps(trainer_events()))}):\n"
            "    tb.add(ev)\n"
            "tb.close()\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    assert [round(v, 4) for _, v in scalars(tmp_path / "tb")["train/loss"]] == LOSSES
