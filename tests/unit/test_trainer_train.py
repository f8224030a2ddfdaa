"""Short CPU training runs of the tiny model: loss falls, outputs load, resume is exact."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer.events import read_events
from trainer.job import run_job


def events_of(out: Path, kind: str) -> list[dict]:
    return [e["data"] for e in read_events(out / "events.jsonl") if e["type"] == kind]


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["train_loss"] for m in events_of(out, "metrics")}


def assert_loss_falls(out: Path) -> None:
    by_step = list(losses(out).values())
    first, last = sum(by_step[:3]) / 3, sum(by_step[-3:]) / 3
    assert last < first - 0.3, by_step


def assert_manifest_matches(final: Path) -> dict:
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["files"], manifest
    for name, info in manifest["files"].items():
        data = (final / name).read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"], name
    return manifest


def test_lora_trains_validates_and_exports_loadable_adapter(make_spec, chat_files, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = make_spec(
        "lora",
        validation_file=str(chat_files["valid"]),
        schedule={"eval_every_steps": 10, "checkpoint_every_steps": 10, "keep_checkpoints": 1},
    )
    out = tmp_path / "run"
    assert run_job(spec, out) == 0
    assert_loss_falls(out)

    start = events_of(out, "start")[0]
    assert start["total_steps"] == 20 and start["method"] == "lora" and start["resumed_from_step"] is None
    assert 0 < start["trainable_params"] < start["total_params"]
    metric = events_of(out, "metrics")[-1]
    assert set(metric) >= {"step", "total_steps", "epoch", "train_loss", "learning_rate", "grad_norm",
                           "tokens", "tokens_per_second", "peak_memory_bytes"}
    assert metric["peak_memory_bytes"] is None
    valid = events_of(out, "validation")
    assert [v["step"] for v in valid] == [10, 20]
    assert valid[-1]["valid_loss"] < valid[0]["valid_loss"] and 0 <= valid[-1]["valid_mean_token_accuracy"] <= 1
    # keep_checkpoints=1: only the newest survives
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000020"]
    assert [c["path"] for c in events_of(out, "checkpoint")] == ["checkpoints/step-00000010", "checkpoints/step-00000020"]

    final = out / "final"
    manifest = assert_manifest_matches(final)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["spec"]["method"] == "lora" and manifest["metrics"]["steps"] == 20
    artifacts = {a["path"] for a in events_of(out, "artifact")}
    assert artifacts == {f"final/{n}" for n in manifest["files"]} | {"final/manifest.json"}
    finished = events_of(out, "finished")[0]
    assert finished["final_dir"] == "final" and finished["step"] == 20 and finished["trained_tokens"] > 0

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 4, 50, 60, 70, 5]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, final)
    assert not torch.allclose(tuned(ids).logits, before)


def test_full_fine_tuning_exports_a_loadable_model(make_spec, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = make_spec("full", hyperparameters={"learning_rate": 1e-3, "gradient_accumulation_steps": 2})
    out = tmp_path / "run"
    assert run_job(spec, out) == 0
    assert_loss_falls(out)
    start = events_of(out, "start")[0]
    assert start["trainable_params"] == start["total_params"]
    manifest = assert_manifest_matches(out / "final")
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    tuned = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_qlora_trains_on_a_4bit_base(make_spec, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "run"
    assert run_job(make_spec("qlora", gradient_checkpointing=True), out) == 0
    assert_loss_falls(out)
    start = events_of(out, "start")[0]
    assert start["method"] == "qlora" and start["trainable_params"] < start["total_params"]
    assert_manifest_matches(out / "final")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.float32)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    tuned = PeftModel.from_pretrained(base, out / "final")
    assert torch.isfinite(tuned(torch.tensor([[1, 4, 50, 60]])).logits).all()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_continues_exactly(method, make_spec, tmp_path):
    # Dropout, accumulation and a batch that does not divide the data exercise RNG, optimizer,
    # scheduler and data-position restore; any of them lost changes the losses after step 3.
    spec = make_spec(
        method,
        hyperparameters={"max_steps": 6, "batch_size": 5, "gradient_accumulation_steps": 2, "learning_rate": 2e-3,
                         "warmup_steps": 2},
        schedule={"checkpoint_every_steps": 3, "keep_checkpoints": 5},
        **({"lora": {"r": 4, "dropout": 0.2}} if method == "lora" else {}),
    )
    straight = tmp_path / "straight"
    assert run_job(spec, straight) == 0

    # The state a run stopped after step 3 leaves behind: its checkpoint, nothing later.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    torch.manual_seed(1234)  # a fresh process would not share the first run's RNG state either
    assert run_job(spec, resumed, resume=True) == 0

    assert events_of(resumed, "start")[0]["resumed_from_step"] == 3
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    norms_a = {m["step"]: m["grad_norm"] for m in events_of(straight, "metrics")}
    norms_b = {m["step"]: m["grad_norm"] for m in events_of(resumed, "metrics")}
    assert norms_b[6] == pytest.approx(norms_a[6], rel=1e-4)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    from safetensors.torch import load_file

    wa, wb = load_file(straight / "final" / name), load_file(resumed / "final" / name)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_is_enabled_without_reentrancy(make_spec):
    from trainer.methods import apply_method
    from trainer.model import load_model

    spec = make_spec("lora", gradient_checkpointing=True)
    model = apply_method(load_model(spec, "fp32", torch.device("cpu")), spec)
    layer = model.base_model.model.model.layers[0]
    assert layer.gradient_checkpointing
    assert model.base_model.model.model.embed_tokens.weight.requires_grad is False
    model.train()
    out = model(input_ids=torch.tensor([[1, 4, 50, 60, 70]]))
    out.logits.sum().backward()
    # B starts at zero, so only its gradient is non-zero on the first backward.
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_out_of_memory_names_settings_that_help(make_spec, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("trainer.loop.queue_forward_backward", boom)
    out = tmp_path / "oom"
    assert run_job(make_spec("lora"), out) == 1
    last = read_events(out / "events.jsonl")[-1]
    assert last["type"] == "error" and last["level"] == "error" and last["data"]["code"] == "oom"
    for setting in ("batch_size", "gradient_checkpointing", "qlora", "max_seq_len"):
        assert setting in last["data"]["hint"]


def test_bad_data_and_bad_model_are_error_events(make_spec, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "data"
    assert run_job(make_spec(training_file=str(bad)), out) == 1
    err = events_of(out, "error")[-1]
    assert err["code"] == "data" and "line 1" in read_events(out / "events.jsonl")[-1]["message"]

    out = tmp_path / "model"
    assert run_job(make_spec(model=str(tmp_path / "no-such-model")), out) == 1
    assert events_of(out, "error")[-1]["code"] == "model"
