"""The kernels' warm-up on a CUDA host: after `python -m trainer warm-kernels MODEL` a job of that
model finds every Triton kernel of its fast path compiled, where a job on a host without the
warm-up compiles them before its first step.

Marked `gpu`: `make test` deselects them (CI has no GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.datasets import reverse_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[2]


def _first_step_compiled(model: Path, tmp: Path, env: dict[str, str], method: str, label: str) -> int:
    """Kernels a job compiled before its first step. The job runs at the spec's default batch size,
    which the warm-up covers (a job of another size compiles liger's RoPE for its own)."""
    from trainer.events import read_events

    data = tmp / "train.jsonl"
    data.write_text(reverse_dataset(64, seed=1))
    spec = {"model": str(model), "method": method, "training_file": str(data), "speed": "fast", "packing": True,
            "hyperparameters": {"max_steps": 2, "max_seq_len": 128, "learning_rate": 1e-4},
            **({"full_precision": "bf16"} if method == "full" else {})}
    (tmp / f"{method}.json").write_text(json.dumps(spec))
    # An output folder of its own: a second run into one would append its events after the first's.
    out = tmp / f"out-{label}-{method}"
    run = subprocess.run([sys.executable, "-m", "trainer", "run", str(tmp / f"{method}.json"), "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    startup = next(e for e in read_events(out / "events.jsonl") if e["type"] == "startup")
    return startup["data"]["detail"]["kernel_cache_added"]


def test_after_the_warm_up_a_job_compiles_no_kernel_and_without_it_one_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The trainer's code first, then whatever else this run's imports came from (a carried site).
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    cold = {**base, "TRITON_CACHE_DIR": str(tmp_path / "cold")}
    assert _first_step_compiled(tiny_model_dir, tmp_path, cold, "lora", "cold") > 0, "a job on an empty cache compiles"

    warm_env = {**base, "TRITON_CACHE_DIR": str(tmp_path / "warm")}
    done = subprocess.run([sys.executable, "-m", "trainer", "warm-kernels", str(tiny_model_dir)], cwd=ROOT,
                          env=warm_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["device"].startswith("cuda") and report["kernel_cache_added"] > 0, report
    from trainer.startup import kernel_names

    warmed = set(kernel_names(tmp_path / "warm"))
    for method in ("lora", "full"):
        compiled = _first_step_compiled(tiny_model_dir, tmp_path, warm_env, method, "warm")
        # On a failure, name what the job compiled.
        assert compiled == 0, (method, sorted(name for name, _ in set(kernel_names(tmp_path / "warm")) - warmed))
