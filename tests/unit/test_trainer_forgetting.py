"""The forgetting figures' "before" is the model as training starts, not the base model.

Prefix tuning starts with random virtual tokens and a continued job from its parent's weights; in
both the base model's loss would credit or blame the run with a change it did not make. A run
whose learning rate moves nothing must therefore report no change, and a continued job's
"before" must be its parent's "after".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.conftest import chat_rows, write_jsonl
from trainer.events import read_events
from trainer.job import run_job
from trainer.spec import JobSpec
from trainer.tiny import CORPUS


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("forgetting")
    general = [{"text": line} for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()][:8]
    return {"train": str(write_jsonl(root / "train.jsonl", chat_rows(16))),
            "general": str(write_jsonl(root / "general.jsonl", general))}


def forgetting(tiny_model_dir: Path, files: dict[str, str], out: Path, method: str, lr: float, **top) -> dict:
    spec = JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": method, "training_file": files["train"],
        "forgetting_file": files["general"], **top,
        "hyperparameters": {"max_steps": 4, "batch_size": 4, "max_seq_len": 64, "learning_rate": lr, "warmup_steps": 0},
    })
    assert run_job(spec, out) == 0
    return next(e["data"] for e in read_events(out / "events.jsonl") if e["type"] == "forgetting")


def base_loss(tiny_model_dir: Path, path: str) -> float:
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.dataset import load_tokenized
    from trainer.evaluate import evaluate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = load_tokenized(path, tok, 64).examples
    return evaluate(model, examples, 4, tok.pad_token_id, Accelerator(cpu=True), "f")["f_loss"]


def test_prefix_tuning_measures_before_with_its_starting_prefix(tiny_model_dir, files, tmp_path) -> None:
    got = forgetting(tiny_model_dir, files, tmp_path / "prefix", "prefix", 1e-9)
    assert got["before"]["loss"] == pytest.approx(got["after"]["loss"], abs=1e-4)
    assert got["forgetting_loss_increase"] == pytest.approx(0.0, abs=1e-4)
    # The random prefix does change the loss: the base model's figure would be another number.
    assert abs(got["before"]["loss"] - base_loss(tiny_model_dir, files["general"])) > 1e-2


def test_a_continued_job_starts_from_its_parents_after(tiny_model_dir, files, tmp_path) -> None:
    parent = forgetting(tiny_model_dir, files, tmp_path / "parent", "lora", 3e-2)
    assert abs(parent["forgetting_loss_increase"]) > 1e-2  # the parent did move the model
    child = forgetting(tiny_model_dir, files, tmp_path / "child", "lora", 1e-9, init_from=str(tmp_path / "parent" / "final"))
    assert child["before"]["loss"] == pytest.approx(parent["after"]["loss"], abs=1e-4)
    assert child["forgetting_loss_increase"] == pytest.approx(0.0, abs=1e-4)
