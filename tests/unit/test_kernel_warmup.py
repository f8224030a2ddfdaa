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


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("sms", [108, 114, 117, 132, 144, 148, 170])
def test_token_counts_give_each_specialization_of_rows_per_sm(sms: int, rows: int) -> None:
    """liger's RMSNorm backward gets ceil(tokens / SMs) as an integer argument, which Triton compiles
    apart as 1, a multiple of 16, or neither: the warm-up's batches give each, with every row's
    length a multiple of 16."""
    counts = token_counts(sms, rows)
    per_sm = [-(-n // sms) for n in counts]
    assert per_sm[0] == 1 and per_sm[1] % 16 == 0 and per_sm[2] != 1 and per_sm[2] % 16, (counts, per_sm)
    assert all(n % (16 * rows) == 0 for n in counts), counts


def test_a_gpu_with_fewer_sms_than_the_counts_need_gets_one() -> None:
    assert token_counts(40, 4) == [4 * kernel_warmup.SEQ]


def test_the_passes_cover_the_shapes_liger_compiles_apart(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RMSNorm's backward takes the tokens and the rows per SM as integers, RoPE the batch's rows
    and its cos table's rows as constants and the row length as an integer: at the default batch
    size, each token count packed at a length that is a multiple of 16 and a token shorter, padded
    rows at both kinds of length, then an evaluation's pass, untrained."""
    from trainer.spec import Hyperparameters

    rows = Hyperparameters().batch_size
    assert kernel_warmup.default_rows() == rows
    monkeypatch.setattr(kernel_warmup, "token_counts", lambda sms, rows: [rows * 16, rows * 48])
    config = AutoConfig.from_pretrained(tiny_model_dir)
    made = kernel_warmup.passes(config, 132, rows, False)
    seen = [("position_ids" in b, *b["input_ids"].shape, grad) for b, grad in made]
    odd = kernel_warmup.ODD_SEQ
    assert odd % 16 and kernel_warmup.SEQ % 16 == 0
    assert seen == [(True, rows, 16, True), (True, rows, 15, True), (True, rows, 48, True), (True, rows, 47, True),
                    (False, rows, kernel_warmup.SEQ, True), (False, rows, odd, True), (False, rows, kernel_warmup.SEQ, False)]
    # A packed row holds two examples, each counting its positions from 0.
    assert made[1][0]["position_ids"][0].tolist() == list(range(7)) + list(range(8))


@pytest.mark.parametrize("sms", [108, 132, 144])
def test_the_shorter_rows_keep_rows_per_sm_in_its_class_with_tokens_not_a_multiple_of_16(sms: int) -> None:
    rows = kernel_warmup.default_rows()
    for n in token_counts(sms, rows):
        short = n - rows
        assert short % 16
        full, shorter = -(-n // sms), -(-short // sms)
        assert (full == 1) == (shorter == 1) and (full % 16 == 0) == (shorter % 16 == 0), (n, full, shorter)


def test_warm_model_runs_every_pass(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    ran: list[bool] = []
    passes = kernel_warmup.passes

    def spy(config, sms, rows, bounds):
        out = passes(config, sms, rows, bounds)
        ran.extend(grad for _, grad in out)
        return out

    monkeypatch.setattr(kernel_warmup, "passes", spy)
    kernel_warmup.warm_model(str(tiny_model_dir), torch.device("cpu"), methods=("lora",))
    assert ran == [True] * 4 + [False], ran  # a CPU counts no SMs: one packed count, twice


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
