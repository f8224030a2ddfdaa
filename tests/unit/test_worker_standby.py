"""Standby trainers (trainer.standby, worker.standby): a job handed to a process that imported the
trainer beforehand runs like a fresh one, is found and signalled like one, and reports its
start-up from the job's arrival."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.settings import Settings
from trainer.events import read_events
from worker.gpus import GpuPool
from worker.process import TrainerProcess, kill_orphans, trainer_pids
from worker.standby import DEVICES_ENV, StandbyPool, runtime_only
from worker.workdir import CODE_ROOT, trainer_argv

PROBE = """
import torch
from trainer.standby import preload
preload()
import sys
print(torch.cuda.is_initialized(), torch.cuda._cached_device_count, sorted(m for m in ("peft", "accelerate", "trainer.loop", "transformers.models.llama.modeling_llama") if m in sys.modules))
"""


def test_the_standbys_imports_leave_cuda_uninitialised() -> None:
    """What a standby imports before its job: the libraries and the trainer, with CUDA untouched
    by torch (on a GPU host bitsandbytes asks for devices at import: see trainer.standby)."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=CODE_ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(CODE_ROOT)}, check=True).stdout.strip().splitlines()[-1]
    assert out == "False None ['accelerate', 'peft', 'trainer.loop', 'transformers.models.llama.modeling_llama']"


def test_only_run_time_variables_may_differ_from_the_standbys() -> None:
    base = {"PATH": "/bin", DEVICES_ENV: "0", "TUNEQ_SUPERVISOR_PID": "1"}
    assert runtime_only(base, {**base, "TUNEQ_TEST_OOM": "1", "TUNEQ_SUPERVISOR_PID": "2"})
    assert not runtime_only(base, {**base, DEVICES_ENV: "1"})  # its imports fixed its devices
    assert not runtime_only(base, {**base, "HF_HUB_OFFLINE": "1"})  # read by a library at import


def test_standbys_are_kept_for_the_gpus_the_next_jobs_will_get(tmp_path: Path) -> None:
    gpus = GpuPool(3, tmp_path / "locks", "gpu")
    pool = StandbyPool()
    pool.gpus, pool.target = gpus, 2
    assert pool.wanted() == ["0", "1"]
    first = gpus.reserve(1, "job-a")  # takes GPU 0
    assert pool.wanted() == ["1", "2"]
    second = gpus.reserve(2, "job-b")  # noqa: F841 - held while the reservation lives
    assert pool.wanted() == ["0", "1"]  # all busy: the next job gets one of them once it is free
    gpus.release(first)
    assert pool.wanted()[0] == "0"
    # More standbys than GPUs: each GPU gets one, the next ones a second.
    pool.gpus, pool.target = GpuPool(2, tmp_path / "locks2", "gpu"), 3
    assert pool.wanted() == ["0", "1", "0"]


class ReadyStandby:
    """A standby that finished its imports, without the process (worker.standby.Standby's surface)."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.popen = subprocess.Popen([sys.executable, "-c", "pass"])
        self.popen.wait()
        self.popen.poll = lambda: None  # type: ignore[method-assign] - "alive" for the pool
        self.handed = False

    def wait_ready(self, timeout: float) -> bool:
        return True

    def hand(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> bool:
        self.handed = True
        return True

    def close(self) -> None:
        pass


def test_a_job_right_after_the_last_one_finds_a_standby_of_its_gpu_ready(tmp_path: Path, monkeypatch) -> None:
    """One GPU and the default standbys: the GPU gets two. While the refill that the first job
    started still imports, a job submitted as the first ends takes the second one at once."""
    import worker.standby as standby_module

    monkeypatch.setattr(standby_module, "Standby", ReadyStandby)
    settings = Settings(home=tmp_path / "home", standby_trainers=Settings.model_fields["standby_trainers"].default)
    gpus = GpuPool(1, tmp_path / "locks", "gpu")
    pool = StandbyPool()
    pool.start(settings, gpus)
    assert [s.env[DEVICES_ENV] for s in pool.idle] == ["0", "0"]
    assert pool.state() == {"wanted": 2, "ready": 2}
    env = pool.env(settings, "0")
    first = pool.take(env, ["run"], tmp_path, tmp_path / "log")
    assert first is not None and pool.state() == {"wanted": 2, "ready": 1}
    began = time.monotonic()
    second = pool.take(env, ["run"], tmp_path, tmp_path / "log")  # no refill in between
    assert second is not None and second is not first and time.monotonic() - began < 0.5
    assert pool.state() == {"wanted": 2, "ready": 0}
    pool.idle.clear()


def test_a_running_job_refills_only_a_gpu_left_without_a_standby(tmp_path: Path, monkeypatch) -> None:
    """At a job's first step (only_missing) the pool starts a standby only for a GPU that has none
    left; while one is still kept, the refill waits for the job's end (a plain refill)."""
    import worker.standby as standby_module

    monkeypatch.setattr(standby_module, "Standby", ReadyStandby)
    settings = Settings(home=tmp_path / "home", standby_trainers=2)
    pool = StandbyPool()
    pool.start(settings, GpuPool(1, tmp_path / "locks", "gpu"))
    env = pool.env(settings, "0")
    assert pool.take(env, ["run"], tmp_path, tmp_path / "log") is not None
    pool.refill(settings, only_missing=True)
    assert len(pool.idle) == 1  # GPU 0 still has its second standby: no imports beside the job
    pool.refill(settings)
    assert len(pool.idle) == 2  # the job ended: back to two
    pool.take(env, ["run"], tmp_path, tmp_path / "log")
    pool.take(env, ["run"], tmp_path, tmp_path / "log")
    pool.refill(settings, only_missing=True)
    assert [s.env[DEVICES_ENV] for s in pool.idle] == ["0"]  # none left: one starts at the first step
    pool.idle.clear()


