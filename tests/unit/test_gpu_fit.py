"""Fitting a job to GPUs of different sizes: the least memory its plan runs in, the batch each GPU
size gets for batch_size "auto", and the placement filter that keeps a job off GPUs too small."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.scheduling import Waiting, blocked_head, pick
from core.settings import Settings
from trainer import planning as P
from worker.gpus import GpuPool, host_gpu_info

GiB = P.GiB
LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128_256, "tie_word_embeddings": True,
            "max_position_embeddings": 4096}


def spec(method: str = "lora", batch: int | str = "auto", seq: int = 2048, speed: str = "auto") -> dict:
    return {"model": "x", "method": method, "speed": speed, "hyperparameters": {"batch_size": batch, "max_seq_len": seq}}


@pytest.mark.parametrize("job", [spec(), spec(batch=8), spec(method="full", batch=2, speed="lean")])
def test_the_least_memory_is_where_the_plan_starts_to_fit(job: dict) -> None:
    need = P.min_gpu_memory_bytes(job, LLAMA_1B)
    assert P.plan(job, LLAMA_1B, need).fits
    assert not P.plan(job, LLAMA_1B, int(need * 0.97)).fits


def test_batch_size_auto_is_picked_for_each_gpu_size() -> None:
    job = spec(speed="fast")
    batches = [P.plan(job, LLAMA_1B, gib * GiB).batch_size for gib in (8, 16, 40, 80)]
    assert batches == sorted(set(batches)) and batches[0] is not None, batches
    # The least memory asks only for batch 1: each host then fits the largest batch it can hold.
    assert P.min_gpu_memory_bytes(job, LLAMA_1B) < 8 * GiB


def w(id: str, gpus: int = 1, need: float | None = None) -> Waiting:
    return Waiting(id, gpus, 0, 0.0, min_gpu_memory_gib=need)


def test_a_job_is_never_picked_for_gpus_smaller_than_its_plan() -> None:
    queue = [w("big", need=40.0), w("small", need=10.0), w("unplanned")]
    assert pick(queue, free=1, total=1, t=1.0, memory_gib=16.0).id == "small"
    assert pick(queue, free=1, total=1, t=1.0, memory_gib=80.0).id == "big"
    assert pick(queue[:1], free=1, total=1, t=1.0, memory_gib=16.0) is None
    assert pick(queue[2:], free=1, total=1, t=1.0, memory_gib=16.0).id == "unplanned"
    # A host whose memory is unknown checks GPU counts only, as before.
    assert pick(queue, free=1, total=1, t=1.0).id == "big"
    # A job too big for this host's GPUs is not what this host preempts for.
    assert blocked_head([w("big", gpus=2, need=40.0)], free=1, total=2, t=1.0, memory_gib=16.0) is None
    assert blocked_head([w("big", gpus=2, need=40.0)], free=1, total=2, t=1.0, memory_gib=80.0).id == "big"


def test_a_worker_reports_the_gpu_memory_it_is_told(tmp_path: Path) -> None:
    s = Settings(gpu_memory_gib=16, gpu_name="NVIDIA T4")
    assert host_gpu_info(s, 2, "cpu", None) == [{"name": "NVIDIA T4", "memory_gib": 16}] * 2
    assert host_gpu_info(Settings(), 2, "cpu", None) == []
    pool = GpuPool(2, tmp_path, "cpu", gpu_info=host_gpu_info(Settings(gpu_memory_gib=80), 2, "cpu", None))
    assert pool.memory_gib == 80
    assert pool.gpu_info[0]["name"] == "simulated"
    assert GpuPool(1, tmp_path / "b", "cpu").memory_gib is None


def test_tuneq_status_names_the_host_and_its_gpus() -> None:
    from tuneq.cli.render import _job_rows

    job = {"id": "ftjob-1", "status": "running", "model": "m", "method": {"type": "lora"}, "host": "gpu-7",
           "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.6, "count": 2}}
    assert ("host", "gpu-7 (2 x NVIDIA H100 80GB HBM3, 79.6 GiB)") in _job_rows(job)
    assert ("host", "gpu-7") in _job_rows({**job, "gpu": None})
    assert not any(k == "host" for k, _ in _job_rows({**job, "host": None}))
