"""The planner with optimizer_in_backward: each decoder layer's gradients are freed by its AdamW
step in backward, so the end of backward holds the non-layer gradients and one layer's only."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from transformers import LlamaConfig

from trainer import planning as P

GiB = 1024**3
MiB = 1024**2


def llama(hidden, layers, heads, kv, ffn, vocab, tied) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied)


LLAMA_1B = llama(2048, 16, 32, 8, 8192, 128_256, True)  # Llama-3.2-1B's shape
LLAMA_8B = llama(4096, 32, 32, 8, 14_336, 128_256, False)  # Llama-3-8B's shape


def spec(method="full", batch=8, seq=2048, speed="lean", **extra):
    return {"model": "x", "method": method, "speed": speed, "full_precision": "bf16",
            "hyperparameters": {"batch_size": batch, "max_seq_len": seq, "max_grad_norm": 0}, **extra}


def pair(config, **kw):
    """(off, on): the same job planned without and with optimizer_in_backward."""
    s = spec(**kw)
    return P.estimate_for_spec(s, config), P.estimate_for_spec({**s, "optimizer_in_backward": True}, config)


def _unchanged_but_gradients(off, on):
    assert (on.weights, on.optimizer_states, on.activations, on.logits, on.peak_at) == \
        (off.weights, off.optimizer_states, off.activations, off.logits, off.peak_at)
    assert on.parts["gradients_all"] == off.parts["gradients_all"]  # every gradient still exists, in turn


def test_full_bf16_lean_holds_one_layers_gradients_instead_of_all():
    off, on = pair(LLAMA_1B)
    shape = P.model_shape(LLAMA_1B)
    layer_grads = shape.layers * shape.layer_params * 2  # bf16: ~1.8 GiB
    one_layer = shape.layer_params * 2
    non_layer = (shape.total_params - shape.layers * shape.layer_params) * 2  # tied embedding, final norm
    assert layer_grads > 1.75 * GiB
    # Without the gradients piling up, the end of backward is no longer the peak: the top layer's
    # backward is (every checkpointed input, that layer recomputed), with the head's gradient
    # (made by the chunked loss) and the top layer's own.
    assert off.peak_at == "backward_end" and on.peak_at == "layer_backward"
    assert off.allocated - on.allocated >= 1.0 * GiB
    assert on.parts["gradients_freed_in_backward"] == layer_grads - one_layer
    # Tied: the head's gradient (from the loss) and the embedding's (backward's last op) are two
    # non-layer buffers until they are summed, which happens after layer 0's step freed its grads.
    tie = on.parts["tied_grad_transient"]
    assert tie == shape.vocab * shape.hidden * 2
    assert on.gradients <= non_layer + tie + one_layer
    assert on.gradients == tie + one_layer
    assert f"{on.parts['gradients_freed_in_backward'] / GiB:.1f} GiB of gradients never held" in on.notes[-1]


def test_untied_model_keeps_the_non_layer_gradients_and_one_layer():
    off, on = pair(LLAMA_8B, batch=1)
    shape = P.model_shape(LLAMA_8B)
    non_layer = (shape.total_params - shape.layers * shape.layer_params) * 2  # embedding, lm_head, final norm
    assert on.peak_at == "backward_end" and on.parts["tied_grad_transient"] == 0
    assert on.gradients == non_layer + shape.layer_params * 2
    assert off.allocated - on.allocated == (shape.layers - 1) * shape.layer_params * 2
    _unchanged_but_gradients(off, on)


def test_plan_reads_the_spec_field():
    s = spec()
    on = P.plan({**s, "optimizer_in_backward": True}, LLAMA_1B, 140 * GiB).methods["full"].estimate
    off = P.plan(s, LLAMA_1B, 140 * GiB).methods["full"].estimate
    assert on == P.estimate_for_spec({**s, "optimizer_in_backward": True}, LLAMA_1B)
    assert off.allocated - on.allocated >= 1.0 * GiB


def test_a_jobspec_is_read_as_a_mapping_is():
    from trainer.spec import JobSpec

    hp = {"batch_size": 8, "max_seq_len": 2048, "max_grad_norm": 0}
    job = JobSpec(model="m", training_file="t", method="full", speed="lean", full_precision="bf16",
                  optimizer_in_backward=True, hyperparameters=hp)
    mapping = {**spec(), "optimizer_in_backward": True}
    assert P.estimate_for_spec(job, LLAMA_1B) == P.estimate_for_spec(mapping, LLAMA_1B)


@pytest.mark.parametrize("speed", ["lean", "fast"])
def test_lora_changes_only_by_the_adapter_gradients(speed):
    off, on = pair(LLAMA_1B, method="lora", speed=speed)
    shape = P.model_shape(LLAMA_1B)
    per_layer = shape.lora_params(16) // shape.layers  # all-linear: every adapter is in a layer
    freed = on.parts["gradients_freed_in_backward"]
    assert freed == (shape.layers - 1) * per_layer * 4 and freed < 64 * MiB
    # The whole difference is those gradients when the peak is the end of backward, none otherwise.
    assert off.allocated - on.allocated == (freed if on.peak_at == "backward_end" else 0)
    _unchanged_but_gradients(off, on)


def test_freeze_and_prefix_free_only_what_trains_in_the_layers():
    shape = P.model_shape(LLAMA_1B)
    _, freeze = pair(LLAMA_1B, method="freeze", freeze={"trainable_layers": 4})
    assert freeze.parts["gradients_freed_in_backward"] == 3 * shape.layer_params * 2
    # Prefix tuning's encoder sits outside the layers: it waits for step() like an embedding.
    _, prefix = pair(LLAMA_1B, method="prefix", speed="fast")
    assert prefix.parts["gradients_freed_in_backward"] == 0


def test_default_is_byte_identical_to_omitting_it():
    for s in (spec(), spec(method="lora"), spec(method="auto", batch="auto", speed="auto")):
        omitted = P.plan(s, LLAMA_1B, 80 * GiB, dataset_tokens=10**6).to_dict()
        false = P.plan({**s, "optimizer_in_backward": False}, LLAMA_1B, 80 * GiB, dataset_tokens=10**6).to_dict()
        assert json.dumps(false, sort_keys=True) == json.dumps(omitted, sort_keys=True)
    shape = P.model_shape(LLAMA_1B)
    kw = dict(method="full", batch_size=8, seq_len=2048, gradient_checkpointing=True, optimizer="adamw")
    default = P.estimate_memory(shape, **kw)
    assert P.estimate_memory(shape, optimizer_in_backward=False, **kw) == default
    assert "gradients_freed_in_backward" not in default.parts


def test_what_the_trainer_refuses_is_not_planned():
    shape = P.model_shape(LLAMA_1B)
    kw = dict(method="full", batch_size=1, seq_len=256, optimizer_in_backward=True)
    for bad in ({"gpus": 2}, {"gradient_accumulation_steps": 2}, {"optimizer": "adamw_8bit"}):
        with pytest.raises(ValueError, match="optimizer_in_backward: runs on one GPU"):
            P.estimate_memory(shape, **{"optimizer": "adamw", **kw, **bad})
    # On several GPUs (the trainer refuses it there) a plan is made without it, and says so.
    s = {**spec(), "optimizer_in_backward": True}
    two = P.estimate_for_spec(s, LLAMA_1B, gpus=2, strategy="fsdp")
    assert "planned without it on 2 GPUs" in two.notes[-1]
    assert replace(two, notes=two.notes[:-1]) == P.estimate_for_spec(spec(), LLAMA_1B, gpus=2, strategy="fsdp")
