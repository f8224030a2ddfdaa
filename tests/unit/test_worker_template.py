"""The trainer template (trainer.template, worker.template): a job's trainer forked from one process
that imported the trainer once, supervised and ended like a fresh trainer, its exit code passed on
by the template; jobs it cannot take, and a template that is gone, get a fresh trainer."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from core.settings import Settings
from trainer.events import read_events
from worker.process import TrainerProcess, trainer_pids
from worker.template import TrainerTemplate, needs_bitsandbytes
from worker.workdir import trainer_argv

EXIT_PAUSED = 75


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("template")
    settings = Settings(home=home / "home", trainer_template=True, trainer_template_at_start=True)
    t = TrainerTemplate()
    t.start(settings)
    assert t.current is not None and t.current.ready.wait(300) and not t.current.gone.is_set(), t.current.error
    yield t, settings
    t.close()
    t.current = None


def _start(template, make_spec, tmp_path: Path, name: str, method: str = "lora", **hp) -> TrainerProcess:
    t, settings = template
    spec = make_spec(method, hyperparameters={"batch_size": 2, "max_seq_len": 32, **hp})
    out = tmp_path / name
    out.mkdir()
    (out / "spec.json").write_text(spec.model_dump_json())
    return TrainerProcess(trainer_argv(settings, out / "spec.json", out, False), cwd=out, log_path=out / "trainer.log",
                          env=dict(t.env), template=t)


def _metrics(out: Path) -> bool:
    return any(e["type"] == "metrics" for e in read_events(out / "events.jsonl"))


def test_a_job_is_forked_from_the_template_and_its_exit_codes_come_back(template, make_spec, tmp_path: Path) -> None:
    """The trainer is the template's child, in a session of its own, found by its work directory;
    it imported nothing (its startup event's import phase is the fork's, the detail says forked).
    Its exit code reaches the worker through the template: 0, the trainer's own error code, the
    pause code, and a kill."""
    t, _ = template
    proc = _start(template, make_spec, tmp_path, "done", max_steps=3)
    assert proc.forked and proc.standby
    assert _parent(proc.pid) == t.current.popen.pid and os.getpgid(proc.pid) == proc.pid
    out = tmp_path / "done"
    _wait_for(lambda: proc.pid in trainer_pids(out), 30, "the forked trainer in its work directory")
    assert proc.wait(300) and proc.returncode == 0, (out / "trainer.log").read_text()[-3000:]
    [startup] = [e["data"] for e in read_events(out / "events.jsonl") if e["type"] == "startup"]
    assert startup["detail"]["forked"] is True and startup["detail"]["standby_import"] > 1.0, startup
    assert startup["phases"]["import"] < 1.0, startup
    assert "bitsandbytes" in startup["detail"]["skipped_libraries"], startup
    assert (out / "final" / "manifest.json").is_file()

    # The trainer's own error: a training file that is not there is a usage error (exit 2).
    _, settings = template
    spec = make_spec("lora", training_file=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spec.json").write_text(spec.model_dump_json())
    proc = TrainerProcess(trainer_argv(settings, bad / "spec.json", bad, False), cwd=bad, log_path=bad / "trainer.log",
                          env=dict(t.env), template=t)
    assert proc.forked and proc.wait(60) and proc.returncode == 2, (bad / "trainer.log").read_text()[-2000:]

    # A pause: the checkpoint, then the pause code.
    proc = _start(template, make_spec, tmp_path, "paused", max_steps=100_000)
    paused = tmp_path / "paused"
    assert proc.forked
    _wait_for(lambda: _metrics(paused), 120, "a first step")
    proc.ask_pause()
    assert proc.wait(120) and proc.returncode == EXIT_PAUSED, (paused / "trainer.log").read_text()[-3000:]

    # Killed: the signal, as Popen reports it.
    proc = _start(template, make_spec, tmp_path, "killed", max_steps=100_000)
    assert proc.forked
    _wait_for(lambda: _metrics(tmp_path / "killed"), 120, "a first step")
    proc.kill()
    assert proc.returncode == -signal.SIGKILL and proc.finished()


def test_a_job_that_needs_bitsandbytes_is_not_forked(template, make_spec, tmp_path: Path) -> None:
    spec = tmp_path / "qlora.json"
    spec.write_text(make_spec("qlora").model_dump_json())
    assert needs_bitsandbytes(spec) is True
    lora = tmp_path / "lora.json"
    lora.write_text(make_spec("lora").model_dump_json())
    assert needs_bitsandbytes(lora) is False
    t, _ = template
    out = tmp_path / "out"
    out.mkdir()
    assert t.take(dict(t.env), ["run", str(spec), "--out", str(out)], out, out / "trainer.log") is None


def test_a_job_that_cannot_use_the_template_does_not_start_one(make_spec, tmp_path: Path) -> None:
    """A worker whose template starts with its first job starts none for a QLoRA job, or for a job
    whose environment the template's imports would not match: either would start fresh anyway."""
    t = TrainerTemplate()
    t.start(Settings(home=tmp_path / "home", trainer_template=True, trainer_template_at_start=False))
    spawned: list[int] = []
    t.spawn = lambda: spawned.append(1)  # type: ignore[method-assign]
    out = tmp_path / "out"
    out.mkdir()
    qlora, lora = out / "qlora.json", out / "lora.json"
    qlora.write_text(make_spec("qlora").model_dump_json())
    lora.write_text(make_spec("lora").model_dump_json())
    assert t.take(dict(t.env), ["run", str(qlora)], out, out / "trainer.log") is None
    assert t.take({**t.env, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}, ["run", str(lora)], out, out / "log") is None
    assert spawned == [] and t.current is None
    # A job that may use it does start it (here a stub that never comes up: the job starts fresh).
    assert t.take(dict(t.env), ["run", str(lora)], out, out / "trainer.log") is None
    assert spawned == [1]


