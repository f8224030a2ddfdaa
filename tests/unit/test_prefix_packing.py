"""Prefix tuning and packing do not mix: the refusal, and the leak it prevents.

peft hands prefix tuning's virtual tokens to the model as a key/value cache; transformers then
builds no block-diagonal mask for packed rows, so a packed example attends to the ones before it.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from trainer.spec import JobSpec


def test_the_spec_refuses_prefix_with_packing_naming_packing(make_spec) -> None:
    with pytest.raises(ValidationError, match=r"packing: not supported with method 'prefix'"):
        make_spec("prefix", packing=True)
    assert make_spec("prefix").packing is False and make_spec("lora", packing=True).packing is True


def test_packed_rows_under_a_prefix_leak_between_examples(tiny_model_dir) -> None:
    """Why the refusal exists; should transformers or peft ever mask this case, this test says so."""
    from transformers import AutoModelForCausalLM

    from trainer.data.batch import collate, model_inputs
    from trainer.data.dataset import pack
    from trainer.methods import apply_method

    spec = JobSpec.model_validate({"model": str(tiny_model_dir), "method": "prefix", "training_file": "x.jsonl"})
    torch.manual_seed(0)
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), spec).eval()

    def second_logits(first: list[int]) -> torch.Tensor:
        second = [5, 6, 7, 8, 9]
        rows = pack([{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}], 16)
        assert len(rows) == 1
        batch = collate(rows, pad_id=0)
        with torch.no_grad():
            logits = model(**model_inputs(batch, "cpu")).logits
        return logits[0, len(first):len(first) + len(second)]

    moved = (second_logits([10, 11, 12]) - second_logits([20, 21, 22])).abs().max()
    assert moved > 1e-3
