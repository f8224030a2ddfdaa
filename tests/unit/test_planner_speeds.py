"""The plan's time: the efficiency measured for the GPU model and setting (trainer/planning/speeds.json)
and the start-up measured there, in place of a fixed share of the peak."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.planning import plan, speeds
from trainer.planning.compute import DEFAULT_EFFICIENCY
from trainer.tiny import build_config

ROOT = Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"
GiB = 1024**3


def job(speed: str, **extra) -> dict:
    return {"model": "m", "method": "lora", "lora": {"r": 16, "alpha": 32}, "training_file": "t", "speed": speed,
            "hyperparameters": {"batch_size": 8, "max_seq_len": 2048, "max_steps": 40}, **extra}


def test_every_measured_run_names_a_table_in_bench_results() -> None:
    data = speeds.table()
    assert {"H100", "H200"} <= set(data["gpus"])
    for entry in data["gpus"].values():
        assert entry["peak_tflops"] > 0 and entry["startup"]["fixed_s"] > 0
        for run in entry["runs"]:
            assert (ROOT / run["source"].split()[0]).is_file(), run["source"]
            assert 0 < speeds.run_efficiency(run, entry["peak_tflops"]) < 1


def test_a_measured_setting_reproduces_its_own_step_time() -> None:
    """The 1B LoRA job the H100 ran: 40 steps of 8 x 2048 tokens at the measured tokens/s, plus the
    start-up measured there (fixed part and the weights' load)."""
    entry = speeds.table()["gpus"]["H100"]
    for speed in ("lean", "fast"):
        run = next(r for r in entry["runs"] if r["setting"] == f"lora {speed}")
        c = plan(job(speed), build_config("llama-3.2-1b"), 80 * GiB, dataset_tokens=1, gpu_model=H100).compute
        assert c.efficiency_source.startswith(f"H100 lora {speed} (bench/results/")
        assert c.seconds == pytest.approx(40 * 8 * 2048 / run["tokens_per_second"], rel=1e-6)
        weights = plan(job(speed), build_config("llama-3.2-1b"), 80 * GiB).methods["lora"].estimate.weights
        startup = entry["startup"]["fixed_s"] + entry["startup"]["load_s_per_gib"] * weights / GiB
        assert c.startup_seconds == pytest.approx(startup, abs=0.05)
        assert c.wall_seconds == pytest.approx(c.seconds + c.startup_seconds)


def test_a_setting_measured_elsewhere_is_carried_over_as_a_ratio() -> None:
    """Full fine-tuning was measured on the H200 only: on the H100 it keeps its ratio to LoRA lean,
    which both measured."""
    h100, h200 = speeds.speed_for(H100, "full lean bf16"), speeds.speed_for("NVIDIA H200", "full lean bf16")
    lora100, lora200 = speeds.speed_for(H100, "lora lean"), speeds.speed_for("NVIDIA H200", "lora lean")
    assert h100.efficiency / lora100.efficiency == pytest.approx(h200.efficiency / lora200.efficiency)
    assert "on H200" in h100.source and h100.peak_tflops == lora100.peak_tflops
    # balanced is timed as lean (its recompute, at worst); fast borrows lean's where unmeasured.
    assert speeds.setting_key("lora", "balanced") == "lora lean"
    assert speeds.speed_for(H100, "qlora fast").source == speeds.speed_for(H100, "qlora lean").source


def test_an_unknown_gpu_keeps_the_default_efficiency_and_no_start_up(tmp_path: Path) -> None:
    c = plan(job("lean"), build_config("llama-3.2-1b"), 80 * GiB, dataset_tokens=1, gpu_model="Some Other GPU",
             peak_tflops=300).compute
    assert c.efficiency == DEFAULT_EFFICIENCY and c.peak_flops_per_gpu == 300e12
    assert speeds.speed_for("Some Other GPU", "lora lean") is None
    # A table the bench refreshed with another GPU model is read as it is.
    data = {"gpus": {"L40S": {"match": ["L40S"], "peak_tflops": 362.0, "startup": {"fixed_s": 9.0, "load_s_per_gib": 1.0},
                              "runs": [{"setting": "lora lean", "model": "llama-3.2-1b", "lora_r": 16, "batch_size": 8,
                                        "seq_len": 2048, "tokens_per_second": 20000, "source": "x"}]}}}
    (tmp_path / "speeds.json").write_text(json.dumps(data))
    loaded = speeds.table(tmp_path / "speeds.json")
    assert speeds.speed_for("NVIDIA L40S", "lora lean", loaded).peak_tflops == 362.0
    assert speeds.startup_seconds("NVIDIA L40S", 2 * GiB, loaded)[0] == pytest.approx(11.0)
