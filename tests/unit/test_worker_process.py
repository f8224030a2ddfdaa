"""worker.process.TrainerProcess's pause channels, with a stand-in process that ignores SIGUSR1."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from trainer.signals import PAUSE_FILE
from worker.process import TrainerProcess

# Ignores SIGUSR1 (as a trainer whose signal was lost would) and exits 75 once the pause file is there.
WAITS_FOR_THE_FILE = f"""
import pathlib, signal, sys, time
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
while not pathlib.Path({PAUSE_FILE!r}).exists():
    time.sleep(0.05)
sys.exit(75)
"""


def test_ask_pause_reaches_a_trainer_that_ignores_sigusr1(tmp_path: Path):
    proc = TrainerProcess([sys.executable, "-c", WAITS_FOR_THE_FILE], cwd=tmp_path, log_path=tmp_path / "log",
                          env={"PATH": "/usr/bin:/bin"})
    time.sleep(0.3)
    assert not proc.finished()
    proc.ask_pause()
    assert proc.wait(10), "the process did not see the pause file"
    assert proc.returncode == 75


def test_a_new_run_does_not_inherit_the_last_runs_pause_request(tmp_path: Path):
    (tmp_path / PAUSE_FILE).touch()
    proc = TrainerProcess([sys.executable, "-c", "import time; time.sleep(0.2)"], cwd=tmp_path,
                          log_path=tmp_path / "log", env={"PATH": "/usr/bin:/bin"})
    assert not (tmp_path / PAUSE_FILE).exists()
    assert proc.wait(10) and proc.returncode == 0
