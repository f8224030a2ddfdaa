"""The trainer template on a CUDA host: a CUDA build's imports load the driver library without
initialising the driver, so the template forks there too, and its children train on the GPU.

Marked `gpu`: `make test` deselects them (CI has no GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.datasets import reverse_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[2]


def test_loaded_is_not_initialised_and_a_device_count_initialises() -> None:
    """The check itself, in a process of its own (this one initialised CUDA long ago)."""
    code = ("import torch\n"
            "from trainer.template import cuda_driver_initialised, fork_hazard\n"
            "maps = open('/proc/self/maps').read()\n"
            "print('/libcuda.so' in maps, cuda_driver_initialised(), 'CUDA' in str(fork_hazard()))\n"
            "torch.cuda.is_available()\n"
            "print(cuda_driver_initialised(), fork_hazard())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = out.stdout.strip().splitlines()[-2:]
    # Whether this build maps the driver at import or not, importing torch initialised nothing.
    assert first.split(" ")[1:] == ["False", "False"], out.stdout
    assert second == "True the CUDA driver is initialised", out.stdout


def test_liger_initialises_cuda_at_import_so_the_template_leaves_it_out() -> None:
    """Why the template does not import liger: its op modules initialise the driver at import, after
    which the template refuses every job. Should a liger release stop doing so, the first line
    changes, and the template can import it again (trainer.standby.preload)."""
    pytest.importorskip("liger_kernel")
    code = ("import sys\n"
            "from trainer.template import Template, cuda_driver_initialised, fork_hazard\n"
            "Template(1).import_all()\n"
            "print('liger_kernel.transformers' in sys.modules, fork_hazard())\n"
            "from trainer.fastpath import liger_module\n"
            "print(liger_module() is not None, cuda_driver_initialised())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-2:] == ["False None", "True True"], (out.stdout, out.stderr[-3000:])


def test_a_job_forked_from_the_template_trains_on_the_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    from core.settings import Settings
    from trainer.events import read_events
    from trainer.spec import JobSpec
    from worker.process import TrainerProcess
    from worker.template import TrainerTemplate
    from worker.workdir import trainer_argv

    settings = Settings(home=tmp_path / "home", trainer_template=True, trainer_template_at_start=True)
    template = TrainerTemplate()
    template.start(settings)
    try:
        current = template.current
        assert current is not None and current.ready.wait(300), "the template did not get ready"
        assert not current.gone.is_set(), f"the template refused: {current.error}"
        data = tmp_path / "train.jsonl"
        data.write_text(reverse_dataset(64, seed=1))
        spec = JobSpec.model_validate({
            "model": str(tiny_model_dir), "method": "lora", "training_file": str(data),
            "hyperparameters": {"max_steps": 4, "batch_size": 8, "learning_rate": 3e-3}})
        out = tmp_path / "job"
        out.mkdir()
        (out / "spec.json").write_text(spec.model_dump_json())
        proc = TrainerProcess(trainer_argv(settings, out / "spec.json", out, False), cwd=out,
                              log_path=out / "trainer.log", env=dict(template.env), template=template)
        assert proc.forked, "the template did not take the job"
        assert proc.wait(300) and proc.returncode == 0, (out / "trainer.log").read_text()[-3000:]
    finally:
        template.close()
    events = read_events(out / "events.jsonl")
    [startup] = [e["data"] for e in events if e["type"] == "startup"]
    [start] = [e["data"] for e in events if e["type"] == "start"]
    assert startup["detail"]["forked"] is True, startup
    assert start["precision"] == "bf16" and start["device"] == torch.cuda.get_device_name(0), start
    assert any(e["type"] == "finished" for e in events)
