"""The chat completion body: OpenAI's fields, strict numbers, and refusals that name the field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from api.chat import ChatCompletionRequest
from api.errors import first_validation_error

BASE = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("change", "param"), [
    ({"temperature": True}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5.0}, "max_tokens"),
    ({"max_completion_tokens": "5"}, "max_completion_tokens"),
    ({"n": 2}, "n"),
    ({"stream": "true"}, "stream"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
])
def test_bad_fields_are_named(change, param):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(json.dumps({**BASE, **change}))
    assert first_validation_error(info.value.errors())[1] == param


def test_what_the_sdk_sends_is_accepted():
    body = ChatCompletionRequest.model_validate_json(json.dumps({
        **BASE, "messages": [{"role": "developer", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}],
        "temperature": 0, "top_p": 1, "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
        "stop": "\n", "seed": 3, "presence_penalty": 0, "frequency_penalty": 0.0, "user": "someone"}))
    assert [m.plain() for m in body.messages] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert body.stops() == ["\n"] and body.temperature == 0.0


@pytest.mark.parametrize(("model", "suffix", "base"), [("tiny-llama", None, "tiny-llama"), ("org/name", "bot", "org/name"),
                                                       ("/models/llama/", "x", "llama")])
def test_a_checkpoint_keeps_its_model_name_when_its_job_succeeds(model: str, suffix: str | None, base: str) -> None:
    """Clients read checkpoint names from a running job's checkpoint list and chat with them later:
    the name must not change when the job succeeds and gets its fine_tuned_model."""
    from core.inference import checkpoint_model_name, fine_tuned_model_name
    from core.models import Job

    job = Job(id="ftjob-" + "a" * 24, model=model, suffix=suffix, fine_tuned_model=None)
    training = checkpoint_model_name(job, 7)
    job.fine_tuned_model = fine_tuned_model_name(job)
    assert job.fine_tuned_model == f"ft:{base}:{suffix or 'tuneq'}:{job.id}"
    assert checkpoint_model_name(job, 7) == training == f"{job.fine_tuned_model}:ckpt-step-7"
