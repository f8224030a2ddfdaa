"""The planner against real models: parameter counts, saved activations and optimizer bytes are
compared with what torch, transformers and peft actually create on this CPU."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer import planning as P
from trainer.spec import LoraSettings

GiB = 1024**3


def llama(hidden, layers, heads, kv, ffn, vocab, tied, **kw) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        max_position_embeddings=4096,
        **kw,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


TINY = dict(hidden=64, layers=2, heads=4, kv=2, ffn=128, vocab=768, tied=True)
LLAMA_1B = dict(hidden=2048, layers=16, heads=32, kv=8, ffn=8192, vocab=128_256, tied=True)
LLAMA_8B = dict(hidden=4096, layers=32, heads=32, kv=8, ffn=14_336, vocab=128_256, tied=False)


@pytest.fixture(scope="module")
def tiny_cfg() -> LlamaConfig:
    return llama(**TINY)


def _real_model(cfg, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


# --- parameter counts ------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_counts_equal_a_real_model(tied):
    cfg = llama(**{**TINY, "tied": tied})
    shape = P.model_shape(cfg)
    model = _real_model(cfg)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.tied is tied
    assert shape.embedding_params == model.model.embed_tokens.weight.numel()
    assert shape.lm_head_params == (0 if tied else model.lm_head.weight.numel())
    real_linears = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {m.name: m.in_features * m.out_features for m in shape.linears} == real_linears
    assert shape.norm_params == sum(p.numel() for n, p in model.named_parameters() if "norm" in n)


@pytest.mark.parametrize(
    "r, targets",
    [(16, "all-linear"), (8, ["q_proj", "v_proj"]), (4, ["gate_proj", "up_proj", "down_proj", "o_proj"])],
)
def test_lora_count_equals_peft(tiny_cfg, r, targets):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_real_model(tiny_cfg), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert P.model_shape(tiny_cfg).lora_params(r, targets) == trainable


def test_llama_32_1b_shape():
    shape = P.model_shape(llama(**LLAMA_1B))
    assert shape.total_params == 1_235_814_400  # Llama-3.2-1B's published count
    assert abs(shape.total_params / 1e9 - 1.24) < 0.005
    assert shape.tied and shape.lm_head_params == 0
    assert shape.lora_params(16, "all-linear") == 11_272_192
    assert json.loads(json.dumps(shape.to_dict()))["linear_modules"]["self_attn.k_proj"]["out_features"] == 512


def test_config_as_mapping_or_directory(tmp_path, tiny_cfg):
    tiny_cfg.save_pretrained(tmp_path)
    by_dir = P.model_shape(tmp_path)
    by_map = P.model_shape(json.loads((tmp_path / "config.json").read_text()))
    assert by_dir.total_params == by_map.total_params == P.model_shape(tiny_cfg).total_params


# --- activations: what autograd really saves ------------------------------------------------


def _saved_bytes_per_layer(model, ids, mask):
    """Unique storages autograd saves during forward, by decoder layer, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[object, int]] = {}
    where = {"at": "head"}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen[st.data_ptr()] = (where["at"], st.nbytes())
        return t

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hooks = []
    for i, layer in enumerate(base.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__("at", i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: where.__setitem__("at", "head")))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    for h in hooks:
        h.remove()
    out: dict[object, int] = {}
    for at, n in seen.values():
        out[at] = out.get(at, 0) + n
    return out


@pytest.mark.parametrize(
    "method, padded, autocast",
    [("full", False, False), ("full", True, False), ("lora", False, False), ("lora", True, False),
     ("lora", False, True)],
)
def test_layer_activation_formula_matches_saved_tensors(method, padded, autocast):
    cfg = llama(hidden=256, layers=3, heads=8, kv=2, ffn=704, vocab=1000, tied=True)
    model = _real_model(cfg).to(torch.bfloat16)
    shape = P.model_shape(cfg)
    lora = None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        lora = P.LoraLayers(r=8, dropout=0.0, adapter_bytes=4, modules=frozenset(shape.lora_targets("all-linear")))
    model.train()
    B, S = 2, 128
    ids = torch.randint(0, 1000, (B, S))
    mask = None
    if padded:
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, -16:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        saved = _saved_bytes_per_layer(model, ids, mask)
    predicted = P.layer_activation_bytes_per_token(
        shape, base_trainable=method == "full", lora=lora, padded=padded, seq_len=S, autocast=autocast
    )["total"]
    # Layer 0 also holds the shared rotary tables (and, for LoRA, a frozen embedding output
    # needs no norm copy), so compare a middle layer: it must match to the byte.
    # Under autocast each layer also holds bf16 copies of its fp32 adapter weights.
    cached = 2 * P.model_shape(cfg).lora_params(8, "all-linear") // cfg.num_hidden_layers if autocast else 0
    assert saved[1] == predicted * B * S + cached


