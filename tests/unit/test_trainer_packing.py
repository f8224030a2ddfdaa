"""Packing: whole examples per row, no attention across examples, the same loss as unpacked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.data.batch import collate, model_inputs
from trainer.data.dataset import pack
from trainer.data.parse import parse_record
from trainer.data.tokenize import IGNORE_INDEX, tokenize_record
from trainer.loss_heads import token_loss_sum
from trainer.step import forward_backward

ANSWERS = [
    "Yes.", "Two plus two is four, and four plus four is eight.", "Paris.",
    "The moon takes about twenty seven days to go around the earth.", "Green.", "Seven days make a week.",
]


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Loaded as a user would, KV cache enabled in the config: packing must not depend on the
    # trainer having switched it off.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    assert model.config.use_cache
    examples = []
    for i, a in enumerate(ANSWERS):
        obj = {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]}
        ex = tokenize_record(tok, parse_record(obj, "chat"))
        examples.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
    return Accelerator(cpu=True), model, tok, examples


def per_example_losses(logits: torch.Tensor, batch: dict, row: int) -> list[tuple[float, int]]:
    positions = batch["position_ids"][row].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    out = []
    for a, b in zip(starts, starts[1:], strict=False):
        s, n = token_loss_sum(logits[row : row + 1, a:b], batch["labels"][row : row + 1, a:b])
        if int(n):
            out.append((float(s), int(n)))
    return out


def test_pack_fills_rows_with_whole_examples():
    examples = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (9, 3, 7, 2, 5, 1, 8)]
    rows = pack(examples, 10)
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    assert len(rows) == 4  # 35 tokens in rows of 10: best-fit reaches the minimum
    pieces = []
    for r in rows:
        assert len(r["position_ids"]) == len(r["input_ids"]) == len(r["labels"])
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["position_ids"])]
        pieces += [r["input_ids"][a:b] for a, b in zip(starts, starts[1:], strict=False)]
    assert sorted(map(len, pieces)) == sorted(len(e["input_ids"]) for e in examples)
    assert all(p == list(range(len(p))) for p in pieces)  # positions restart per example


def test_collate_gives_packed_padding_a_block_of_its_own():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 0, 1]},
                     {"input_ids": [8], "labels": [-100], "position_ids": [0]}], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert set(model_inputs(batch, "cpu")) == {"input_ids", "position_ids", "use_cache"}


@torch.no_grad()
def test_packed_rows_give_each_example_its_unpacked_loss(setup):
    _, model, tok, examples = setup
    model.eval()
    unpacked = []
    for ex in examples:
        single = collate([ex], tok.pad_token_id)
        s, n = token_loss_sum(model(**model_inputs(single, "cpu")).logits, single["labels"])
        unpacked.append((float(s), int(n)))
    rows = pack(examples, 48)
    assert len(rows) < len(examples) and any(r["position_ids"].count(0) >= 2 for r in rows)
    batch = collate(rows, tok.pad_token_id)
    logits = model(**model_inputs(batch, "cpu")).logits
    packed = [loss for row in range(len(rows)) for loss in per_example_losses(logits, batch, row)]
    assert len(packed) == len(examples)
    # Each packed example is matched to its unpacked twin by its label count and loss.
    for s, n in packed:
        twin = min((u for u in unpacked if u[1] == n), key=lambda u: abs(u[0] - s))
        assert abs(s - twin[0]) / n < 1e-5, (s, twin)
    assert sum(s for s, _ in packed) == pytest.approx(sum(s for s, _ in unpacked), rel=1e-5)
    # Without position ids, the same rows would attend across examples: the test can tell.
    crossed = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert not torch.allclose(crossed, logits, atol=1e-3)


def test_packed_step_has_the_loss_and_gradients_of_the_unpacked_step(setup):
    accelerator, model, tok, examples = setup
    model.train()

    def grads(batches):
        model.zero_grad(set_to_none=True)
        res = forward_backward(model, batches, accelerator)
        return res, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain, g_plain = grads([collate(examples, tok.pad_token_id)])
    packed, g_packed = grads([collate(pack(examples, 48), tok.pad_token_id)])
    assert packed["label_tokens"] == plain["label_tokens"]
    assert packed["loss_sum"] / packed["label_tokens"] == pytest.approx(plain["loss_sum"] / plain["label_tokens"], rel=1e-5)
    torch.testing.assert_close(g_packed, g_plain, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_first_token_of_every_example_is_never_a_target(setup):
    _, _, _, examples = setup
    assert all(ex["labels"][0] == IGNORE_INDEX for ex in examples)
