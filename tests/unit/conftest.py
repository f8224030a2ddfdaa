"""Fixtures of the trainer's unit tests: small chat datasets and job specs for the tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

QA = [
    ("What is two plus two?", "Two plus two is four."),
    ("Name a colour of the rainbow.", "Green is a colour of the rainbow, and so is violet."),
    ("What comes after Monday?", "Tuesday."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("When do the leaves fall?", "In autumn the leaves turn red and gold and fall from the trees."),
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def chat_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You answer briefly."})
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    return {
        "train": write_jsonl(root / "train.jsonl", chat_rows(48)),
        "valid": write_jsonl(root / "valid.jsonl", chat_rows(6)),
    }


@pytest.fixture
def make_spec(tiny_model_dir: Path, chat_files: dict[str, Path]):
    """A JobSpec for the tiny model; keyword groups override the defaults of a fast CPU run."""
    from trainer.spec import JobSpec

    def make(method: str = "lora", hyperparameters: dict | None = None, schedule: dict | None = None, **top: Any) -> JobSpec:
        hp = {"max_steps": 20, "batch_size": 4, "learning_rate": 3e-3, "max_seq_len": 64, "warmup_steps": 2}
        hp.update(hyperparameters or {})
        spec: dict[str, Any] = {
            "model": str(tiny_model_dir),
            "method": method,
            "training_file": str(chat_files["train"]),
            "hyperparameters": hp,
            "schedule": {"log_every_steps": 1, **(schedule or {})},
        }
        spec.update(top)
        return JobSpec.model_validate(spec)

    return make
