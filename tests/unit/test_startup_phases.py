"""Start-up phases: the trainer's marks, the worker's progress.startup, and `tuneq status`'s row."""

from __future__ import annotations

from pathlib import Path

from core.models import Job
from trainer.startup import Phases, process_started
from tuneq.cli.render import _startup
from worker.events import ProgressTracker


def test_phases_are_the_time_between_marks_in_order(monkeypatch) -> None:
    clock = iter([12.0, 15.5, 16.0])
    monkeypatch.setattr("trainer.startup.time.time", lambda: next(clock))
    phases = Phases(started=10.0)
    for name in ("import", "data", "load"):
        phases.mark(name)
    assert phases.seconds() == {"import": 2.0, "data": 3.5, "load": 0.5}
    assert list(phases.seconds()) == ["import", "data", "load"] and phases.total() == 6.0


def test_this_process_started_before_now() -> None:
    import time

    assert 0 <= time.time() - process_started() < 24 * 3600


def test_the_job_body_gets_queue_launch_and_the_trainers_phases(tmp_path: Path) -> None:
    job = Job(created_at=100.0, started_at=101.5, progress={"step": 1})
    data = {"phases": {"import": 4.0, "data": 1.0, "load": 3.0, "prepare": 0.5, "first_step": 2.0},
            "seconds": 10.5, "process_started": 102.0}
    ProgressTracker(tmp_path)._on_startup(job, data, t=112.5)
    assert job.progress["step"] == 1
    assert job.progress["startup"] == {"queue": 1.5, "launch": 0.5, "import": 4.0, "data": 1.0, "load": 3.0,
                                       "prepare": 0.5, "first_step": 2.0, "total": 12.5}
    row = _startup(job.progress["startup"])
    assert row.startswith("queue 1.5 s, launch 0.5 s, import 4.0 s") and row.endswith("; 12.5 s to the first step")


def test_the_apis_validation_comes_first_and_the_queue_counts_from_when_the_job_was_queued(tmp_path: Path) -> None:
    """The API's data check (from the request to `queued`, a deferred check included) is a phase of
    its own, and the total counts from the request."""
    job = Job(created_at=100.0, started_at=104.0, progress={"submitted_at": 99.0, "queued_at": 102.5})
    data = {"phases": {"import": 0.1, "first_step": 1.0}, "seconds": 1.1, "process_started": 104.5}
    ProgressTracker(tmp_path)._on_startup(job, data, t=105.6)
    assert job.progress["startup"] == {"validation": 3.5, "queue": 1.5, "launch": 0.5, "import": 0.1,
                                       "first_step": 1.0, "total": 6.6}


def test_a_real_run_reports_each_phase_and_reuses_the_data_checks_tokens(make_spec, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """The trainer as the worker starts it (trainer.cli), on the tiny model, after the data check
    tokenized its file: one startup event whose phases add up to its total, the data phase's parts,
    and the tokens read from the cache rather than tokenized again."""
    from trainer.cli import main
    from trainer.data.validate import validate_file
    from trainer.events import read_events
    from trainer.model import load_tokenizer

    monkeypatch.setenv("TUNEQ_TOKEN_CACHE_DIR", str(tmp_path / "cache"))
    spec = make_spec("lora", hyperparameters={"max_steps": 2, "batch_size": 2, "max_seq_len": 32})
    # What the API's data check does when the file is uploaded.
    assert validate_file(spec.training_file, load_tokenizer(spec.model), 32)["valid"]
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    assert main(["run", str(tmp_path / "spec.json"), "--out", str(tmp_path / "out")]) == 0

    startups = [e for e in read_events(tmp_path / "out" / "events.jsonl") if e["type"] == "startup"]
    assert len(startups) == 1
    data = startups[0]["data"]
    assert list(data["phases"]) == ["import", "data", "load", "prepare", "first_step"]
    assert all(v >= 0 for v in data["phases"].values())
    assert abs(sum(data["phases"].values()) - data["seconds"]) < 0.05
    detail = data["detail"]
    assert {"device", "tokenizer", "files", "pack", "weights", "liger", "method", "fast_path"} <= set(detail)
    # The data and load phases are each made of their parts.
    parts = detail["device"] + detail["tokenizer"] + detail["files"] + detail["pack"]
    assert abs(parts - data["phases"]["data"]) < 0.05
    loading = detail["weights"] + detail["liger"] + detail["method"] + detail["fast_path"]
    assert abs(loading - data["phases"]["load"]) < 0.05
    assert detail["kernel_cache_added"] == 0, "a CPU run compiles no Triton kernel"
    assert detail["tokens_cached"] is True
    assert detail["skipped_libraries"] == [], "a job run inside a caller's process leaves its modules alone"


def test_the_libraries_a_job_does_not_use_are_hidden_and_those_it_uses_are_not(make_spec, tmp_path: Path) -> None:
    """bitsandbytes is hidden from a lora job on a plain base, kept for qlora, its optimizers and a
    base stored quantized; boto3 (accelerate's SageMaker launcher) from every job."""
    import json
    import shutil

    from trainer.startup import skip_unused_libraries

    def hidden(spec) -> dict:  # noqa: ANN001
        modules: dict = {}
        assert skip_unused_libraries(spec, modules) == list(modules)
        assert all(m is None for m in modules.values())
        return modules

    lora = make_spec("lora")
    assert set(hidden(lora)) == {"bitsandbytes", "boto3"}
    assert set(hidden(make_spec("qlora"))) == {"boto3"}
    assert set(hidden(make_spec("lora", optimizer="adamw_8bit"))) == {"boto3"}
    quantized = tmp_path / "quantized"
    shutil.copytree(lora.model, quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    assert set(hidden(make_spec("lora", model=str(quantized)))) == {"boto3"}
    assert set(hidden(make_spec("lora", model=str(tmp_path / "not-here")))) == {"boto3"}
    # A module already imported stays as it is.
    assert skip_unused_libraries(lora, {"boto3": object()}) == ["bitsandbytes"]


def test_kernels_compiled_during_a_run_are_counted_from_tritons_cache(monkeypatch, tmp_path: Path) -> None:
    from trainer.startup import kernel_cache_added, kernel_cache_entries

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert kernel_cache_entries() == 0, "no cache yet: nothing compiled"
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "old").mkdir()
    before = kernel_cache_entries()
    for name in ("a", "b"):
        (tmp_path / "triton" / name).mkdir()
    assert (before, kernel_cache_added(before)) == (1, 2)
    assert kernel_cache_added(None) is None
    monkeypatch.delenv("TRITON_CACHE_DIR")
    assert kernel_cache_entries(tmp_path / "triton") == 3, "another process's cache, named"


def test_kernel_names_reads_each_cache_entrys_kernel_and_skips_launchers(tmp_path: Path) -> None:
    from trainer.startup import kernel_names

    rope = tmp_path / "abc"
    rope.mkdir()
    (rope / "_triton_rope.json").write_text("{}")
    (rope / "__grp___triton_rope.json").write_text("{}")
    (rope / "_triton_rope.cubin").write_bytes(b"x")
    launcher = tmp_path / "def"
    launcher.mkdir()
    (launcher / "__triton_launcher.so").write_bytes(b"x")
    found = kernel_names(tmp_path)
    assert [name for name, _ in found] == ["_triton_rope"]
    assert found[0][1] == max(f.stat().st_mtime for f in rope.iterdir())
    assert kernel_names(tmp_path / "missing") == []
