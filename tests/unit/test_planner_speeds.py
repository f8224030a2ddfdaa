"""The plan's time: the efficiency measured for the GPU model and setting (trainer/planning/speeds.json),
the start-up measured there in place of a fixed share of the peak, and the checkpoints written
before the last step at the rate measured on that host."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from trainer.planning import model_shape, plan, speeds
from trainer.planning.compute import DEFAULT_EFFICIENCY, RNG_BYTES_PER_RANK, checkpoints_before_last
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
        assert entry["peak_tflops"] > 0 and entry.get("startup", {"fixed_s": 1})["fixed_s"] > 0
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
        weights = speeds.stored_weight_bytes(model_shape(build_config("llama-3.2-1b")).total_params)
        startup = entry["startup"]["fixed_s"] + entry["startup"]["load_s_per_gib"] * weights / GiB
        assert c.startup_seconds == pytest.approx(startup, abs=0.05)
        assert c.wall_seconds == pytest.approx(c.seconds + c.startup_seconds)


def test_a_warm_start_counts_the_start_up_measured_from_submission(tmp_path: Path) -> None:
    """A one-process job whose trainer's imports are done (the service's template or a standby) has
    the warm fixed part; a fresh trainer, or a job of several processes, the fresh one. The API
    says per method: the template takes no job that needs bitsandbytes."""
    from api.planning import warm_start
    from core.settings import Settings

    entry = speeds.table()["gpus"]["H100"]["startup"]
    config = build_config("llama-3.2-1b")
    load = entry["load_s_per_gib"] * speeds.stored_weight_bytes(model_shape(config).total_params) / GiB

    def startup(**kw: Any) -> float:
        return plan(job("fast"), config, 80 * GiB, dataset_tokens=1, gpu_model=H100, **kw).compute.startup_seconds

    assert startup(warm_start=True) == pytest.approx(entry["warm_fixed_s"] + load, abs=0.05)
    assert startup() == startup(warm_start=False) == pytest.approx(entry["fixed_s"] + load, abs=0.05)
    assert startup(warm_start=lambda method: method != "lora") == startup()
    assert startup(warm_start=True, gpus=2) == pytest.approx(entry["fixed_s"] + load, abs=0.05)
    # The load reads the stored bf16 weights whatever the method keeps on the GPU: QLoRA's 4-bit
    # base loads as long as LoRA's (it is quantized after), full's fp32 masters no longer.
    for method in ("qlora", "full"):
        other = plan({**job("lean"), "method": method}, config, 80 * GiB, dataset_tokens=1, gpu_model=H100).compute
        assert other.startup_seconds == pytest.approx(startup(), abs=0.05)

    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps(config.to_dict()))
    template_only = Settings(standby_trainers=0, trainer_template=True)
    assert warm_start({}, "lora", str(m), template_only) and not warm_start({}, "qlora", str(m), template_only)
    assert not warm_start({"optimizer": "adamw_8bit"}, "lora", str(m), template_only)
    assert not warm_start({}, "lora", str(tmp_path / "unreadable"), template_only)  # it may be stored quantized
    assert warm_start({}, "qlora", str(m), Settings(standby_trainers=2, trainer_template=True))
    assert not warm_start({}, "lora", str(m), Settings(standby_trainers=0, trainer_template=False))


def test_a_setting_measured_elsewhere_is_carried_over_as_a_ratio() -> None:
    """Full fine-tuning with fp32 master weights was measured on the H200 only: on the H100 it keeps
    its ratio to the setting of the same method and speed both measured (full lean bf16)."""
    h100, h200 = speeds.speed_for(H100, "full lean"), speeds.speed_for("NVIDIA H200", "full lean")
    bf16_100, bf16_200 = speeds.speed_for(H100, "full lean bf16"), speeds.speed_for("NVIDIA H200", "full lean bf16")
    assert h100.efficiency / bf16_100.efficiency == pytest.approx(h200.efficiency / bf16_200.efficiency)
    assert h100.source.startswith("H100 full lean bf16 x") and "on H200" in h100.source
    assert h100.peak_tflops == bf16_100.peak_tflops
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


def test_a_gpu_model_without_a_measured_start_up_borrows_one_and_says_whose() -> None:
    # One start-up entry is kept per measured GPU model; none is copied by hand to the others.
    assert "startup" not in speeds.table()["gpus"]["H200"]
    for warm in (False, True):
        h100, h200 = (speeds.startup_seconds(gpu, 2 * GiB, warm=warm) for gpu in (H100, "NVIDIA H200"))
        assert h200[0] == h100[0] > 0 and h200[1].startswith("H200 (none measured there: H100's)")
    assert speeds.startup_seconds(H100, 2 * GiB)[1].startswith("H100, a fresh trainer process")


# ---- checkpoints in the wall time ---------------------------------------------------------------

ONE_B = build_config("llama-3.2-1b")


def planned(method: str = "lora", gpu: str | None = H100, tokens: int = 1, gpus: int = 1, **spec) -> Any:
    body = job("lean", method=method, **({"full_precision": "bf16"} if method == "full" else {}))
    for key in ("schedule", "hyperparameters"):
        body[key] = {**body.get(key, {}), **spec.pop(key, {})}
    body.update(spec)
    return plan(body, ONE_B, 80 * GiB, gpus, dataset_tokens=tokens, gpu_model=gpu, liger=True).compute


def test_a_checkpoint_costs_what_it_writes_at_the_hosts_measured_rate() -> None:
    """40 steps checkpointed every 20: the one at step 20 is in the wall time (the last step's save
    is after it). Full fine-tuning writes the whole model and AdamW's two states (bf16 with
    bf16 weights), LoRA its fp32 adapters and their fp32 states: about 55 times less."""
    rate = speeds.table()["gpus"]["H100"]["checkpoint"]
    params = plan(job("lean"), ONE_B, 80 * GiB).model["params"]
    lora_trained = plan(job("lean"), ONE_B, 80 * GiB).methods["lora"].estimate.trainable_params
    expected = {"full": params * 2 + params * 2 * 2, "lora": lora_trained * 4 + lora_trained * 4 * 2}
    got = {}
    for method in ("lora", "full"):
        c = planned(method, schedule={"checkpoint_every_steps": 20})
        assert c.checkpoints == 1
        assert c.checkpoint_bytes == expected[method] + RNG_BYTES_PER_RANK
        assert c.checkpoint_seconds == pytest.approx(rate["fixed_s"] + c.checkpoint_bytes / GiB / rate["gib_per_s"])
        assert c.wall_seconds == pytest.approx(c.startup_seconds + c.seconds + c.checkpoint_seconds)
        assert c.checkpoint_source.startswith("H100: bench/results/")
        got[method] = c
    assert 6.5 < got["full"].checkpoint_bytes / GiB < 7.5 and got["lora"].checkpoint_bytes / GiB < 0.2
    assert got["full"].checkpoint_seconds > 30 * got["lora"].checkpoint_seconds
    # Without a schedule a run of max_steps saves only at its end: nothing before the last step.
    none = planned("full")
    assert none.checkpoints == 0 and none.checkpoint_seconds == 0
    assert none.wall_seconds == pytest.approx(none.startup_seconds + none.seconds)


@pytest.mark.parametrize(("every", "count"), [(20, 1), (10, 3), (7, 5), (39, 1), (40, 0), (41, 0), (1, 39)])
def test_every_n_steps_counts_the_checkpoints_strictly_before_the_last_step(every: int, count: int) -> None:
    c = planned("full", schedule={"checkpoint_every_steps": every})
    assert c.checkpoints == count
    assert c.checkpoint_seconds == pytest.approx(count * planned("full", schedule={"checkpoint_every_steps": 20})
                                                 .checkpoint_seconds)


def test_epoch_ends_are_checkpoints_as_the_trainer_schedules_them() -> None:
    """Counted in epochs (no max_steps), each epoch's end saves, the last being the run's end; with
    max_steps only when checkpoint_every_epoch says so. A step that both ends an epoch and is a
    multiple of checkpoint_every_steps saves once."""
    per_epoch = 10 * 8 * 2048  # ten steps of 8 x 2048 tokens
    epochs = {"hyperparameters": {"max_steps": None, "n_epochs": 3}}
    assert planned(tokens=per_epoch, **epochs).checkpoints == 2  # steps 10 and 20 of 30
    assert planned(tokens=per_epoch, schedule={"checkpoint_every_epoch": False}, **epochs).checkpoints == 0
    assert planned(tokens=per_epoch, schedule={"checkpoint_every_steps": 10}, **epochs).checkpoints == 2
    # 4, 8, ..., 28 and the end of epoch 1 at step 10 (epoch 2's, step 20, is a multiple of 4)
    assert planned(tokens=per_epoch, schedule={"checkpoint_every_steps": 4}, **epochs).checkpoints == 8
    max25 = {"hyperparameters": {"max_steps": 25}}
    assert planned(tokens=per_epoch, **max25).checkpoints == 0
    assert planned(tokens=per_epoch, schedule={"checkpoint_every_epoch": True}, **max25).checkpoints == 2
    # The trainer's own test case: three steps an epoch, max_steps 7, saves at 3 and 6.
    assert checkpoints_before_last(7, None, [3, 6]) == 2 and checkpoints_before_last(6, None, [3, 6]) == 1


def test_minutes_add_checkpoints_over_the_steps_time() -> None:
    """checkpoint_every_minutes restarts its timer at every save: a job of about 20 minutes saves
    every 5 minutes, none at the end; with a save every 1000 of 4000 steps each stretch of about 5
    minutes gets one more."""
    steps = {"hyperparameters": {"max_steps": 4000}}
    alone = planned(schedule={"checkpoint_every_minutes": 5}, **steps)
    assert 15 * 60 < alone.seconds < 25 * 60
    assert alone.checkpoints == math.ceil(alone.seconds / 300) - 1 >= 3
    both = planned(schedule={"checkpoint_every_minutes": 5, "checkpoint_every_steps": 1000}, **steps)
    assert both.checkpoints == 3 + 4 * (math.ceil(both.seconds / 4 / 300) - 1)
    assert both.wall_seconds == pytest.approx(both.startup_seconds + both.seconds
                                              + both.checkpoints * alone.checkpoint_seconds / alone.checkpoints)


def test_fsdp_writes_the_whole_model_and_an_unmeasured_host_gets_the_stated_default() -> None:
    one = planned("full", schedule={"checkpoint_every_steps": 20})
    two = planned("full", gpus=2, strategy="fsdp", schedule={"checkpoint_every_steps": 20})
    # Rank 0 gathers every shard: the same weights and states, and one more rank's RNG.
    assert two.checkpoint_bytes == pytest.approx(one.checkpoint_bytes + RNG_BYTES_PER_RANK, abs=64)
    h200 = planned("full", gpu="NVIDIA H200", schedule={"checkpoint_every_steps": 20})
    assert "checkpoint" not in speeds.table()["gpus"]["H200"] and h200.checkpoint_source.startswith("default")
    assert h200.checkpoint_seconds == pytest.approx(speeds.DEFAULT_CHECKPOINT["fixed_s"] + h200.checkpoint_bytes / GiB
                                                    / speeds.DEFAULT_CHECKPOINT["gib_per_s"])


def test_the_h100_checkpoint_rate_matches_the_jobs_it_was_fit_to() -> None:
    """speeds.json's H100 rate against the committed job rows' checkpoint seconds (the fit's own
    data: this checks the file and the bench agree, a later run validates the fit)."""
    from bench.service_throughput import fit_checkpoint_rate

    fixed, rate = fit_checkpoint_rate([(0.1, 0.1 + 0.1 / 0.5), (1.0, 0.1 + 1.0 / 0.5), (7.0, 0.1 + 7.0 / 0.5)])
    assert fixed == pytest.approx(0.1) and rate == pytest.approx(0.5)
    result = json.loads((ROOT / "bench/results/service_throughput_h100.json").read_text())
    for part in result["settings"].values():
        for j in part["jobs"]:
            c = planned(j["setting"].split("-")[0], schedule={"checkpoint_every_steps": 20})
            measured = sum(j["checkpoints_s"]) / len(j["checkpoints_s"])
            assert c.checkpoint_seconds / c.checkpoints == pytest.approx(measured, rel=0.1), j["name"]
