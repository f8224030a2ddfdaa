"""trainer.watchdog: a trainer whose supervisor dies stops by itself (no other worker needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from trainer.watchdog import SUPERVISOR_ENV

# Stands in for a trainer: starts the watchdog as `python -m trainer run` does, then "trains".
TRAINER = "import time; from trainer.watchdog import watch_supervisor; watch_supervisor(0.05); time.sleep(60)"


def start(supervisor: int | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != SUPERVISOR_ENV}
    if supervisor is not None:
        env[SUPERVISOR_ENV] = str(supervisor)
    return subprocess.Popen([sys.executable, "-c", TRAINER], env=env, start_new_session=True)


def test_the_trainer_kills_itself_once_its_supervisor_is_gone():
    supervisor = subprocess.Popen(["sleep", "60"])
    trainer = start(supervisor.pid)
    try:
        time.sleep(1.0)
        assert trainer.poll() is None, "the trainer stopped while its supervisor was alive"
        # SIGKILL, and left unreaped a while: a zombie supervisor counts as gone.
        supervisor.kill()
        assert trainer.wait(10) == -signal.SIGKILL
    finally:
        supervisor.kill()
        supervisor.wait()
        trainer.kill()
        trainer.wait()


def test_without_a_supervisor_named_there_is_no_watchdog():
    trainer = start(None)
    try:
        time.sleep(1.0)
        assert trainer.poll() is None
    finally:
        trainer.kill()
        trainer.wait()
