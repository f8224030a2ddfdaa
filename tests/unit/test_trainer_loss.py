"""Gradient accumulation normalises the loss over all label tokens of the accumulation window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.data.batch import collate
from trainer.data.parse import parse_example
from trainer.data.tokenize import tokenize_messages
from trainer.loss_heads import token_loss_sum
from trainer.step import forward_backward

ANSWERS = ["Yes.", "Two plus two is four, and four plus four is eight.", "Paris.", "The moon takes about twenty seven days to go around the earth."]


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = [
        tokenize_messages(tok, parse_example({"messages": [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": a}]}))
        for a in ANSWERS
    ]
    return Accelerator(cpu=True), model, tok, examples


def grads_of(model, fn) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    fn()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_accumulated_micro_batches_equal_one_big_batch(setup):
    accelerator, model, tok, examples = setup
    label_counts = [sum(1 for x in e["labels"][1:] if x != -100) for e in examples]
    assert len(set(label_counts)) == len(label_counts), "the test needs examples of different lengths"

    one_batch = [collate(examples, tok.pad_token_id)]
    four_micro = [collate([e], tok.pad_token_id) for e in examples]
    big = grads_of(model, lambda: forward_backward(model, one_batch, accelerator))
    res = {}
    accumulated = grads_of(model, lambda: res.update(forward_backward(model, four_micro, accelerator)))
    # fp32 sums in another order differ by rounding (~1e-7 absolute); averaging errors are far larger.
    torch.testing.assert_close(accumulated, big, rtol=1e-4, atol=1e-6)

    # The reported loss is the token mean over the whole window.
    with torch.no_grad():
        total, n = 0.0, 0
        for mb in four_micro:
            s, k = token_loss_sum(model(input_ids=mb["input_ids"]).logits, mb["labels"])
            total, n = total + float(s), n + int(k)
    assert res["label_tokens"] == n == sum(label_counts)
    assert res["loss_sum"] / res["label_tokens"] == pytest.approx(total / n, rel=1e-5)

    # Averaging per-micro-batch means would give measurably different gradients here.
    def mean_of_means():
        for mb in four_micro:
            s, k = token_loss_sum(model(input_ids=mb["input_ids"]).logits, mb["labels"])
            (s / k / len(four_micro)).backward()

    naive = grads_of(model, mean_of_means)
    assert not torch.allclose(naive, big, rtol=1e-3, atol=1e-6)