def test_a_dead_template_takes_its_trainers_along_and_the_next_job_starts_fresh(template, make_spec,
                                                                                  tmp_path: Path) -> None:
    t, _ = template
    proc = _start(template, make_spec, tmp_path, "running", max_steps=100_000)
    assert proc.forked
    first = t.current
    os.kill(first.popen.pid, signal.SIGKILL)
    # Its child dies with it, and the handle says so without the template to report it.
    assert proc.wait(30) and proc.returncode == -signal.SIGKILL
    _wait_for(first.gone.is_set, 30, "the worker to see the template gone")
    fresh = _start(template, make_spec, tmp_path, "fresh", max_steps=100_000)
    try:
        assert not fresh.forked and not fresh.standby and _parent(fresh.pid) == os.getpid()
    finally:
        fresh.kill()
    # The next template is on its way for the jobs after.
    assert t.current is not first and t.current.ready.wait(300) and not t.current.gone.is_set()
    again = _start(template, make_spec, tmp_path, "again", max_steps=2)
    assert again.forked and again.wait(300) and again.returncode == 0


def _ended_template(error: str | None):
    """What the worker sees of a template that ended before it was ready."""
    import threading
    import types

    gone = threading.Event()
    gone.set()
    return types.SimpleNamespace(gone=gone, was_ready=False, error=error, popen=types.SimpleNamespace(pid=1))


@pytest.mark.parametrize("error, started_again", [("the CUDA driver library is loaded", False), (None, True)])
def test_a_template_that_refused_is_not_started_again_but_a_crashed_one_is(tmp_path: Path, error, started_again) -> None:
    t = TrainerTemplate()
    t.root = tmp_path
    t.current = _ended_template(error)
    spawned: list[int] = []
    t.spawn = lambda: spawned.append(1)  # type: ignore[method-assign]
    assert t.running() is None
    assert bool(spawned) is started_again and (t.root is not None) is started_again


def test_fork_hazard_names_threads_but_those_that_survive_a_fork() -> None:
    """A second thread of ours is a hazard (its locks stay held in the child); jemalloc's purging
    thread, which a CUDA host's imports start, is not. Run in a process of its own: this one has
    pytest's threads."""
    import subprocess
    import sys

    code = ("import ctypes, threading, time\n"
            "from trainer.template import fork_hazard\n"
            "print(fork_hazard())\n"
            "def named(name):\n"
            "    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)\n"  # PR_SET_NAME, as jemalloc names its thread
            "    time.sleep(30)\n"
            "threading.Thread(target=named, args=('jemalloc_bg_thd',), daemon=True).start(); time.sleep(0.3)\n"
            "print(fork_hazard())\n"
            "threading.Thread(target=named, args=('other',), daemon=True).start(); time.sleep(0.3)\n"
            "print(fork_hazard())\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines == ["None", "None", "the template runs threads besides its own: other"], (out.stdout, out.stderr[-2000:])


def test_the_template_leaves_liger_to_its_children_and_a_standby_imports_it(tmp_path: Path) -> None:
    """liger's op modules initialise CUDA at import, after which no forked child could use the GPU:
    the template's imports leave it out (its children import it with their job), a standby's
    include it. A stand-in liger records its import."""
    import subprocess
    import sys

    package = tmp_path / "liger_kernel" / "transformers"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("def apply_liger_kernel_to_llama(**kw): pass\n")
    (package / "monkey_patch.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path.cwd())])}
    code = ("import sys\n"
            "from trainer.template import Template, fork_hazard\n"
            "Template(1).import_all()\n"
            "print('liger_kernel.transformers' in sys.modules, fork_hazard())\n"
            "from trainer.standby import preload\n"
            "preload()\n"
            "print('liger_kernel.transformers.monkey_patch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.stdout.strip().splitlines()[-2:] == ["False None", "True"], (out.stdout, out.stderr[-2000:])
