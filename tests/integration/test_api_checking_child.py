"""The API's checking child (api.validation) ends with the API process, even one killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.watchdog import alive

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for an API process: it makes its checking child the way the API does, prints the
# child's pid, and waits to be killed.
PARENT = """
import os, sys, time
from api.validation import run_in_child
print(run_in_child(os.getpid), flush=True)
time.sleep(600)
"""


def test_the_checking_child_ends_when_its_api_process_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        assert child != parent.pid and alive(child)
        time.sleep(1.5)  # the child outlives a poll of its watch while the parent lives
        assert alive(child)
        parent.send_signal(signal.SIGKILL)  # no shutdown runs: nothing tells the child
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(child), "the checking child outlived its API process"
    finally:
        parent.kill()
        parent.wait(timeout=10)