@pytest.mark.parametrize("fused_mlp", [False, True])
def test_layer_formula_matches_the_trainers_fused_lora_layers(fused_mlp: bool):
    """The trainer's fused LoRA linears (trainer/lora_fused.py), with and without its fused SwiGLU
    MLP (trainer/lora_mlp.py), under bf16 autocast: the planner's bytes, to the byte."""
    from peft import LoraConfig, get_peft_model

    from trainer.lora_fused import fuse_lora
    from trainer.lora_mlp import fuse_lora_mlps

    cfg = llama(hidden=256, layers=3, heads=8, kv=2, ffn=704, vocab=1000, tied=True)
    model = get_peft_model(_real_model(cfg).to(torch.bfloat16), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert fuse_lora(model) == 21
    if fused_mlp:
        assert fuse_lora_mlps(model) == 3
    shape = P.model_shape(cfg)
    lora = P.LoraLayers(r=8, dropout=0.0, adapter_bytes=4, modules=frozenset(shape.lora_targets("all-linear")), quantized=True)
    model.train()
    B, S = 2, 128
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = _saved_bytes_per_layer(model, torch.randint(0, 1000, (B, S)), None)
    predicted = P.layer_activation_bytes_per_token(shape, lora=lora, seq_len=S, autocast=True, fused_mlp=fused_mlp)
    assert saved[1] == predicted["total"] * B * S
    if fused_mlp:
        plain = P.layer_activation_bytes_per_token(shape, lora=lora, seq_len=S, autocast=True)["total"]
        # torch's SiLU and mul save gate's output, SiLU's and up's; down saves the product (4 bf16
        # ffn-wide tensors); the fused MLP saves two. (With Liger's SiLU-mul, 3 against 2.)
        assert plain - predicted["total"] == 2 * 2 * 704


# --- weights, gradients and optimizer against a real step -----------------------------------


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_static_terms_match_a_real_step_on_cpu(tiny_cfg, method):
    model = _real_model(tiny_cfg).to(torch.bfloat16)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    est = P.estimate_memory(tiny_cfg, method=method, batch_size=2, seq_len=32, padded=False)
    assert est.weights == _tensor_bytes(model.parameters())
    assert est.parts["gradients_all"] == _tensor_bytes(p.grad for p in params)
    states = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert est.optimizer_states == _tensor_bytes(states)
    assert est.trainable_params == sum(p.numel() for p in params)


def test_fp32_master_and_torch_adamw_bytes_per_param(tiny_cfg):
    n = P.model_shape(tiny_cfg).total_params
    bf16 = P.estimate_memory(tiny_cfg, method="full", batch_size=1, seq_len=8)
    master = P.estimate_memory(tiny_cfg, method="full", batch_size=1, seq_len=8, full_precision="fp32_master")
    # torch's AdamW keeps m and v in the parameters' dtype.
    assert (bf16.weights, bf16.parts["gradients_all"], bf16.optimizer_states) == (2 * n, 2 * n, 4 * n)
    assert (master.weights, master.parts["gradients_all"], master.optimizer_states) == (4 * n, 4 * n, 8 * n)
    eight = P.estimate_memory(tiny_cfg, method="full", batch_size=1, seq_len=8, optimizer="adamw_8bit")
    assert eight.optimizer_states == 2 * n


# --- shape of the estimates ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg_1b():
    return llama(**LLAMA_1B)


@pytest.mark.parametrize("method", P.AUTO_METHODS)
@pytest.mark.parametrize("ckpt", [False, True])
def test_monotone_in_batch_and_seq(cfg_1b, method, ckpt):
    def total(b, s):
        return P.estimate_memory(cfg_1b, method=method, batch_size=b, seq_len=s, gradient_checkpointing=ckpt).total

    assert total(1, 512) < total(2, 512) < total(4, 512) < total(8, 512)
    assert total(4, 256) < total(4, 1024) < total(4, 4096)


@pytest.mark.parametrize("method", P.AUTO_METHODS)
def test_checkpointing_cuts_activations(cfg_1b, method):
    kw = dict(method=method, batch_size=8, seq_len=2048)
    off = P.estimate_memory(cfg_1b, gradient_checkpointing=False, **kw)
    on = P.estimate_memory(cfg_1b, gradient_checkpointing=True, **kw)
    assert on.parts["activations_stored"] < off.parts["activations_stored"] / 10
    assert on.total < off.total


def test_weights_order_and_breakdown_sums(cfg_1b):
    est = {m: P.estimate_memory(cfg_1b, method=m, batch_size=4, seq_len=1024) for m in P.AUTO_METHODS}
    assert est["qlora"].weights < est["lora"].weights
    # LoRA's frozen base is the same bf16 as full's weights; its fp32 adapters come on top, and
    # full pays for gradients and optimizer states of every weight.
    assert est["lora"].parts["base_weights"] == est["full"].weights
    states = {m: e.weights + e.parts["gradients_all"] + e.optimizer_states for m, e in est.items()}
    assert states["qlora"] < states["lora"] < states["full"]
    for e in est.values():
        assert e.weights + e.gradients + e.optimizer_states + e.activations + e.logits + e.overhead == e.total
        assert e.allocated < e.total
        json.dumps(e.to_dict())
    # NF4 + double quant: ~0.516 bytes per quantised weight; embedding stays bf16.
    shape = P.model_shape(cfg_1b)
    nf4 = est["qlora"].parts["nf4_linears"] / shape.decoder_linear_params
    assert 0.51 < nf4 < 0.52


def test_logits_dominate_at_long_sequences_with_a_big_vocab(cfg_1b):
    e = P.estimate_memory(cfg_1b, method="lora", batch_size=8, seq_len=2048, gradient_checkpointing=True)
    assert e.parts["logits_peak"] == 14 * 8 * 2048 * 128_256
    assert e.logits > e.activations


def test_multi_gpu(cfg_1b):
    one = P.estimate_memory(cfg_1b, method="full", batch_size=4, seq_len=1024)
    ddp = P.estimate_memory(cfg_1b, method="full", batch_size=4, seq_len=1024, gpus=4, strategy="ddp")
    fsdp = P.estimate_memory(cfg_1b, method="full", batch_size=4, seq_len=1024, gpus=4, strategy="fsdp")
    assert ddp.total > one.total > fsdp.total
    assert fsdp.optimizer_states == -(-one.optimizer_states // 4)


def test_compute(cfg_1b):
    shape = P.model_shape(cfg_1b)
    full = P.estimate_compute(cfg_1b, method="full", tokens=10**9, seq_len=2048)
    lora = P.estimate_compute(cfg_1b, method="lora", tokens=10**9, seq_len=2048)
    assert full.matmul_flops_per_token == 6 * shape.matmul_params
    attn = 6 * 16 * 2048 * 2048  # 12·L·h·S, halved by the causal mask
    assert full.attention_flops_per_token == attn
    assert lora.flops_per_token < full.flops_per_token
    assert full.seconds == pytest.approx(full.total_flops / (790e12 * 0.35))
    assert full.gpu_hours == pytest.approx(full.seconds / 3600)
    two = P.estimate_compute(cfg_1b, method="full", tokens=10**9, seq_len=2048, gpus=2, efficiency=0.5)
    assert two.seconds == pytest.approx(full.seconds * 0.35 / 0.5 / 2)
    ckpt = P.estimate_compute(cfg_1b, method="full", tokens=10**9, seq_len=2048, gradient_checkpointing=True)
    assert ckpt.flops_per_token == pytest.approx(full.flops_per_token * 4 / 3)


# --- plan ------------------------------------------------------------------------------------


def _spec(method="auto", batch=4, seq=1024, ckpt=False, **hp):
    return {
        "model": "x",
        "method": method,
        "gradient_checkpointing": ckpt,
        "hyperparameters": {"batch_size": batch, "max_seq_len": seq, **hp},
    }


def test_auto_picks_full_for_a_tiny_model_on_80gib(tiny_cfg):
    p = P.plan(_spec(), tiny_cfg, 80 * GiB)
    assert p.fits and p.method == "full"
    assert p.batch_size == 4
    d = json.loads(json.dumps(p.to_dict()))
    assert set(d["methods"]) == {"full", "lora", "qlora"}


def test_auto_batch_is_the_largest_power_of_two_that_fits(tiny_cfg, cfg_1b):
    assert P.plan(_spec(batch="auto"), tiny_cfg, 80 * GiB).batch_size == 64
    p = P.plan(_spec(method="lora", batch="auto", seq=2048), cfg_1b, 24 * GiB)
    b = p.batch_size
    assert b is not None and b & (b - 1) == 0
    usable = 24 * GiB * 0.9
    spec = _spec(method="lora", seq=2048)
    assert P.estimate_for_spec(spec, cfg_1b, batch_size=b).total <= usable
    assert P.estimate_for_spec(spec, cfg_1b, batch_size=2 * b).total > usable


def test_auto_on_an_8b_shape_and_24gib_picks_an_adapter():
    p = P.plan(_spec(batch=1, seq=1024, ckpt=True), llama(**LLAMA_8B), 24 * GiB)
    assert p.fits and p.method in ("lora", "qlora")
    assert not p.methods["full"].fits


def test_8b_full_on_16gib_is_refused_with_numbers():
    from trainer.spec import JobSpec

    spec = JobSpec(model="meta-llama/Llama-3.1-8B", method="full", training_file="t.jsonl")
    p = P.plan(spec, llama(**LLAMA_8B), 16 * GiB)
    assert not p.fits and p.method is None
    msg = p.message
    assert "full" in msg and "GiB" in msg and "14.4 GiB" in msg
    assert any(ch.isdigit() for ch in msg)
    assert p.suggestions, msg
    assert all(s["total_bytes"] <= p.usable_bytes for s in p.suggestions)
    assert "qlora" in msg
    json.dumps(p.to_dict())


def test_refusal_suggests_batch_seq_and_checkpointing(cfg_1b):
    p = P.plan(_spec(method="full", batch=8, seq=2048), cfg_1b, 56 * GiB)
    assert not p.fits
    changes = {s["change"]: s for s in p.suggestions}
    assert {"gradient_checkpointing", "batch_size", "max_seq_len"} <= set(changes), p.message
    assert all(s["total_bytes"] <= p.usable_bytes for s in p.suggestions)
    assert f"batch_size {changes['batch_size']['value']}" in p.message


def test_refusal_suggests_more_gpus_when_model_states_dominate():
    # Llama-3-8B full fine-tuning (fp32 master, AdamW: 16 B/param) on one H200 (140 GiB) does
    # not fit; sharded over two it does.
    p = P.plan(_spec(method="full", batch=1, seq=512, ckpt=True), llama(**LLAMA_8B), 140 * GiB)
    assert not p.fits
    gpus = [s for s in p.suggestions if s["change"] == "gpus"]
    assert gpus and gpus[0]["value"] == 2 and "FSDP" in p.message


def test_plan_with_dataset_tokens_has_compute(tiny_cfg):
    p = P.plan(_spec(n_epochs=2), tiny_cfg, 80 * GiB, dataset_tokens=10**6)
    assert p.compute is not None and p.compute.tokens == 2 * 10**6 and p.compute.gpu_hours > 0


def test_max_steps_times_a_job_before_its_file_is_counted(tiny_cfg):
    # A plan asked while the upload's check still counts the file: max_steps fixes the steps, so the
    # time is the one the counted file gives; a schedule placed by epochs still needs the count.
    counted = P.plan(_spec(max_steps=30), tiny_cfg, 80 * GiB, dataset_tokens=10**6).compute
    uncounted = P.plan(_spec(max_steps=30), tiny_cfg, 80 * GiB).compute
    assert uncounted is not None and uncounted.to_dict() == counted.to_dict()
    assert P.plan(_spec(n_epochs=2), tiny_cfg, 80 * GiB).compute is None
    by_epoch = {**_spec(max_steps=30), "schedule": {"checkpoint_every_epoch": True}}
    assert P.plan(by_epoch, tiny_cfg, 80 * GiB).compute is None
    assert P.plan(by_epoch, tiny_cfg, 80 * GiB, dataset_tokens=10**6).compute is not None


def test_estimate_rejects_bad_arguments(tiny_cfg):
    with pytest.raises(ValueError, match="method"):
        P.estimate_memory(tiny_cfg, method="dora", batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="lora_targets"):
        P.estimate_memory(tiny_cfg, method="lora", batch_size=1, seq_len=8, lora=LoraSettings(target_modules=["nope"]))


def test_a_shape_answers_each_question_once_and_keeps_its_answers_apart():
    shape = P.model_shape(llama(**LLAMA_1B))
    calls = []
    assert shape.memo(("k", 1), lambda: calls.append(1) or "one") == "one"
    assert shape.memo(("k", 1), lambda: calls.append(1) or "again") == "one"
    assert shape.memo(("k", 2), lambda: calls.append(2) or "two") == "two"
    assert calls == [1, 2]
    # The memo is the instance's, and equal shapes stay equal with or without one.
    assert P.model_shape(llama(**LLAMA_1B)) == shape
    attn = frozenset(m.name for m in shape.linears if m.name.endswith(("q_proj", "v_proj")))
    per = shape.adapted_features(attn)
    assert set(per) == set(range(shape.layers))
    assert per[0] == (2048 + 2048 + 2048 + 512, 2048 + 512)
