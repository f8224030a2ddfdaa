"""The method family on the tiny model: what each makes trainable, its settings' checks, the
optimizers, continuation from a previous job's weights, and the merged export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.errors import ConfigError
from trainer.spec import JobSpec


def _spec(model: str = "m", **top) -> JobSpec:
    return JobSpec.model_validate({"model": model, "training_file": "t.jsonl", **top})


def _base(model_dir: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    return model


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# --- settings checks, no model ---------------------------------------------------------------


@pytest.mark.parametrize("top, message", [
    ({"method": "freeze"}, "freeze.trainable_layers: required"),
    ({"method": "lora", "ia3": {}}, "ia3: these settings apply to method 'ia3'"),
    ({"method": "lora", "quantization": {"bits": 8}}, "quantization: these settings apply to method 'qlora'"),
    ({"method": "ia3", "lora": {"use_dora": True}}, "lora: LoRA settings apply to method 'lora' or 'qlora'"),
    ({"method": "prefix", "export": {"merged": True}}, "export.merged: only for lora, qlora, ia3"),
    ({"method": "full", "export": {"merged": True}}, "already produces a whole model"),
    ({"method": "qlora", "quantization": {"bits": 3}}, "quantization.bits"),
    ({"method": "lora", "lora": {"loraplus_lr_ratio": 0.5}}, "loraplus_lr_ratio"),
    ({"method": "ia3", "ia3": {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}},
     "['down_proj'] are not in ia3.target_modules"),
    ({"optimizer": "sgd"}, "optimizer"),
])
def test_bad_method_settings_name_the_field(top, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        _spec(**top)


def test_every_new_setting_survives_a_dump():
    spec = _spec(method="qlora", quantization={"bits": 8}, lora={"use_dora": True, "use_rslora": True,
                 "loraplus_lr_ratio": 16}, optimizer="paged_adamw_8bit", init_from="/x", export={"merged": True})
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_unknown_target_module_names_the_models_modules(tiny_model_dir):
    from trainer.modules import check_spec_model

    spec = _spec(str(tiny_model_dir), lora={"target_modules": ["q_proj", "query_key_value"]})
    with pytest.raises(ConfigError) as err:
        check_spec_model(spec)
    assert "'query_key_value' not in this model" in err.value.message
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err.value.message
    with pytest.raises(ConfigError, match="freeze.trainable_layers: 3 exceeds the model's 2 decoder layers"):
        check_spec_model(_spec(str(tiny_model_dir), method="freeze", freeze={"trainable_layers": 3}))
    check_spec_model(_spec(str(tiny_model_dir), lora={"target_modules": ["q_proj", "v_proj"]}))


# --- what each method trains -----------------------------------------------------------------


def test_dora_and_rslora_are_lora_options(tiny_model_dir):
    from trainer.methods import apply_method

    dora = apply_method(_base(tiny_model_dir), _spec(str(tiny_model_dir), lora={"use_dora": True, "r": 4}))
    names = _trainable(dora)
    assert any("lora_magnitude_vector" in n for n in names) and all("lora_" in n for n in names)
    rs = apply_method(_base(tiny_model_dir), _spec(str(tiny_model_dir), lora={"use_rslora": True, "r": 4, "alpha": 8}))
    q = rs.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4**0.5)  # plain LoRA: 8 / 4


def test_ia3_prefix_and_freeze_train_only_their_parameters(tiny_model_dir):
    from trainer.methods import apply_method

    ia3 = apply_method(_base(tiny_model_dir), _spec(str(tiny_model_dir), method="ia3"))
    assert _trainable(ia3) and all(".ia3_l." in n for n in _trainable(ia3))
    prefix = apply_method(_base(tiny_model_dir), _spec(str(tiny_model_dir), method="prefix", prefix={"num_virtual_tokens": 4}))
    assert _trainable(prefix) == ["prompt_encoder.default.embedding.weight"]
    ids = torch.tensor([[5, 6, 7, 8]])
    out = prefix(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape[1] == 4  # virtual tokens add keys/values, not positions to predict
    freeze = apply_method(_base(tiny_model_dir), _spec(str(tiny_model_dir), method="freeze", freeze={"trainable_layers": 1}))
    names = _trainable(freeze)
    assert names and all(n.startswith(("model.layers.1.", "model.norm.")) for n in names)
    assert "model.norm.weight" in names and not any(n.startswith("model.layers.0.") for n in names)


@pytest.mark.parametrize("quantization, layer", [({"bits": 4}, "Linear4bit"), ({"bits": 8}, "Linear8bitLt")])
def test_qlora_quantizes_the_base_to_the_asked_bits(tiny_model_dir, quantization, layer):
    from trainer.methods import apply_method
    from trainer.model import load_model

    spec = _spec(str(tiny_model_dir), method="qlora", quantization=quantization, lora={"r": 4})
    model = apply_method(load_model(spec, "fp32", torch.device("cpu")), spec)
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q).__name__ == layer


# --- optimizers ---------------------------------------------------------------------------------


def test_loraplus_gives_b_a_larger_rate_through_the_schedule(tiny_model_dir):
    from transformers import get_cosine_schedule_with_warmup

    from trainer.methods import apply_method
    from trainer.optim import build_optimizer

    spec = _spec(str(tiny_model_dir), lora={"r": 4, "loraplus_lr_ratio": 16},
                 hyperparameters={"learning_rate": 1e-3, "weight_decay": 0.1})
    model = apply_method(_base(tiny_model_dir), spec)
    opt = build_optimizer(model, spec, torch.device("cpu"))
    by_name = {g["name"]: g for g in opt.param_groups}
    b_ids = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    assert {id(p) for p in by_name["lora_B"]["params"]} == b_ids
    assert by_name["lora_B"]["lr"] == pytest.approx(16e-3) and by_name["base"]["lr"] == pytest.approx(1e-3)
    sched = get_cosine_schedule_with_warmup(opt, 2, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert by_name["lora_B"]["lr"] == pytest.approx(16 * by_name["base"]["lr"])
    plain = build_optimizer(model, _spec(str(tiny_model_dir), lora={"r": 4}), torch.device("cpu"))
    assert len({g["lr"] for g in plain.param_groups}) == 1


@pytest.mark.parametrize("kind, state_dtype, cls", [
    ("adamw", torch.float32, "AdamW"), ("adamw_fused", torch.float32, "AdamW"),
    ("adamw_8bit", torch.uint8, "AdamW8bit"), ("paged_adamw", torch.float32, "PagedAdamW"),
    ("paged_adamw_8bit", torch.uint8, "PagedAdamW8bit"),
])
def test_each_optimizer_steps_and_keeps_its_state_width(kind, state_dtype, cls):
    from trainer.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.LayerNorm(128))  # 8-bit needs >= 4096 elements
    spec = _spec(method="full", optimizer=kind, hyperparameters={"learning_rate": 1e-2})
    opt = build_optimizer(model, spec, torch.device("cpu"))
    assert type(opt).__name__ == cls
    assert opt.defaults.get("fused") is (True if kind == "adamw_fused" else opt.defaults.get("fused"))
    before = model[0].weight.detach().clone()
    model(torch.randn(4, 128)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, model[0].weight)
    state = opt.state[model[0].weight]
    moment = state.get("exp_avg", state.get("state1"))
    assert moment.dtype == state_dtype


# --- continuation ---------------------------------------------------------------------------------


def _losses(out: Path) -> list[float]:
    from trainer.events import read_events

    return [e["data"]["train_loss"] for e in read_events(out / "events.jsonl") if e["type"] == "metrics"]


def test_continued_job_starts_from_the_previous_weights(make_spec, chat_files, tmp_path):
    from tests.unit.conftest import chat_rows, write_jsonl
    from trainer.job import run_job

    first = tmp_path / "first"
    spec = make_spec("lora", {"max_steps": 16, "learning_rate": 5e-3}, lora={"r": 8, "alpha": 16})
    assert run_job(spec, first) == 0
    before = _losses(first)
    # New data: the same task, other rows in another order.
    new = write_jsonl(tmp_path / "new.jsonl", list(reversed(chat_rows(30))))
    cont = tmp_path / "cont"
    spec2 = make_spec("lora", {"max_steps": 2, "learning_rate": 5e-3}, lora={"r": 8, "alpha": 16},
                      training_file=str(new), init_from=str(first / "final"))
    assert run_job(spec2, cont) == 0
    after = _losses(cont)
    print(f"first job {before[0]:.3f} -> {before[-1]:.3f}; continued job starts at {after[0]:.3f}")
    assert after[0] < before[0] - 1.0  # far below a fresh start
    assert abs(after[0] - sum(before[-3:]) / 3) < 0.5

    wrong = make_spec("lora", {"max_steps": 2}, lora={"r": 4}, init_from=str(first / "final"))
    assert run_job(wrong, tmp_path / "wrong") != 0
    from trainer.events import read_events

    error = [e for e in read_events(tmp_path / "wrong" / "events.jsonl") if e["type"] == "error"][-1]
    assert "its LoRA rank is 8, this job has lora.r=4" in error["message"]


def test_full_weights_continue_from_a_model_directory(tiny_model_dir, tmp_path):
    from trainer.init_weights import load_initial_weights

    src = _base(tiny_model_dir)
    with torch.no_grad():
        src.model.layers[1].mlp.up_proj.weight.add_(1.0)
    src.to(torch.bfloat16).save_pretrained(tmp_path / "prev")
    spec = _spec(str(tiny_model_dir), method="freeze", freeze={"trainable_layers": 1}, init_from=str(tmp_path / "prev"))
    model = _base(tiny_model_dir)
    load_initial_weights(model, spec)
    got = model.model.layers[1].mlp.up_proj.weight
    assert got.dtype == torch.float32
    assert torch.allclose(got, src.model.layers[1].mlp.up_proj.weight.float())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    with pytest.raises(ConfigError, match="holds no adapter"):
        from trainer.methods import apply_method

        apply_method(_base(tiny_model_dir), _spec(str(tiny_model_dir), init_from=str(tmp_path / "prev")))


# --- merged export ---------------------------------------------------------------------------------


def _random_adapter(tiny_model_dir: Path, spec: JobSpec, out: Path) -> Path:
    """A trained-looking adapter: every adapter weight randomised, so the merge has work to do."""
    from trainer.methods import apply_method
    from trainer.model import load_model

    model = apply_method(load_model(spec, "fp32", torch.device("cpu")), spec)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "ia3" in name or "magnitude" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("top", [
    {"method": "lora", "lora": {"r": 4, "use_dora": True}},
    {"method": "ia3"},
    {"method": "qlora", "lora": {"r": 4}},
    {"method": "qlora", "lora": {"r": 4}, "quantization": {"bits": 8}},
], ids=["dora", "ia3", "qlora-nf4", "qlora-int8"])
def test_merged_model_gives_base_plus_adapter_logits(tiny_model_dir, tmp_path, top):
    from peft import PeftModel

    from trainer.merge import merged_model

    spec = _spec(str(tiny_model_dir), **top)
    adapter = _random_adapter(tiny_model_dir, spec, tmp_path / "adapter")
    ids = torch.tensor([[1, 40, 77, 300, 12, 9, 500, 2]])
    # The reference is the unquantized fp32 base with the adapter applied, not merged.
    reference = PeftModel.from_pretrained(_base(tiny_model_dir), adapter).eval()
    base_only = _base(tiny_model_dir).eval()
    merged = merged_model(str(tiny_model_dir), adapter, "fp32").eval()
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        want, got, plain = (m(input_ids=ids).logits for m in (reference, merged, base_only))
    assert (want - plain).abs().max() > 0.05  # the adapter changes the outputs
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_merged_export_writes_a_bf16_model_with_its_hashes(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.events import EventWriter
    from trainer.export import export_final, sha256_of
    from trainer.methods import apply_method
    from trainer.model import load_model

    spec = _spec(str(tiny_model_dir), method="qlora", lora={"r": 4}, export={"merged": True})
    model = apply_method(load_model(spec, "fp32", torch.device("cpu")), spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    final = export_final(tmp_path, model, tok, spec, {}, EventWriter(tmp_path / "events.jsonl"), "fp32")
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["method_detail"]["quantized_linears"] == {"Linear4bit": 14}
    assert {"merged/model.safetensors", "merged/config.json", "merged/tokenizer.json", "adapter_model.safetensors"} <= set(manifest["files"])
    for rel, info in manifest["files"].items():
        assert sha256_of(final / rel) == info["sha256"], rel
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert merged.dtype == torch.bfloat16
    base = _base(tiny_model_dir)
    ids = torch.tensor([[1, 40, 77, 300, 12, 9]])
    with torch.no_grad():
        diff = (merged.float()(input_ids=ids).logits - base(input_ids=ids).logits).abs().max()
    assert diff > 0.01  # the update is in the merged weights, not dropped
