"""worker.checkpoint_store against real stores (a local folder and an S3 server) and both databases:
what is uploaded is checked, what is resumed is the newest stored checkpoint, what rotation
removes is gone from the store and the listing alike."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Checkpoint, JobEvent
from core.storage import Storage
from tests.integration.conftest import make_job
from tests.integration.test_storage import make_storage
from worker import checkpoint_store as cs


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    endpoint = request.getfixturevalue("s3_endpoint") if request.param == "s3" else None
    return make_storage(request.param, tmp_path, endpoint)


def fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint folder as the trainer writes it: files, then manifest.json with their sha256."""
    d = root / "checkpoints" / f"step-{step:08d}"
    d.mkdir(parents=True)
    for name, size in (("adapter_model.safetensors", 3000), ("optimizer.pt", 7000), ("rng.pt", 50)):
        (d / name).write_bytes(bytes([step % 251]) * size)
    (d / "state.json").write_text(json.dumps({"step": step}))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(d.iterdir())}
    (d / "manifest.json").write_text(json.dumps({"files": files}))
    return d


def store_one(db: Session, store: Storage, job_id: str, work: Path, step: int) -> Checkpoint:
    src = fake_checkpoint(work, step)
    prefix = cs.store_prefix(job_id, src.name)
    cs.upload(store, src, prefix)
    ck = Checkpoint(job_id=job_id, step=step, path=str(src), storage_key=prefix, uploaded_at=time.time(), host="a")
    db.add(ck)
    db.commit()
    return ck


def test_upload_refuses_a_file_that_does_not_match_its_manifest(db: Session, store: Storage, tmp_path: Path) -> None:
    src = fake_checkpoint(tmp_path / "a", 5)
    (src / "optimizer.pt").write_bytes(b"torn write")
    with pytest.raises(cs.CheckpointCorrupt):
        cs.upload(store, src, "jobs/j/checkpoints/step-00000005")
    assert not store.exists("jobs/j/checkpoints/step-00000005/manifest.json")  # never looks whole


def test_another_host_resumes_from_the_newest_stored_checkpoint(db: Session, store: Storage, tmp_path: Path) -> None:
    job = make_job(db)
    host_a, host_b = tmp_path / "a", tmp_path / "b"
    for step in (5, 10):
        store_one(db, store, job.id, host_a, step)
    fake_checkpoint(host_a, 15)  # written on A, never stored: not resumable
    db.add(Checkpoint(job_id=job.id, step=15, path=str(host_a / "checkpoints/step-00000015"), host="a"))
    db.commit()

    # B has nothing: the newest stored checkpoint is fetched, every file checked.
    ck = cs.prepare_resume(db, store, job.id, host_b)
    assert ck is not None and ck.step == 10
    got = host_b / "checkpoints" / "step-00000010"
    assert sorted(p.name for p in (host_b / "checkpoints").iterdir()) == ["step-00000010"]
    for p in (host_a / "checkpoints" / "step-00000010").iterdir():
        assert (got / p.name).read_bytes() == p.read_bytes()
    assert [c.step for c in db.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id))] == [5, 10]

    # A still has its copy: it is used (after checking), the unstored step 15 is removed.
    marker = (host_a / "checkpoints" / "step-00000010" / "optimizer.pt").stat().st_ino
    assert cs.prepare_resume(db, store, job.id, host_a).step == 10
    assert sorted(p.name for p in (host_a / "checkpoints").iterdir()) == ["step-00000010"]
    assert (host_a / "checkpoints" / "step-00000010" / "optimizer.pt").stat().st_ino == marker

    # A local copy that differs from the store is not trusted: fetched again.
    (got / "optimizer.pt").write_bytes(b"\x00" * 7000)
    cs.prepare_resume(db, store, job.id, host_b)
    assert (got / "optimizer.pt").read_bytes() == (host_a / "checkpoints/step-00000010/optimizer.pt").read_bytes()


