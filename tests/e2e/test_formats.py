"""Every data format trains through the API; mixing, packing and forgetting reach the job; a job
the data cannot train is refused before it reaches a worker."""

from __future__ import annotations

import json
import random

import pytest

from tests.datasets import WORDS
from tests.e2e.conftest import Stack, dump_logs
from tests.e2e.test_whole_path import TERMINAL, all_events, train_losses, upload, wait_for
from trainer.tiny import CORPUS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def rows(fmt: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = rng.choice(WORDS)
        out.append({
            "chat": {"messages": [{"role": "user", "content": f"Reverse: {w}"}, {"role": "assistant", "content": w[::-1]}]},
            "alpaca": {"instruction": "Reverse the word.", "input": w, "output": w[::-1]},
            "prompt_completion": {"prompt": f"{w} backwards is", "completion": f" {w[::-1]}"},
            "text": {"text": f"The word {w} spelled backwards is {w[::-1]}."},
        }[fmt])
    return out


def jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in items)


def corpus_text(part: int) -> str:
    paragraphs = [p.strip() for p in CORPUS.read_text(encoding="utf-8").split("\n") if p.strip()]
    half = len(paragraphs) // 2
    return jsonl([{"text": p} for p in (paragraphs[:half] if part == 0 else paragraphs[half:])])


HP = {"max_steps": 12, "batch_size": 8, "learning_rate": 3e-3, "max_seq_len": 64, "warmup_steps": 1}


def test_each_format_trains_through_the_api(stack: Stack) -> None:
    jobs = {}
    with stack.client() as c:
        for fmt in ("chat", "alpaca", "prompt_completion", "text"):
            train = upload(c, jsonl(rows(fmt, 48, 1)), f"{fmt}.jsonl")
            valid = upload(c, jsonl(rows(fmt, 8, 2)), f"{fmt}-valid.jsonl")
            assert train["status"] == "processed" and train["validation"]["format"] == fmt, train
            r = c.post("/v1/fine_tuning/jobs", json={
                "model": "tiny-llama", "training_file": train["id"], "validation_file": valid["id"],
                "method": "lora", "hyperparameters": HP, "data_format": fmt,
            })
            assert r.status_code == 200, r.text
            jobs[fmt] = r.json()["id"]
        for fmt, job_id in jobs.items():
            job = wait_for(stack, job_id, TERMINAL)
            assert job["status"] == "succeeded", f"{fmt}: {job}\n{dump_logs(stack)}"
            events = all_events(c, job_id)
            check = next(e for e in events if e["kind"] == "data_check")["data"]["training_file"]
            assert check["format"] == fmt and check["examples"] == 48 and check["tokens"] > check["trained_tokens"] > 0
            start = next(e for e in events if e["kind"] == "start")["data"]
            assert start["data_format"] == fmt
            losses = train_losses(events)
            assert len(losses) == HP["max_steps"] and losses[-1] < losses[0], (fmt, losses)
            assert {"full_valid_loss", "full_valid_mean_token_accuracy", "valid_loss"} <= set(job["metrics"]), job["metrics"]


def test_mix_packing_and_forgetting_through_the_api(stack: Stack) -> None:
    with stack.client() as c:
        train = upload(c, jsonl(rows("chat", 64, 3)))
        valid = upload(c, jsonl(rows("chat", 8, 4)), "valid.jsonl")
        replay = upload(c, corpus_text(0), "replay.jsonl")
        general = upload(c, corpus_text(1), "general.jsonl")
        assert replay["validation"]["format"] == "text"
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": train["id"], "validation_file": valid["id"], "method": "full",
            "hyperparameters": {**HP, "learning_rate": 1e-3}, "packing": True,
            "mix": [{"file": replay["id"], "weight": 0.5}], "forgetting_file": general["id"],
        })
        assert r.status_code == 200, r.text
        job = wait_for(stack, r.json()["id"], TERMINAL)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(stack)}"
        events = all_events(c, job["id"])
    start = next(e for e in events if e["kind"] == "start")["data"]
    assert start["mixed_examples"] == [32] and start["packed_rows"] < start["examples"] + 32
    forgetting = next(e for e in events if e["kind"] == "forgetting")["data"]
    metrics = job["metrics"]
    for key in ("forgetting_loss_before", "forgetting_loss_after", "forgetting_perplexity_before",
                "forgetting_perplexity_after", "forgetting_loss_increase"):
        assert metrics[key] == pytest.approx(forgetting[key]), key
    assert metrics["forgetting_loss_before"] > 0 and metrics["forgetting_perplexity_after"] > 1


def test_jobs_the_data_cannot_train_are_refused(stack: Stack) -> None:
    with stack.client() as c:
        bad = c.post("/v1/files", files={"file": ("bad.jsonl", b'{"instruction": "x", "output": ""}\nnot json\n', "application/jsonl")},
                     data={"purpose": "fine-tune"}).json()
        assert bad["status"] == "error"
        assert [(e["line"], e["code"]) for e in bad["validation"]["errors"]] == [(1, "empty_content"), (2, "invalid_json")]
        chat = upload(c, jsonl(rows("chat", 8, 5)))
        long_prompts = upload(c, jsonl([{"prompt": "word " * 80, "completion": " end"}] * 4), "long.jsonl")
        cases = [
            ({"training_file": bad["id"]}, "training_file", "invalid_file"),
            ({"training_file": chat["id"], "data_format": "alpaca"}, "training_file", "invalid_file"),
            ({"training_file": long_prompts["id"]}, "training_file", "examples_truncated_away"),
            ({"training_file": chat["id"], "mix": [{"file": "file-nope", "weight": 1}]}, "mix[0].file", "file_not_found"),
            ({"training_file": chat["id"], "forgetting_file": bad["id"]}, "forgetting_file", "invalid_file"),
            ({"training_file": chat["id"], "mix": [{"file": chat["id"], "weight": 0}]}, None, "invalid_value"),
        ]
        for extra, param, code in cases:
            r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "method": "lora",
                                                     "hyperparameters": {"max_seq_len": 32}, **extra})
            assert r.status_code == 400, (extra, r.text)
            err = r.json()["error"]
            assert err["code"] == code and (param is None or err["param"] == param), (extra, err)
        assert c.get("/v1/fine_tuning/jobs").json()["data"] == []
