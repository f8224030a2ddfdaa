"""The planner for the trainer as it runs after the fast-path change: every method and optimizer,
the chunked loss, speed lean/fast, DDP and FSDP, and the choices `auto` makes."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from trainer import planning as P

GiB = 1024**3


def llama(hidden, layers, heads, kv, ffn, vocab, tied) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied)


TINY = llama(64, 2, 4, 2, 128, 768, True)
LLAMA_1B = llama(2048, 16, 32, 8, 8192, 128_256, True)
LLAMA_8B = llama(4096, 32, 32, 8, 14_336, 128_256, False)  # Llama-3-8B's shape


def spec(method="auto", batch=4, seq=1024, speed="auto", **extra):
    return {"model": "x", "method": method, "speed": speed,
            "hyperparameters": {"batch_size": batch, "max_seq_len": seq}, **extra}


def est(config, method="lora", batch=4, seq=2048, speed="fast", **kw):
    return P.estimate_for_spec(spec(method, batch, seq, speed), config, **kw)


# --- auto ------------------------------------------------------------------------------------


def test_auto_takes_full_and_fast_when_they_fit_with_margin_on_a_big_gpu():
    p = P.plan(spec(batch=4, seq=2048), LLAMA_1B, 140 * GiB)
    assert p.fits and p.method == "full" and p.speed == "fast"
    assert p.methods["full"].estimate.total <= 0.9 * 140 * GiB


def test_auto_checkpoints_the_fewest_layers_that_fit_when_fast_does_not():
    """As the trainer resolves speed auto on a GPU: fast, else balanced with the fewest
    checkpointed layers that fit, else lean."""
    p = P.plan(spec(method="full", batch=8, seq=4096), LLAMA_1B, 80 * GiB)
    usable = 0.9 * 80 * GiB
    fast = est(LLAMA_1B, "full", 8, 4096, "fast")
    assert fast.total > usable
    chosen = p.methods["full"]
    assert p.fits and p.speed == "balanced" and 0 < chosen.checkpoint_layers < 16
    k = chosen.checkpoint_layers
    assert est(LLAMA_1B, "full", 8, 4096, "balanced", checkpoint_layers=k).total <= usable
    assert est(LLAMA_1B, "full", 8, 4096, "balanced", checkpoint_layers=k - 1).total > usable
    shown = json.loads(json.dumps(p.to_dict()))
    assert shown["speed"] == "balanced" and shown["methods"]["full"]["checkpoint_layers"] == k
    assert shown["gradient_checkpointing"] is True and f"bottom {k} of 16 layers" in p.message


def test_balanced_plans_the_given_layer_count_or_the_fewest_that_fit():
    given = P.plan(spec(method="full", batch=8, seq=4096, speed="balanced", checkpoint_layers=14), LLAMA_1B, 80 * GiB)
    assert given.methods["full"].checkpoint_layers == 14 and given.speed == "balanced"
    assert given.methods["full"].estimate.total == est(LLAMA_1B, "full", 8, 4096, "balanced", checkpoint_layers=14).total
    picked = P.plan(spec(method="full", batch=8, seq=4096, speed="balanced"), LLAMA_1B, 80 * GiB)
    auto = P.plan(spec(method="full", batch=8, seq=4096), LLAMA_1B, 80 * GiB)
    assert picked.methods["full"].checkpoint_layers == auto.methods["full"].checkpoint_layers


def test_auto_steps_down_to_lora_then_qlora_then_refuses_with_numbers():
    lora = P.plan(spec(batch=1, seq=1024), LLAMA_8B, 40 * GiB)
    assert lora.method == "lora" and not lora.methods["full"].fits
    qlora = P.plan(spec(batch=1, seq=1024), LLAMA_8B, 16 * GiB)
    assert qlora.method == "qlora" and not qlora.methods["lora"].fits
    none = P.plan(spec(batch=1, seq=1024), LLAMA_8B, 4 * GiB)
    assert not none.fits and none.method is None
    assert "does not fit" in none.message and "qlora needs" in none.message and "GiB" in none.message
    need = none.methods["qlora"].estimate.total / GiB
    assert f"{need:.1f} GiB" in none.message


def test_auto_batch_with_auto_speed_prefers_a_useful_fast_batch():
    p = P.plan(spec(method="lora", batch="auto", seq=2048), LLAMA_1B, 24 * GiB)
    assert p.fits
    if p.speed == "fast":
        assert p.batch_size >= P.AUTO_FAST_MIN_BATCH
    else:  # fast fits only below the minimum batch: lean with a bigger one
        assert est(LLAMA_1B, "lora", P.AUTO_FAST_MIN_BATCH, 2048, "fast").total > 0.9 * 24 * GiB


# --- several GPUs --------------------------------------------------------------------------


def test_fsdp_over_two_gpus_fits_an_8b_full_fine_tune_that_one_gpu_cannot():
    one = P.plan(spec(method="full", batch=1, seq=2048), LLAMA_8B, 140 * GiB, gpus=1)
    assert not one.fits
    two = P.plan(spec(method="full", batch=1, seq=2048), LLAMA_8B, 140 * GiB, gpus=2)
    assert two.fits and two.strategy == "fsdp"
    e = two.methods["full"].estimate
    assert e.strategy == "fsdp" and e.gradient_checkpointing  # FSDP always checkpoints
    single = one.methods["full"].estimate
    assert e.optimizer_states == -(-single.optimizer_states // 2)
    assert "FSDP" in two.message


def test_ddp_per_gpu_memory_is_about_one_gpus():
    one = est(LLAMA_1B, "lora", 4, 2048, "lean")
    ddp = est(LLAMA_1B, "lora", 4, 2048, "lean", gpus=4, strategy="ddp")
    assert one.total <= ddp.total <= 1.02 * one.total
    full1 = est(LLAMA_1B, "full", 4, 2048, "lean")
    full_ddp = est(LLAMA_1B, "full", 4, 2048, "lean", gpus=2, strategy="ddp")
    assert full_ddp.parts["ddp_buckets"] == full1.parts["gradients_all"]  # one fp32 copy of the gradients


def test_adapters_are_planned_with_ddp_even_on_several_gpus():
    p = P.plan(spec(method="lora", batch=4, seq=1024), LLAMA_1B, 80 * GiB, gpus=2)
    assert p.methods["lora"].strategy == "ddp" and p.methods["full"].strategy == "fsdp"
    with pytest.raises(ValueError, match="fsdp"):
        est(LLAMA_1B, "lora", gpus=2, strategy="fsdp")


# --- methods and optimizers move the estimate the right way ----------------------------------


def test_methods_order_their_weights_states_and_activations():
    e = {m: est(LLAMA_1B, m, speed="fast") for m in ("full", "lora", "qlora")}
    q8 = P.estimate_for_spec(spec("qlora", 4, 2048, "fast", quantization={"bits": 8}), LLAMA_1B)
    dora = P.estimate_for_spec(spec("lora", 4, 2048, "fast", lora={"use_dora": True}), LLAMA_1B)
    ia3 = est(LLAMA_1B, "ia3")
    prefix = est(LLAMA_1B, "prefix")
    freeze = P.estimate_for_spec(spec("freeze", 4, 2048, "fast", freeze={"trainable_layers": 4}), LLAMA_1B)
    assert e["qlora"].weights < q8.weights < e["lora"].weights < e["full"].weights
    assert dora.trainable_params > e["lora"].trainable_params > ia3.trainable_params
    assert dora.activations > e["lora"].activations  # DoRA saves two outputs per adapted module
    assert ia3.optimizer_states < e["lora"].optimizer_states
    assert prefix.trainable_params == P.prefix_params(P.model_shape(LLAMA_1B), 16)
    states = lambda x: x.weights + x.parts["gradients_all"] + x.optimizer_states  # noqa: E731
    assert states(e["lora"]) < states(freeze) < states(e["full"])
    assert freeze.parts["activations_stored"] < e["full"].parts["activations_stored"]
    for x in (*e.values(), q8, dora, ia3, prefix, freeze):
        assert x.weights + x.gradients + x.optimizer_states + x.activations + x.logits + x.overhead == x.total


def test_optimizers_and_precision_change_the_states():
    n = P.model_shape(LLAMA_1B).total_params
    by = {o: P.estimate_for_spec(spec("full", 1, 512, "lean", optimizer=o), LLAMA_1B)
          for o in ("adamw", "adamw_fused", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")}
    assert by["adamw"].optimizer_states == by["adamw_fused"].optimizer_states == 8 * n  # fp32 master
    assert by["adamw_8bit"].optimizer_states == 2 * n
    assert by["adamw_8bit"].total < by["adamw"].total
    paged = by["paged_adamw"]
    assert paged.allocated + paged.optimizer_states <= paged.total  # outside torch's allocator
    assert by["adamw"].allocated - paged.allocated == 8 * n
    bf16 = P.estimate_for_spec(spec("full", 1, 512, "lean", full_precision="bf16"), LLAMA_1B)
    assert bf16.weights == 2 * n and bf16.optimizer_states == 4 * n  # zeros_like(bf16 param)
    assert bf16.total < by["adamw"].total


def test_lean_saves_activations_but_not_states():
    for m in ("full", "lora", "qlora", "ia3"):
        fast, lean = est(LLAMA_1B, m, 8, 2048, "fast"), est(LLAMA_1B, m, 8, 2048, "lean")
        assert lean.parts["activations_stored"] < fast.parts["activations_stored"] / 10
        assert lean.total < fast.total
        assert lean.optimizer_states == fast.optimizer_states


# --- the loss ----------------------------------------------------------------------------------


def test_chunked_loss_logits_do_not_grow_with_the_batch():
    V, h, C = 128_256, 2048, 512
    live = {b: P.logits_bytes(V, b * 2048, out_bytes=4, chunk_tokens=C, hidden=h) for b in (1, 4, 16)}
    for b, lg in live.items():
        # Only hidden-state-sized terms grow with the tokens; the chunk's logits do not.
        assert lg["forward"] - 12 * h * b * 2048 == 6 * C * V
    whole = {b: P.logits_bytes(V, b * 2048, out_bytes=4) for b in (1, 4)}
    assert whole[4]["peak"] == 4 * whole[1]["peak"] == 4 * 16 * V * 2048
    chunked = est(LLAMA_1B, "lora", 8, 2048, "lean")
    plain = est(LLAMA_1B, "lora", 8, 2048, "lean", loss_chunk_tokens=None)
    assert chunked.loss.startswith("chunked(") and plain.loss == "whole"
    assert chunked.total < plain.total - 8 * 2048 * V * 10


def test_the_trainer_chunk_is_the_one_linear_ce_picks():
    from trainer.linear_ce import chunk_tokens

    assert est(LLAMA_1B).loss == f"chunked({chunk_tokens(128_256)})"
    assert est(LLAMA_1B, fast_path=False).loss == "whole"


# --- parameter counts of the adapter family against peft --------------------------------------


@pytest.mark.parametrize("method", ["ia3", "prefix", "dora"])
def test_trainable_counts_equal_peft(method):
    import torch
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = {"ia3": IA3Config(task_type="CAUSAL_LM"),
              "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
              "dora": LoraConfig(r=8, target_modules="all-linear", use_dora=True)}[method]
    model = get_peft_model(LlamaForCausalLM(TINY), config)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    s = spec("lora" if method == "dora" else method, 1, 32, "fast",
             **({"lora": {"r": 8, "use_dora": True}} if method == "dora" else {}))
    assert P.estimate_for_spec(s, TINY).trainable_params == real


# --- speed balanced: k of L layers checkpointed ----------------------------------------------


# Not freeze: its frozen lower layers save nothing without checkpointing, but once the bottom one is
# checkpointed the input requires a gradient and the frozen layers above it save theirs.
@pytest.mark.parametrize(("method", "extra"), [("full", {"full_precision": "bf16"}), ("full", {}), ("lora", {}),
                                               ("qlora", {})])
def test_balanced_estimate_shrinks_with_k_and_meets_lean_and_fast_at_the_ends(method, extra):
    s = {**spec(method, 8, 2048, "balanced"), **extra}
    L = LLAMA_1B.num_hidden_layers
    totals = [P.estimate_for_spec(s, LLAMA_1B, checkpoint_layers=k).total for k in range(L + 1)]
    assert all(a >= b for a, b in zip(totals, totals[1:])), totals
    fast = P.estimate_for_spec({**s, "speed": "fast"}, LLAMA_1B)
    lean = P.estimate_for_spec({**s, "speed": "lean"}, LLAMA_1B)
    assert totals[0] == fast.total and totals[L] == lean.total
    assert totals[0] > totals[L // 2] > totals[L]
    mid = P.estimate_for_spec(s, LLAMA_1B, checkpoint_layers=L // 2)
    assert mid.speed == "balanced" and mid.checkpoint_layers == L // 2 and mid.gradient_checkpointing


def test_fewest_checkpoint_layers_is_the_smallest_k_that_fits():
    s = spec("full", 8, 2048, "auto", full_precision="bf16")
    lean = P.estimate_for_spec({**s, "speed": "lean"}, LLAMA_1B).total
    fast = P.estimate_for_spec({**s, "speed": "fast"}, LLAMA_1B).total
    budget = (lean + fast) / 2
    k = P.fewest_checkpoint_layers(s, LLAMA_1B, budget)
    assert 0 < k < LLAMA_1B.num_hidden_layers
    assert P.estimate_for_spec(s, LLAMA_1B, speed="balanced", checkpoint_layers=k).total <= budget
    assert P.estimate_for_spec(s, LLAMA_1B, speed="balanced", checkpoint_layers=k - 1).total > budget
    assert P.fewest_checkpoint_layers(s, LLAMA_1B, fast) == 0
    assert P.fewest_checkpoint_layers(s, LLAMA_1B, lean - 1) is None
    # balanced without a count is planned as its worst case, lean.
    assert P.estimate_for_spec({**s, "speed": "balanced"}, LLAMA_1B).total == lean
    with pytest.raises(ValueError, match="checkpoint_layers: 17 is outside 0..16"):
        P.estimate_for_spec(s, LLAMA_1B, speed="balanced", checkpoint_layers=17)



@pytest.mark.parametrize(("method", "k", "extra", "residual_bytes"),
                         [("lora", 8, {}, 2), ("qlora", 8, {}, 2), ("lora", 4, {}, 2), ("lora", 1, {}, 2),
                          ("full", 12, {"full_precision": "bf16"}, 2), ("full", 3, {}, 4)])
def test_checkpoint_offload_keeps_two_checkpointed_inputs_on_the_gpu(method, k, extra, residual_bytes):
    """The checkpointed layers' inputs (tokens x hidden x residual bytes each) leave the GPU but for
    the one in use and the one prefetched: where the peak holds them (the loss's forward or the top
    layer's backward, for speed balanced), the allocated estimate drops by (k - 2) inputs and the
    total by that plus its fragmentation share; nothing else moves."""
    batch, seq = 8, 2048
    s = spec(method, batch, seq, "balanced", checkpoint_layers=k, **extra)
    plain = P.estimate_for_spec(s, LLAMA_1B)
    offload = P.estimate_for_spec({**s, "checkpoint_offload": True}, LLAMA_1B)
    one_input = batch * seq * LLAMA_1B.hidden_size * residual_bytes
    moved = max(0, k - 2) * one_input
    assert plain.parts["activations_stored"] - offload.parts["activations_stored"] == moved
    assert plain.peak_at == offload.peak_at and plain.peak_at in ("loss_forward", "layer_backward")
    assert plain.allocated - offload.allocated == moved
    share = plain.parts["fragmentation"] / plain.allocated
    assert plain.total - offload.total == pytest.approx(moved * (1 + share), rel=1e-6, abs=16)
    assert offload.weights == plain.weights and offload.optimizer_states == plain.optimizer_states
    assert any("checkpoint_offload" in n for n in offload.notes) == (k > 2)
    # The keyword overrides the spec; speed fast checkpoints nothing, so there is nothing to move.
    assert P.estimate_for_spec(s, LLAMA_1B, checkpoint_offload=True).total == offload.total
    fast = {**s, "speed": "fast", "checkpoint_layers": None}
    assert P.estimate_for_spec({**fast, "checkpoint_offload": True}, LLAMA_1B).total == P.estimate_for_spec(fast, LLAMA_1B).total


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_checkpoint_offload_on_lean_moves_14_of_16_inputs_off_the_peak(method):
    """Llama-3.2-1B, batch 8 x 2048, lean: 14 of 16 layers' 64 MiB inputs (0.875 GiB) leave the GPU.
    Lean's peak is the top layer's backward (every checkpointed input still held, that layer
    recomputed, its gradient buffers), so the allocated peak drops by exactly those inputs, as a
    LoRA job's measured peak did (bench/results)."""
    s = spec(method, 8, 2048, "lean")
    plain = P.estimate_for_spec(s, LLAMA_1B)
    offload = P.estimate_for_spec({**s, "checkpoint_offload": True}, LLAMA_1B)
    moved = plain.parts["activations_stored"] - offload.parts["activations_stored"]
    assert moved / GiB == pytest.approx(0.875)
    assert plain.peak_at == offload.peak_at == "layer_backward"
    assert plain.allocated - offload.allocated == moved
