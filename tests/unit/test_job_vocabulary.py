"""One job vocabulary: the API's request takes the spec's fields with the spec's types, not copies."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError

from api.job_spec import BASE_LEARNING_RATE, _Method, _method_fields, _parse_method, method_view
from api.schemas import SHAPED, SPEC_FIELDS, CreateJobRequest
from trainer.spec import METHOD_SETTINGS, METHODS, JobSpec


def test_every_spec_field_is_a_request_field_or_shaped_by_the_request() -> None:
    request = CreateJobRequest.model_fields
    for name, f in JobSpec.model_fields.items():
        if name in SHAPED:
            continue
        assert name in SPEC_FIELDS and name in request, name
        # The spec's own type (optional in the request), with its limits and description.
        assert f.annotation in get_args(request[name].annotation) or request[name].annotation == f.annotation | None, name
        assert all(m in request[name].metadata for m in f.metadata), name


def test_request_enums_are_the_specs() -> None:
    bad = {"speed": "turbo", "strategy": "zero3", "precision": "fp8", "full_precision": "fp16", "optimizer": "sgd",
           "data_format": "xml"}
    for name, value in bad.items():
        with pytest.raises(ValidationError) as err:
            CreateJobRequest(model="m", training_file="f", **{name: value})
        allowed = get_args(JobSpec.model_fields[name].annotation)
        assert all(repr(a) in str(err.value) for a in allowed), (name, str(err.value))


def test_every_method_has_its_settings_fields_and_a_base_learning_rate() -> None:
    assert set(METHOD_SETTINGS) == set(METHODS) == set(BASE_LEARNING_RATE)
    for names in METHOD_SETTINGS.values():
        assert all(n in JobSpec.model_fields for n in names)
    described = CreateJobRequest.model_fields["method"].description
    assert all(repr(m) in described for m in METHODS)


@pytest.mark.parametrize("method, body", [
    ("lora", {"r": 8, "use_dora": True}),
    ("qlora", {"r": 4, "quantization": {"bits": 8}}),
    ("ia3", {"target_modules": ["k_proj"]}),
    ("prefix", {"num_virtual_tokens": 4}),
    ("freeze", {"trainable_layers": 1}),
    ("full", {}),
])
def test_a_method_body_goes_into_the_spec_and_comes_back_out(method: str, body: dict) -> None:
    fields = _method_fields(_Method(name=method, type_key=method, lora=dict(body)))
    spec = JobSpec.model_validate({"model": "m", "training_file": "t", "method": method, **fields})
    shown = method_view(spec.model_dump(mode="json"), {"n_epochs": 1})
    # OpenAI's shape, which its SDK's types accept; tuneq's method inside.
    assert shown["type"] == "supervised" and set(shown) == {"type", "supervised"}
    assert shown["supervised"]["method"] == method and shown["supervised"]["hyperparameters"] == {"n_epochs": 1}
    # What a job shows is a creation request's method for the same spec.
    again = _parse_method(shown)
    assert again.name == method and again.objective == "sft" and again.hyperparameters == {"n_epochs": 1}
    respec = JobSpec.model_validate({"model": "m", "training_file": "t", "method": method, **_method_fields(again)})
    assert respec == spec


def test_the_cli_offers_every_method_of_the_spec() -> None:
    from typer.testing import CliRunner

    from tuneq import cli

    result = CliRunner().invoke(cli.app, ["submit", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert " | ".join(METHODS) in result.output
