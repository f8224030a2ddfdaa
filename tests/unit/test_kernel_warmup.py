"""The kernels' warm-up: the trainer's one-layer runs of each model's fast path, and the worker's
process that runs them once as it starts (compiling on the GPU is checked in tests/gpu)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from transformers import AutoConfig

from core.settings import Settings
from trainer import kernel_warmup
from trainer.kernel_warmup import METHODS, one_layer, token_counts, warm
from worker.gpus import GpuPool
from worker.kernel_warmup import KernelWarmup


def test_one_layer_keeps_the_widths_the_kernels_specialize_on(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    small = one_layer(config)
    assert (small.num_hidden_layers, small.layer_types) == (1, ["full_attention"])
    for width in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads"):
        assert getattr(small, width) == getattr(config, width), width
    assert config.num_hidden_layers > 1, "the model's own config is left alone"


def test_every_method_runs_a_step_and_a_model_that_cannot_load_is_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = warm([str(tiny_model_dir), str(tmp_path / "missing")])
    assert set(report["models"][str(tiny_model_dir)]) == set(METHODS)
    assert "config.json" in report["models"][str(tmp_path / "missing")]["error"]
    assert report["device"] == "cpu" and report["kernel_cache_added"] == 0


@pytest.mark.parametrize("sms", [108, 114, 117, 132, 144, 148, 170])
def test_token_counts_give_each_specialization_of_rows_per_sm(sms: int) -> None:
    """liger's RMSNorm backward gets ceil(tokens / SMs) as an integer argument, which Triton compiles
    apart as 1, a multiple of 16, or neither: the warm-up's batches give each, at multiples of 32."""
    counts = token_counts(sms)
    per_sm = [-(-n // sms) for n in counts]
    assert per_sm[0] == 1 and per_sm[1] % 16 == 0 and per_sm[2] != 1 and per_sm[2] % 16, (counts, per_sm)
    assert all(n % 32 == 0 for n in counts), counts


def test_the_training_passes_run_at_each_token_count(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    seen: list[tuple[bool, int]] = []
    batch = kernel_warmup._batch

    def spy(config, packed, bounds=False, tokens=kernel_warmup.ROWS * kernel_warmup.SEQ):
        out = batch(config, packed, bounds, tokens)
        seen.append((packed, int(out["input_ids"].numel())))
        return out

    monkeypatch.setattr(kernel_warmup, "token_counts", lambda sms: [64, 96])
    monkeypatch.setattr(kernel_warmup, "_batch", spy)
    kernel_warmup.warm_model(str(tiny_model_dir), torch.device("cpu"), methods=("lora",))
    assert seen == [(True, 64), (True, 96), (False, 128), (False, 128)], seen


def _settings(tmp_path: Path, tiny_model_dir: Path, **extra) -> Settings:
    return Settings(home=tmp_path / "home", model_roots=[tiny_model_dir.parent], **extra)


def test_a_gpu_worker_warms_its_local_models_once_and_a_cpu_one_does_not(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path, tiny_model_dir)
    cpu = KernelWarmup()
    cpu.start(settings, GpuPool(1, tmp_path / "locks", kind="cpu"))
    assert cpu.state() == "off"
    off = KernelWarmup()
    off.start(_settings(tmp_path, tiny_model_dir, warm_kernels=False), GpuPool(1, tmp_path / "locks", kind="gpu"))
    assert off.state() == "off"
    # GPUs counted by TUNEQ_GPUS on a host with no GPU driver: nothing to compile for.
    monkeypatch.setattr("worker.kernel_warmup.gpu_driver_present", lambda: False)
    slots = KernelWarmup()
    slots.start(settings, GpuPool(1, tmp_path / "locks", kind="gpu"))
    assert slots.state() == "off" and slots.proc is None

    # A GPU host (here the driver is only said to be there, so the same runs go to the CPU).
    monkeypatch.setattr("worker.kernel_warmup.gpu_driver_present", lambda: True)
    kernels = KernelWarmup()
    kernels.start(settings, GpuPool(1, tmp_path / "locks", kind="gpu", device_ids=["3"]))
    assert kernels.state() == "warming"
    first = kernels.proc
    kernels.start(settings, GpuPool(1, tmp_path / "locks", kind="gpu"))
    assert kernels.proc is first, "started once"
    deadline = time.monotonic() + 120
    while kernels.state() == "warming" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kernels.state() == "done", (tmp_path / "home" / "work" / "kernel-warmup.log").read_text()
    assert set(kernels.report["models"][str(tiny_model_dir)]) == set(METHODS)
