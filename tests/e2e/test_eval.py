"""An eval block through the whole service: scores on every stored checkpoint, the best one kept
from the store's rotation, and its weights as the job's adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.datasets import WORDS
from tests.e2e.conftest import Stack, dump_logs, reverse_dataset
from tests.e2e.test_whole_path import TERMINAL, all_events, download_archive, upload, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_best_checkpoint_is_the_jobs_adapter(stack: Stack, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    words = WORDS[:4]
    evals = "".join(json.dumps({"messages": [{"role": "user", "content": f"Reverse: {w}"}], "expected": w[::-1]}) + "\n"
                    for w in words)
    with stack.client() as c:
        train, eval_file = upload(c, reverse_dataset(32, seed=1)), upload(c, evals, "eval.jsonl")
        assert eval_file["validation"]["format"] == "eval", eval_file
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": train["id"], "method": {"type": "lora", "lora": {"r": 8}},
            "hyperparameters": {"max_steps": 8, "batch_size": 4, "learning_rate": 0.003, "max_seq_len": 64},
            "schedule": {"checkpoint_every_steps": 2, "keep_checkpoints": 1},
            "eval": {"file": eval_file["id"], "max_new_tokens": 6, "graders": [{"type": "similarity"}]},
            "export": {"select": "best"},
        })
        assert r.status_code == 200, r.text
        job = wait_for(stack, r.json()["id"], TERMINAL)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(stack)}"
        passes = {e["data"]["step"]: e["data"]["eval_similarity"] for e in all_events(c, job["id"]) if e["kind"] == "eval"}
        assert sorted(passes) == [2, 4, 6, 8]
        best = min(s for s, v in passes.items() if v == max(passes.values()))
        assert job["metrics"]["exported_step"] == best and job["metrics"]["export_metric"] == "eval_similarity"
        assert job["metrics"]["eval_similarity"] == passes[best]
        listed = {ck["step_number"]: ck["metrics"] for ck in
                  c.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]}
        # keep_checkpoints 1: the newest, and the best besides it.
        assert set(listed) == {8, best} and listed[best]["eval_similarity"] == passes[best]
        final = download_archive(c, job["id"], "adapter.tar.gz", tmp_path / "final")
        ck = download_archive(c, job["id"], f"checkpoints/step-{best:08d}.tar.gz", tmp_path / "ck")
    a = load_file(str(next(final.rglob("adapter_model.safetensors"))))
    b = load_file(str(next(ck.rglob("adapter_model.safetensors"))))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
