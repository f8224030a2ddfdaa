"""An inference server on a GPU host holds one GPU through the workers' lock files: jobs see one
fewer, and preemption never counts it as a job's or as coming free."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import patch

import pytest

from core.inference import SERVER_OWNER
from core.settings import Settings
from worker.gpus import GpuPool
from worker.preemption import being_freed, local_holdings
from worker.serve import take_gpu


@pytest.fixture
def environ() -> Iterator[None]:
    """take_gpu sets CUDA_VISIBLE_DEVICES in this process: it must not outlive the test (a later
    test's subprocesses would see a GPU this CPU machine does not have)."""
    with patch.dict(os.environ):
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        yield


def test_the_server_takes_one_gpu_that_placement_leaves_alone(tmp_path: Path, environ: None):
    settings = Settings(gpus=2, gpu_lock_dir=tmp_path / "locks", home=tmp_path)
    reservation = take_gpu(settings, f"{SERVER_OWNER}host:1")
    assert reservation is not None and reservation.indices == [0]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # torch, imported after, sees only its GPU
    pool = GpuPool.for_host(settings)
    assert pool.free() == 1
    assert pool.holders() == {0: f"{SERVER_OWNER}host:1"}
    held, running = local_holdings(None, pool)  # no job holds a GPU, so no database read
    assert held == {} and running == [] and being_freed(held, running) == 0
    job = pool.reserve(1, "ftjob-x")
    assert job is not None and job.indices == [1] and pool.reserve(1, "ftjob-y") is None


def test_on_a_cpu_host_the_server_takes_no_slot(tmp_path: Path):
    assert take_gpu(Settings(gpus=0, gpu_lock_dir=tmp_path / "locks", home=tmp_path), f"{SERVER_OWNER}h:1") is None


def test_on_a_host_of_one_gpu_the_server_leaves_it_to_the_jobs(tmp_path: Path, environ: None):
    settings = Settings(gpus=1, gpu_lock_dir=tmp_path / "locks", home=tmp_path)
    assert take_gpu(settings, f"{SERVER_OWNER}h:1") is None
    pool = GpuPool.for_host(settings)
    assert pool.free() == 1 and pool.holders() == {}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