def test_select_best_keeps_the_best_checkpoint_and_resumes_with_it(db: Session, store: Storage,
                                                                   tmp_path: Path) -> None:
    job = make_job(db)
    for step, score in ((5, 0.5), (10, 0.75), (15, 0.25), (20, 0.5)):
        store_one(db, store, job.id, tmp_path / "a", step).metrics = {"eval_em": score}
    db.commit()
    assert cs.rotate(db, store, job.id, keep=2, metric="eval_em") == [5]  # 10 is the best: kept
    assert [c.step for c in cs.uploaded(db, job.id)] == [20, 15, 10]
    # Another host resumes from the newest, and gets the best too: final/ may take its weights.
    host_b = tmp_path / "b"
    assert cs.prepare_resume(db, store, job.id, host_b, "eval_em").step == 20
    assert sorted(p.name for p in (host_b / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]
    assert cs.rotate(db, store, job.id, keep=1) == [15, 10]  # without select best: the newest only
    spec = {"model": "m", "training_file": "t", "eval": {"file": "e"}, "export": {"select": "best"}}
    assert cs.selection_metric(spec) == "eval_exact_match" and cs.selection_metric({"model": "m"}) is None


def test_no_stored_checkpoint_means_a_fresh_start(db: Session, store: Storage, tmp_path: Path) -> None:
    job = make_job(db)
    fake_checkpoint(tmp_path / "a", 5)
    assert cs.prepare_resume(db, store, job.id, tmp_path / "a") is None
    assert not list((tmp_path / "a" / "checkpoints").iterdir())


def test_rotation_removes_rows_and_files_and_continuation_fetches_weights(db: Session, store: Storage,
                                                                          tmp_path: Path) -> None:
    job = make_job(db)
    cks = [store_one(db, store, job.id, tmp_path / "a", s) for s in (5, 10, 15)]
    assert cs.rotate(db, store, job.id, keep=2) == [5]
    assert [c.step for c in cs.uploaded(db, job.id)] == [15, 10]
    assert not store.exists(f"{cks[0].storage_key}/manifest.json")
    assert not store.exists(f"{cks[0].storage_key}/adapter_model.safetensors")
    assert store.exists(f"{cks[1].storage_key}/optimizer.pt")

    weights = cs.weights_dir(store, cks[2].storage_key)
    assert (weights / "adapter_model.safetensors").read_bytes() == bytes([15]) * 3000
    assert (weights / "state.json").is_file()


def test_the_uploader_marks_a_stored_checkpoint_and_says_what_its_upload_took(db: Session, store: Storage,
                                                                              tmp_path: Path) -> None:
    job = make_job(db)
    src = fake_checkpoint(tmp_path / "a", 7)
    db.add(Checkpoint(job_id=job.id, step=7, path=str(src), host="a"))
    db.commit()
    snap = cs.snapshot(src, tmp_path / "a" / cs.UPLOADS)
    before = time.time()
    with cs.Uploader(store, job.id, keep=2, may_write=lambda: True) as up:
        up.submit(7, snap)
        assert up.drain()
    db.expire_all()
    ck = db.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id))
    assert ck.uploaded_at is not None and ck.storage_key == cs.store_prefix(job.id, src.name)
    events = db.scalars(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.type == "checkpoint_stored")).all()
    assert len(events) == 1
    data = events[0].data
    manifest = json.loads((src / "manifest.json").read_text())["files"]
    assert data["step"] == 7 and data["bytes"] == sum(f["bytes"] for f in manifest.values())
    assert before <= data["started_at"] <= data["started_at"] + data["seconds"] <= events[0].created_at
    assert src.name in events[0].message
    assert not snap.exists()  # the hard-linked snapshot is gone once stored


def test_a_checkpoint_rotated_away_while_its_events_are_applied_is_still_stored(db: Session, tmp_path: Path) -> None:
    """The pump snapshots every checkpoint of a batch of events as soon as it has read them: the
    trainer rotates its folders away while the batch's rows are written, which on a busy host
    kept whole runs' checkpoints from the store."""
    import shutil

    from worker.events import ProgressTracker

    job = make_job(db)
    work = tmp_path / "w"
    events = [{"type": "checkpoint", "data": {"step": s, "path": f"checkpoints/{fake_checkpoint(work, s).name}"}}
              for s in (5, 10)]
    tracker = ProgressTracker(work)
    tracker.hold(events)
    shutil.rmtree(work / "checkpoints")  # the trainer wrote two more meanwhile
    for ev in events:
        tracker.apply(db, job, ev)
    db.commit()
    taken = tracker.take_new_checkpoints()
    assert [step for step, _ in taken] == [5, 10]
    assert all((snap / "manifest.json").is_file() and (snap / "optimizer.pt").is_file() for _, snap in taken)
    assert sorted(c.step for c in db.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id))) == [5, 10]


def test_a_checkpoint_whose_upload_a_killed_worker_left_unfinished_is_stored_by_the_next_attempt(
        db: Session, store: Storage, tmp_path: Path) -> None:
    """The worker committed the checkpoint's row and snapshot, then died during the upload: the
    next attempt on that host finds it (its events are read already), stores it and resumes from
    it. Another host's row and one whose files are gone are left to prepare_resume."""
    job = make_job(db)
    work = tmp_path / "a"
    src = fake_checkpoint(work, 5)
    left = cs.snapshot(src, work / cs.UPLOADS)  # what the killed worker's upload thread had
    db.add_all([Checkpoint(job_id=job.id, step=5, path=str(src), host="a"),
                Checkpoint(job_id=job.id, step=10, path=str(work / "checkpoints" / "step-00000010"), host="a"),
                Checkpoint(job_id=job.id, step=15, path=str(tmp_path / "b" / "checkpoints" / "step-00000015"),
                           host="b")])
    db.commit()
    assert cs.unstored_snapshots(db, job.id, work, "a") == [(5, left)]
    # The trainer's folder still holds it where the snapshot was lost: a new snapshot is taken.
    shutil.rmtree(left)
    found = cs.unstored_snapshots(db, job.id, work, "a")
    assert found == [(5, left)] and (left / cs.MANIFEST).is_file()

    with cs.Uploader(store, job.id, keep=2, may_write=lambda: True) as up:
        up.submit_all(found)
        assert up.drain()
    assert cs.unstored_snapshots(db, job.id, work, "a") == []
    ck = cs.prepare_resume(db, store, job.id, work)
    assert ck is not None and ck.step == 5
    assert [c.step for c in db.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id))] == [5]
