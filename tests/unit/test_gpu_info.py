"""The registry's description of a worker's GPUs, read from nvidia-smi's CSV answer."""

from __future__ import annotations

from worker.gpus import parse_gpu_query

MIXED = """0, GPU-aaaa, NVIDIA H100 80GB HBM3, 81559
1, GPU-bbbb, NVIDIA H200, 143771
2, GPU-cccc, NVIDIA L4, 23034
"""


def test_every_gpu_with_its_name_and_memory() -> None:
    assert parse_gpu_query(MIXED) == [
        {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.6},
        {"name": "NVIDIA H200", "memory_gib": 140.4},
        {"name": "NVIDIA L4", "memory_gib": 22.5},
    ]


def test_a_confined_worker_describes_only_its_gpus_in_its_order() -> None:
    assert [g["name"] for g in parse_gpu_query(MIXED, ["2", "GPU-aaaa"])] == ["NVIDIA L4", "NVIDIA H100 80GB HBM3"]


def test_garbage_lines_are_skipped() -> None:
    assert parse_gpu_query("No devices were found\n0, GPU-x, Broken, [N/A]\n") == []
