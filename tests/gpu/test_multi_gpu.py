"""Two GPUs, the worker's launch command: DDP for LoRA, FSDP2 for full fine-tuning with resume.

Marked `gpu` and skipped below two GPUs: run on nvidia-h200-x2 with
`python3 -m pytest -m gpu tests/gpu/test_multi_gpu.py` (about two minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.datasets import reverse_dataset
from trainer.events import read_events

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


def launch(spec: dict, out: Path, resume: bool = False) -> list[dict]:
    from core.settings import Settings
    from worker.workdir import trainer_argv, trainer_env

    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    argv = trainer_argv(Settings(accelerate_launch=True), out / "spec.json", out, resume, num_processes=2)
    env = {**trainer_env(Settings()), "CUDA_VISIBLE_DEVICES": "0,1"}
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return read_events(out / "events.jsonl")


def body(model: Path, data: Path, method: str, **extra) -> dict:
    return {"model": str(model), "method": method, "training_file": str(data), "precision": "bf16",
            "hyperparameters": {"max_steps": 6, "batch_size": 4, "max_seq_len": 64, "learning_rate": 1e-3,
                                "warmup_steps": 0},
            "schedule": {"log_every_steps": 1, "checkpoint_every_steps": 3}, **extra}


def test_lora_runs_ddp_on_two_gpus_with_one_set_of_events(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(reverse_dataset(64, seed=1))
    events = launch(body(tiny_model_dir, data, "lora", lora={"r": 8, "alpha": 16}), tmp_path / "out")
    kinds = [e["type"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("metrics") == 6 and kinds[-1] == "finished"
    assert all(e["data"]["peak_memory_bytes"] for e in events if e["type"] == "metrics")
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_shards_with_fsdp_resumes_and_exports(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = tmp_path / "train.jsonl"
    data.write_text(reverse_dataset(64, seed=1))
    spec = body(tiny_model_dir, data, "full", strategy="fsdp", gradient_checkpointing=True)
    whole = launch(spec, tmp_path / "whole")
    losses = [e["data"]["train_loss"] for e in whole if e["type"] == "metrics"]
    assert len(losses) == 6 and all(x == x for x in losses)

    # Resume from the step-3 checkpoint in a fresh directory: the same losses for steps 4..6.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-00000003", part / "checkpoints" / "step-00000003")
    resumed = launch(spec, part, resume=True)
    start = next(e["data"] for e in resumed if e["type"] == "start")
    assert start["resumed_from_step"] == 3
    again = [e["data"]["train_loss"] for e in resumed if e["type"] == "metrics"]
    assert again == pytest.approx(losses[3:], rel=2e-2)

    # The export is one whole bf16 model written by rank 0, loadable without FSDP.
    final = tmp_path / "whole" / "final"
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert any(not torch.equal(a.float(), b.float()) for a, b in zip(model.parameters(), reference.parameters()))
    assert os.path.getsize(final / "model.safetensors") > 0
