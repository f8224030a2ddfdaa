"""JobSpec refuses bad jobs before any weight is loaded, naming the field and the allowed range."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainer.cli import format_validation_error
from trainer.spec import JobSpec

BASE = {"model": "/models/tiny", "training_file": "/data/train.jsonl"}


def _error(**overrides) -> str:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({**BASE, **overrides})
    return format_validation_error(info.value)


def test_defaults_are_valid():
    spec = JobSpec.model_validate(BASE)
    assert spec.method == "lora"
    assert spec.effective_batch() == 4


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate": 2.0}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"max_seq_len": 4}}, "hyperparameters.max_seq_len"),
        ({"hyperparameters": {"max_grad_norm": -1}}, "hyperparameters.max_grad_norm"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout"),
        ({"schedule": {"keep_checkpoints": 0}}, "schedule.keep_checkpoints"),
        ({"method": "dora"}, "method"),
        ({"hyperparameters": {"batch_sise": 4}}, "hyperparameters.batch_sise"),
    ],
)
def test_out_of_range_names_the_field(overrides, field):
    message = _error(**overrides)
    assert message.startswith(field + ":"), message
    assert "\n" not in message


def test_cross_field_checks_name_field_and_range():
    message = _error(hyperparameters={"max_steps": 10, "warmup_steps": 20})
    assert "hyperparameters.warmup_steps" in message and "0..10" in message
    assert "lora" in _error(method="full", lora={"r": 8})
    assert "lora.target_modules" in _error(lora={"target_modules": []})
    assert "lora.target_modules" in _error(lora={"target_modules": ["q_proj;rm -rf"]})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_that_is_not_finite_is_named_so(value):
    # JSON bodies may carry NaN and Infinity; "above the maximum" would be the wrong reason.
    message = _error(hyperparameters={"learning_rate": value})
    assert message.startswith("hyperparameters.learning_rate:") and "finite number" in message, message
