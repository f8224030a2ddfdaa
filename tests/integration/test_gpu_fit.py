"""A job fitted to the GPUs of the host that takes it (worker.placement.fit_to_host): the GPUs it
runs on are recorded, and its batch_size "auto" becomes what this host's GPUs fit."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from core.models import Checkpoint
from tests.integration.conftest import make_job
from trainer import planning
from worker.gpus import GpuPool
from worker.placement import fit_to_host

SMALL_GIB = 0.085  # the tiny model at max_seq_len 32 fits there (from 0.077 GiB), at a batch below 64
HP = {"max_steps": 4, "batch_size": 64, "max_seq_len": 32, "warmup_steps": 0}


def pool(tmp_path: Path, name: str, memory_gib: float | None) -> GpuPool:
    info = [{"name": "simulated", "memory_gib": memory_gib}] if memory_gib is not None else []
    return GpuPool(1, tmp_path / name, "cpu", host=name, gpu_info=info)


def test_batch_size_auto_is_fitted_to_each_host(db: Session, worker_env: dict[str, str], tmp_path: Path) -> None:
    job = make_job(db, worker_env["model"], examples=64, hyperparameters=dict(HP))
    job.plan = {"requested_batch_size": "auto", "checked": True}  # the API picked 64 on the largest GPU
    db.commit()
    expected = planning.plan({**job.spec, "hyperparameters": {**HP, "batch_size": "auto"}},
                             planning.local_config(worker_env["model"]), int(SMALL_GIB * planning.GiB)).batch_size
    assert expected is not None and expected < 64

    said = fit_to_host(db, job, pool(tmp_path, "small", SMALL_GIB))
    assert job.spec["hyperparameters"]["batch_size"] == expected and f"batch_size {expected}" in said
    assert job.gpu == {"name": "simulated", "memory_gib": SMALL_GIB, "count": 1}
    db.commit()
    # Started over on a larger host: the API's pick again, never more.
    assert fit_to_host(db, job, pool(tmp_path, "large", 80.0)) is not None
    assert job.spec["hyperparameters"]["batch_size"] == 64 and job.gpu["memory_gib"] == 80.0
    db.commit()
    # A job with a checkpoint resumes with the batch it was written with.
    db.add(Checkpoint(job_id=job.id, step=2, path="x"))
    db.commit()
    assert fit_to_host(db, job, pool(tmp_path, "small2", SMALL_GIB)) is None
    assert job.spec["hyperparameters"]["batch_size"] == 64 and job.gpu["memory_gib"] == SMALL_GIB


def test_a_fixed_batch_size_and_an_unknown_gpu_are_left_alone(db: Session, worker_env: dict[str, str],
                                                               tmp_path: Path) -> None:
    job = make_job(db, worker_env["model"], examples=64, hyperparameters=dict(HP))
    job.plan = {"requested_batch_size": 64, "checked": True}
    db.commit()
    assert fit_to_host(db, job, pool(tmp_path, "small", SMALL_GIB)) is None
    assert job.spec["hyperparameters"]["batch_size"] == 64 and job.gpu["memory_gib"] == SMALL_GIB
    job.gpu = None
    job.plan = {"requested_batch_size": "auto", "checked": True}
    assert fit_to_host(db, job, pool(tmp_path, "cpu", None)) is None
    assert job.gpu is None and job.spec["hyperparameters"]["batch_size"] == 64
