"""A full fine-tuning whose model takes longer to publish than the lease lasts, through the
whole stack (API and worker processes): it must succeed after one trainer run, and its model
download and load.

The model is a 32M-parameter Llama (hidden 384, 4 layers, a 32,000-token vocabulary; 128 MB of
weights in fp32), the smallest that showed the bug here with the lease TTL lowered to 1.5 s:
publishing it the earlier way (a copy of every file and a gzip archive) took several seconds,
the reaper took the job back, and it trained again until it ran out of attempts. The 0.5B shape
of the report shows it with the default 60 s TTL, but takes ~40 s per run here.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack, _stop, dump_logs, reverse_dataset, start_stack
from tests.e2e.test_whole_path import TERMINAL, all_events, check_manifest, upload, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "publish-llama"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("models")
    config = LlamaConfig(hidden_size=384, intermediate_size=1152, num_hidden_layers=4, num_attention_heads=6,
                         num_key_value_heads=6, vocab_size=32_000, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / MODEL)
    build_tokenizer().save_pretrained(root / MODEL)
    return root


@pytest.fixture
def short_lease_stack(tmp_path: Path, redis_url: str, models_root: Path) -> Iterator[Stack]:
    s = start_stack(tmp_path, f"sqlite:///{tmp_path / 'tuneq.db'}", redis_url, models_root,
                    extra_env={"TUNEQ_LEASE_TTL_S": "1.5", "TUNEQ_HEARTBEAT_S": "0.3", "TUNEQ_RETRY_BACKOFF_S": "0"})
    yield s
    _stop(s.worker)
    _stop(s.api)


def test_full_model_published_longer_than_the_lease(short_lease_stack: Stack, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    stack = short_lease_stack
    with stack.client() as c:
        train = upload(c, reverse_dataset(16, seed=1))
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": MODEL, "training_file": train["id"], "method": {"type": "full"},
            "hyperparameters": {"batch_size": 1, "learning_rate": 1e-4, "max_steps": 2, "max_seq_len": 64},
        })
        assert r.status_code == 200, r.text
        job = wait_for(stack, r.json()["id"], TERMINAL, timeout=900)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(stack)}"
        events = all_events(c, job["id"])
        starts = [e for e in events if e.get("kind") == "start"]
        assert len(starts) == 1, f"the trainer ran {len(starts)} times\n{dump_logs(stack)}"
        assert not [e for e in events if e.get("kind") == "retry"]

        arts = {a["name"]: a for a in c.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts").json()["data"]}
        r = c.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/model.tar.gz/content")
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == arts["model.tar.gz"]["sha256"] == r.headers["x-content-sha256"]
        assert len(r.content) == arts["model.tar.gz"]["bytes"] == int(r.headers["content-length"])
        with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
            tar.extractall(tmp_path / "gz", filter="data")
        # The same files as a plain tar, and one by one.
        plain = c.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/model.tar/content")
        assert plain.status_code == 200 and plain.headers["content-type"] == "application/x-tar"
        with tarfile.open(fileobj=io.BytesIO(plain.content), mode="r:") as tar:
            tar.extractall(tmp_path / "tar", filter="data")
        weights = c.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/final/model.safetensors/content")
        assert hashlib.sha256(weights.content).hexdigest() == arts["final/model.safetensors"]["sha256"]

    for out in (tmp_path / "gz", tmp_path / "tar"):
        check_manifest(out)
        model = AutoModelForCausalLM.from_pretrained(out / "model")
        assert model.config.hidden_size == 384
    assert (tmp_path / "gz" / "model" / "model.safetensors").read_bytes() == weights.content
