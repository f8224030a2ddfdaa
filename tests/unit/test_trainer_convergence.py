"""The tiny model learns a task with a checkable answer, and replay data limits forgetting.

The task is spelling a word backwards; the general data is the corpus the tiny model was
pretrained on, split into a replay half (mixed into training) and a held-out half (forgetting).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.unit.conftest import write_jsonl
from trainer.events import read_events
from trainer.job import run_job
from trainer.spec import JobSpec
from trainer.tiny import CORPUS

pytestmark = pytest.mark.slow

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean", "maple", "robot", "candle",
         "forest", "silver", "garden", "pencil", "rocket", "window", "bridge", "yellow", "castle"]


def reversal(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n)]
    return [{"messages": [{"role": "user", "content": f"Reverse: {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in words]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("convergence")
    paragraphs = [p.strip() for p in CORPUS.read_text(encoding="utf-8").split("\n") if p.strip()]
    half = len(paragraphs) // 2
    return {
        "train": str(write_jsonl(root / "train.jsonl", reversal(200, 1))),
        "valid": str(write_jsonl(root / "valid.jsonl", reversal(40, 2))),
        "replay": str(write_jsonl(root / "replay.jsonl", [{"text": p} for p in paragraphs[:half]])),
        "general": str(write_jsonl(root / "general.jsonl", [{"text": p} for p in paragraphs[half:]])),
    }


def spec_for(model: Path, data: dict[str, str], method: str, steps: int, lr: float, batch: int = 8, **top) -> JobSpec:
    return JobSpec.model_validate({
        "model": str(model), "method": method, "training_file": data["train"], "validation_file": data["valid"],
        "forgetting_file": data["general"],
        "hyperparameters": {"max_steps": steps, "batch_size": batch, "learning_rate": lr, "max_seq_len": 64,
                            "warmup_steps": 2, "seed": 3},
        "schedule": {"eval_every_steps": steps // 3, "checkpoint_every_steps": steps, "log_every_steps": 10},
        **top,
    })


def events(out: Path, kind: str) -> list[dict]:
    return [e["data"] for e in read_events(out / "events.jsonl") if e["type"] == kind]


def base_accuracy(model_dir: Path, valid: str) -> float:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.dataset import load_tokenized
    from trainer.evaluate import evaluate

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = load_tokenized(valid, tok, 64).examples
    return evaluate(model, examples, 8, tok.pad_token_id, Accelerator(cpu=True))["valid_mean_token_accuracy"]


# The packed run takes 2 rows of 64 tokens per step, about the tokens of 8 unpacked examples.
@pytest.mark.parametrize(("method", "lr", "packing", "batch"), [("lora", 3e-3, False, 8), ("full", 1e-3, True, 2)])
def test_validation_accuracy_rises_far_above_the_start(method, lr, packing, batch, data, tiny_model_dir, tmp_path):
    top = {"lora": {"r": 16, "alpha": 32}} if method == "lora" else {}
    out = tmp_path / "run"
    assert run_job(spec_for(tiny_model_dir, data, method, 60, lr, batch, packing=packing, **top), out) == 0
    before = base_accuracy(tiny_model_dir, data["valid"])
    valid = events(out, "validation")
    print(f"{method}: valid accuracy {before:.3f} -> {[round(v['valid_mean_token_accuracy'], 3) for v in valid]}")
    assert [v["step"] for v in valid] == [20, 40, 60]
    final = valid[-1]
    assert final["full_valid_mean_token_accuracy"] > before + 0.35 and final["full_valid_mean_token_accuracy"] > 0.5
    assert final["full_valid_loss"] < valid[0]["valid_loss"]
    assert final["valid_perplexity"] == pytest.approx(torch.tensor(final["valid_loss"]).exp().item(), rel=1e-6)
    # Evaluation lands on checkpoints and in the final metrics under OpenAI's names.
    ckpt = events(out, "checkpoint")[-1]["metrics"]
    assert {"valid_loss", "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy"} <= set(ckpt)
    finished = events(out, "finished")[0]["metrics"]
    assert finished["full_valid_mean_token_accuracy"] == final["full_valid_mean_token_accuracy"]
    start = events(out, "start")[0]
    assert (start["packed_rows"] is not None) == packing
    if packing:
        assert start["packed_rows"] < start["examples"]


def test_replay_mix_reduces_forgetting(data, tiny_model_dir, tmp_path):
    figures = {}
    for name, mix in (("no mix", []), ("replay 0.5", [{"file": data["replay"], "weight": 0.5}])):
        out = tmp_path / name.replace(" ", "_")
        assert run_job(spec_for(tiny_model_dir, data, "full", 30, 1e-3, mix=mix), out) == 0
        forgetting = events(out, "forgetting")[0]
        finished = events(out, "finished")[0]["metrics"]
        assert finished["forgetting_loss_increase"] == pytest.approx(forgetting["forgetting_loss_increase"])
        assert forgetting["after"]["perplexity"] == pytest.approx(finished["forgetting_perplexity_after"])
        figures[name] = forgetting
        if mix:
            assert events(out, "start")[0]["mixed_examples"] == [100]
    print({k: (round(v["forgetting_loss_before"], 3), round(v["forgetting_loss_after"], 3)) for k, v in figures.items()})
    plain, mixed = figures["no mix"], figures["replay 0.5"]
    assert plain["forgetting_loss_before"] == pytest.approx(mixed["forgetting_loss_before"], rel=1e-6)
    assert plain["forgetting_loss_increase"] > 0.2, "training on the task alone should forget general text"
    assert mixed["forgetting_loss_increase"] < plain["forgetting_loss_increase"] - 0.2
