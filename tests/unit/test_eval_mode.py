"""Evaluation must not change how a QLoRA model trains afterwards (trainer.eval_mode)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def _qlora(make_spec):
    from trainer.methods import apply_method
    from trainer.model import load_model

    # Dropout keeps peft's own LoRA layers (the fused path would hide a broken base backward).
    spec = make_spec("qlora", lora={"r": 8, "alpha": 16, "dropout": 0.1})
    model = apply_method(load_model(spec, "fp32", torch.device("cpu")), spec)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _lora_grads(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks in both models
    model(input_ids=ids).logits.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_validation_pass_leaves_qlora_training_unchanged(tiny_model_dir: Path, make_spec):
    import bitsandbytes as bnb

    from trainer.eval_mode import evaluation

    model = _qlora(make_spec).train()  # as the trainer runs it (loaded, the 4-bit layers are in eval mode)
    never_evaluated = copy.deepcopy(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), evaluation(model):
        assert not any(m.training for m in model.modules() if "dropout" in type(m).__name__.lower())
        model(input_ids=ids)
    assert model.training

    # bitsandbytes repacks a weight for its gradient-less bf16 kernel (on AVX512-BF16 CPUs) only
    # when the layer was in eval mode; none may have been.
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    got, want = _lora_grads(model, ids), _lora_grads(never_evaluated, ids)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
