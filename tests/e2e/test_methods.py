"""Each method of the family trains through the API on the tiny model; a job continues from a
previous job's weights and checkpoints; merged and checkpoint artifacts download with their hashes.

They run on the test process's shared stack: starting uvicorn and a worker costs more than a short job.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from tests.datasets import reverse_dataset
from tests.e2e.conftest import Stack, dump_logs
from tests.e2e.test_whole_path import TERMINAL, all_events, assert_learned, train_losses, upload, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHORT = {"max_steps": 8, "batch_size": 8, "max_seq_len": 64, "warmup_steps": 1}


@pytest.fixture
def mstack(stack: Stack) -> Stack:
    return stack


def create(c, body: dict) -> dict:
    r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "seed": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()


def run(stack: Stack, body: dict, rows: int = 32, seed: int = 1) -> tuple[dict, list[float]]:
    with stack.client() as c:
        train = upload(c, reverse_dataset(rows, seed=seed))
        job = create(c, {"training_file": train["id"], "hyperparameters": SHORT, **body})
        job = wait_for(stack, job["id"], TERMINAL)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(stack)}"
        return job, train_losses(all_events(c, job["id"]))


def artifacts(c, job_id: str) -> dict[str, dict]:
    return {a["name"]: a for a in c.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts").json()["data"]}


def fetch(c, job_id: str, art: dict) -> bytes:
    r = c.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/{art['id']}/content")
    assert r.status_code == 200, r.text
    assert hashlib.sha256(r.content).hexdigest() == art["sha256"] == r.headers["X-Content-SHA256"]
    return r.content


def unpack(data: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def manifest_of(c, job_id: str) -> dict:
    return json.loads(fetch(c, job_id, artifacts(c, job_id)["final/manifest.json"]))


METHODS = {  # name: (method, learning rate, what the trained model must show in the manifest)
    "dora": ({"type": "lora", "lora": {"r": 8, "alpha": 16, "use_dora": True}}, 3e-3,
             {"peft_type": "LORA", "use_dora": True}),
    "rslora": ({"type": "lora", "lora": {"r": 8, "alpha": 16, "use_rslora": True}}, 3e-3, {"use_rslora": True}),
    "loraplus": ({"type": "lora", "lora": {"r": 8, "alpha": 16, "loraplus_lr_ratio": 16}}, 1e-3, {"peft_type": "LORA"}),
    "qlora-int8": ({"type": "qlora", "qlora": {"r": 8, "alpha": 16, "quantization": {"bits": 8}}}, 3e-3,
                   {"quantized_linears": {"Linear8bitLt": 14}}),
    # IA3's vectors and the prefix start neutral and are few: they need far larger steps.
    "ia3": ({"type": "ia3", "ia3": {}}, 3e-2, {"peft_type": "IA3", "trainable_params": 384}),
    "prefix": ({"type": "prefix", "prefix": {"num_virtual_tokens": 8}}, 3e-2,
               {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}),
    # One of two layers (36,992) and the final norm (64).
    "freeze": ({"type": "freeze", "freeze": {"trainable_layers": 1}}, 3e-3, {"trainable_params": 37056}),
}
OPTIMIZER = {"loraplus": "adamw_8bit", "qlora-int8": "paged_adamw", "ia3": "adamw_fused", "prefix": "paged_adamw_8bit"}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_through_the_api(mstack: Stack, name: str) -> None:
    method, lr, detail = METHODS[name]
    optimizer = OPTIMIZER.get(name, "adamw")
    job, losses = run(mstack, {"method": method, "optimizer": optimizer, "hyperparameters": {**SHORT, "learning_rate": lr}})
    assert len(losses) == 8 and all(x == x for x in losses), losses
    assert min(losses[-3:]) < losses[0], losses  # it learns something in eight steps
    assert job["method"]["type"] == "supervised" and job["method"]["supervised"]["method"] == method["type"]
    with mstack.client() as c:
        manifest = manifest_of(c, job["id"])
    assert manifest["spec"]["optimizer"] == optimizer
    assert {k: manifest["method_detail"].get(k) for k in detail} == detail, manifest["method_detail"]


def test_continue_merge_and_download_checkpoints(mstack: Stack, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with mstack.client() as c:
        # A target module the model lacks is refused at creation, naming the ones it has.
        train = upload(c, reverse_dataset(32, seed=1))
        r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train["id"],
                                                   "method": {"type": "lora", "lora": {"target_modules": ["c_attn"]}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "method.lora.target_modules", r.text
        assert "q_proj" in r.json()["error"]["message"]

    # The first job is also the whole path's QLoRA job: it learns, and its adapter loads on the base.
    first, before = run(mstack, {
        "method": {"type": "qlora", "qlora": {"r": 8, "alpha": 16}}, "export": {"merged": True},
        "hyperparameters": {**SHORT, "max_steps": 24, "learning_rate": 5e-3}, "schedule": {"checkpoint_every_steps": 12},
    }, rows=64)
    assert_learned(before)
    with mstack.client() as c:
        arts = artifacts(c, first["id"])
        assert {"adapter.tar.gz", "merged.tar.gz", "checkpoints/step-00000012.tar.gz",
                "checkpoints/step-00000024.tar.gz"} <= set(arts), sorted(arts)
        adapter = unpack(fetch(c, first["id"], arts["adapter.tar.gz"]), tmp_path / "a") / "adapter"
        merged = unpack(fetch(c, first["id"], arts["merged.tar.gz"]), tmp_path / "m") / "merged"
        ck = unpack(fetch(c, first["id"], arts["checkpoints/step-00000012.tar.gz"]), tmp_path / "c") / "step-00000012"
        checkpoints = c.get(f"/v1/fine_tuning/jobs/{first['id']}/checkpoints").json()["data"]
    assert not (adapter / "merged").exists() and not (ck / "optimizer.pt").exists()
    manifest = json.loads((adapter / "manifest.json").read_text())
    for rel, info in manifest["files"].items():
        if not rel.startswith("merged/"):
            assert hashlib.sha256((adapter / rel).read_bytes()).hexdigest() == info["sha256"], rel
    for rel, info in manifest["files"].items():
        if rel.startswith("merged/"):
            assert hashlib.sha256((merged / rel.removeprefix("merged/")).read_bytes()).hexdigest() == info["sha256"]
    for rel, info in json.loads((ck / "manifest.json").read_text())["files"].items():
        if (ck / rel).exists():
            assert hashlib.sha256((ck / rel).read_bytes()).hexdigest() == info["sha256"], rel

    # The merged bf16 model answers like the unquantized base with the adapter, within bf16 rounding.
    ids = torch.tensor([[1, 40, 77, 300, 12, 9, 500, 2]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    folded = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert folded.dtype == torch.bfloat16
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, folded.float()(input_ids=ids).logits
    assert (got - want).abs().max() < 0.1 * want.abs().max(), (got - want).abs().max()

    # Continue on new data from the job (its final adapter; method and settings carried over) ...
    cont, after = run(mstack, {"from_checkpoint": first["id"],
                               "hyperparameters": {**SHORT, "max_steps": 2, "learning_rate": 5e-3}}, seed=5)
    assert cont["method"]["supervised"]["method"] == "qlora" and cont["method"]["supervised"]["lora"]["r"] == 8
    print(f"first job {before[0]:.3f} -> {before[-1]:.3f}; continued job starts at {after[0]:.3f}")
    assert after[0] < before[0] - 1.0 and abs(after[0] - sum(before[-3:]) / 3) < 0.5, (before, after)
    # ... and from its first checkpoint.
    step12 = next(ck for ck in checkpoints if ck["step_number"] == 12)
    from_ck, from_ck_losses = run(mstack, {"from_checkpoint": step12["id"], "method": {"type": "qlora", "qlora": {"r": 8, "alpha": 16}},
                                           "hyperparameters": {**SHORT, "max_steps": 2, "learning_rate": 5e-3}}, seed=6)
    assert from_ck_losses[0] < before[0] - 0.5, (before, from_ck_losses)