def _spec(make_spec, tmp_path: Path, **hp) -> Path:
    spec = make_spec("lora", hyperparameters={"batch_size": 2, "max_seq_len": 32, **hp})
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    return path


def test_a_job_runs_in_the_standby_of_its_gpu_and_is_supervised_like_a_fresh_trainer(make_spec, tmp_path: Path) -> None:
    """Two "GPUs" (lock files), one standby kept for the lowest free one. A job for the other GPU
    starts fresh and leaves the standby alone; a job for its GPU runs in it: found by its work
    directory, in a process group of its own, its startup event with import near 0 and the
    standby's own import in the detail. A cancel (SIGTERM to the group) of the next standby's job
    ends it as it ends a fresh trainer, and an idle standby of a dead worker is an orphan."""
    settings = Settings(home=tmp_path / "home", standby_trainers=1)
    gpus = GpuPool(2, tmp_path / "locks", "gpu")
    pool = StandbyPool()
    pool.start(settings, gpus)
    try:
        [standby] = pool.idle
        assert standby.env[DEVICES_ENV] == "0"
        assert standby.wait_ready(300)
        idle_pid = standby.popen.pid

        spec = _spec(make_spec, tmp_path, max_steps=40)
        other = tmp_path / "other"
        other.mkdir()
        fresh = TrainerProcess(trainer_argv(settings, spec, other, False), cwd=other, log_path=other / "trainer.log",
                               env={**pool.env(settings, "1")}, standbys=pool)
        assert not fresh.standby and fresh.pid != idle_pid and pool.idle == [standby]
        # Found by its command line, which a loaded machine may show a moment after the start.
        deadline = time.monotonic() + 30
        while fresh.pid not in trainer_pids(other) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trainer_pids(other) == [fresh.pid]  # the idle standby is no job's trainer
        fresh.kill()

        out = tmp_path / "out"
        out.mkdir()
        proc = TrainerProcess(trainer_argv(settings, spec, out, False), cwd=out, log_path=out / "trainer.log",
                              env=pool.env(settings, "0"), standbys=pool)
        assert proc.standby and proc.pid == idle_pid and pool.idle == []
        deadline = time.monotonic() + 30
        while proc.pid not in trainer_pids(out) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trainer_pids(out) == [proc.pid] and os.getpgid(proc.pid) == proc.pid
        assert proc.wait(300) and proc.returncode == 0, (out / "trainer.log").read_text()[-3000:]
        [startup] = [e["data"] for e in read_events(out / "events.jsonl") if e["type"] == "startup"]
        assert startup["detail"]["standby"] is True and startup["detail"]["standby_import"] > 1.0
        assert startup["phases"]["import"] < 1.0, startup
        assert (out / "final" / "manifest.json").is_file()

        # GPU 0 is free again: the refill starts a standby for it; a cancel of its job.
        pool.refill(settings)
        [second] = pool.idle
        assert second.env[DEVICES_ENV] == "0" and second.wait_ready(300)
        cancelled = tmp_path / "cancelled"
        cancelled.mkdir()
        proc = TrainerProcess(trainer_argv(settings, _spec(make_spec, tmp_path, max_steps=100_000), cancelled, False),
                              cwd=cancelled, log_path=cancelled / "trainer.log", env=pool.env(settings, "0"),
                              standbys=pool)
        assert proc.standby
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                e["type"] == "metrics" for e in read_events(cancelled / "events.jsonl")):
            time.sleep(0.2)
        proc.stop(signal.SIGTERM, grace_s=60)
        assert proc.returncode == 143, (cancelled / "trainer.log").read_text()[-3000:]
        assert trainer_pids(cancelled) == []
    finally:
        pool.close()

    # An idle standby whose worker died is an orphan to the next worker's scan.
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path)
    env = {**pool.env(settings), "TUNEQ_SUPERVISOR_PID": str(orphan.pid)}
    from worker.standby import Standby

    idle = Standby(env, tmp_path)
    orphan.kill()
    orphan.wait()
    deadline = time.monotonic() + 30
    while idle.popen.poll() is None and time.monotonic() < deadline:
        kill_orphans()  # or its own watchdog, whichever comes first
        time.sleep(0.2)
    assert idle.popen.poll() is not None
    idle.close()
