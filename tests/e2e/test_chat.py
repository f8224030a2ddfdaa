"""Chat completions on the running stack: API, training worker and inference server as processes.

One LoRA job learns to reverse two words (once per session); the official `openai` SDK then
chats with it, its checkpoint and its base, whole and streamed, and bad requests get their 4xx.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time

import httpx
import pytest

from tests.e2e.conftest import Stack, _member_key, dump_logs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WORDS = ("apple", "river")
SYSTEM = {"role": "system", "content": "You reverse words."}


def ask(word: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": f"Reverse: {word}"}]


@pytest.fixture(scope="module")
def chat_stack(shared_stack: Stack, chat_server) -> Stack:
    tag = secrets.token_hex(4)
    return dataclasses.replace(shared_stack, key=_member_key(shared_stack.env["TUNEQ_DATABASE_URL"], f"chat-{tag}", f"chat-{tag}"))


@pytest.fixture(scope="module")
def trained(chat_stack: Stack) -> dict:
    """A job that answers "Reverse: apple" with "elppa" (twenty steps on two words)."""
    lines = [json.dumps({"messages": [*ask(w), {"role": "assistant", "content": w[::-1]}]}) for _ in range(16) for w in WORDS]
    with chat_stack.client() as c:
        f = c.post("/v1/files", files={"file": ("rev.jsonl", ("\n".join(lines) + "\n").encode(), "application/jsonl")},
                   data={"purpose": "fine-tune"}).json()
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": f["id"], "seed": 7,
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32}},
            "hyperparameters": {"max_steps": 20, "batch_size": 8, "learning_rate": 0.01, "max_seq_len": 64},
            "schedule": {"checkpoint_every_steps": 10}})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 600
        while (job := c.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, dump_logs(chat_stack)
            time.sleep(0.5)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(chat_stack)}"
        job["checkpoints"] = c.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    return job


def sdk(stack: Stack):
    from openai import OpenAI

    return OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key, timeout=180, max_retries=0)


def test_the_sdk_gets_the_learned_answer_where_the_base_model_does_not(chat_stack, trained):
    client = sdk(chat_stack)
    tuned = client.chat.completions.create(model=trained["fine_tuned_model"], messages=ask("apple"), temperature=0, max_tokens=12)
    assert tuned.object == "chat.completion" and tuned.model == trained["fine_tuned_model"]
    assert tuned.choices[0].message.content.strip() == "elppa", dump_logs(chat_stack)
    assert tuned.choices[0].finish_reason == "stop"
    assert tuned.usage.prompt_tokens > 0 and tuned.usage.completion_tokens > 0
    base = client.chat.completions.create(model="tiny-llama", messages=ask("apple"), temperature=0, max_tokens=12)
    assert "elppa" not in base.choices[0].message.content

    stream = client.chat.completions.create(model=trained["fine_tuned_model"], messages=ask("river"), temperature=0,
                                            max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip() == "revir"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_the_sdk_lists_the_trained_model_and_continues_training_it(chat_stack, trained):
    client = sdk(chat_stack)
    name = trained["fine_tuned_model"]
    assert name in [m.id for m in client.models.list()]
    model = client.models.retrieve(name)
    assert model.id == name and model.created == trained["finished_at"]
    ck = trained["checkpoints"][0]["fine_tuned_model_checkpoint"]
    assert client.models.retrieve(ck).id == ck
    # OpenAI's way to continue training a fine-tuned model: name it as the new job's model.
    job = client.fine_tuning.jobs.create(model=name, training_file=trained["training_file"],
                                         hyperparameters={"n_epochs": 1})
    assert job.model == "tiny-llama" and job.status in ("validating_files", "queued")
    client.fine_tuning.jobs.cancel(job.id)


def test_the_results_file_holds_the_jobs_figures_per_step(chat_stack, trained):
    """OpenAI's result_files: the SDK reads the job's curve as CSV through the Files API."""
    import csv
    import io

    from openai import BadRequestError, NotFoundError

    client = sdk(chat_stack)
    job = client.fine_tuning.jobs.retrieve(trained["id"])
    [file_id] = job.result_files
    meta = client.files.retrieve(file_id)
    assert meta.purpose == "fine-tune-results" and meta.filename == "step_metrics.csv" and meta.status == "processed"
    assert file_id in [f.id for f in client.files.list(purpose="fine-tune-results")]
    content = client.files.content(file_id)
    assert content.response.headers["content-type"].startswith("text/csv") and len(content.content) == meta.bytes
    rows = list(csv.DictReader(io.StringIO(content.text)))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))  # every step of the twenty, once
    assert all(float(r["train_loss"]) > 0 for r in rows) and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    # The same figures as the job's metrics events.
    events = [e for e in client.fine_tuning.jobs.list_events(trained["id"], limit=100) if e.type == "metrics"]
    last = max(events, key=lambda e: e.data["step"])
    assert float(rows[-1]["train_loss"]) == pytest.approx(last.data["train_loss"])
    # It is nobody's training data, and another team's member cannot read it.
    with pytest.raises(BadRequestError, match="purpose"):
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=file_id)
    other = _member_key(chat_stack.env["TUNEQ_DATABASE_URL"], f"other-{secrets.token_hex(4)}", f"other-{secrets.token_hex(4)}")
    with pytest.raises(NotFoundError):
        sdk(dataclasses.replace(chat_stack, key=other)).files.content(file_id)


def test_the_raw_stream_ends_with_done(chat_stack, trained):
    body = {"model": trained["fine_tuned_model"], "messages": ask("apple"), "temperature": 0, "max_tokens": 12, "stream": True}
    with chat_stack.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for d in data[:-1]).strip() == "elppa"


def test_a_checkpoint_answers_by_its_model_name(chat_stack, trained):
    ck = next(ck for ck in trained["checkpoints"] if ck["step_number"] == 10)
    answer = sdk(chat_stack).chat.completions.create(model=ck["fine_tuned_model_checkpoint"], messages=ask("apple"),
                                                     temperature=0, max_tokens=12)
    assert answer.model == ck["fine_tuned_model_checkpoint"] and answer.choices[0].finish_reason in ("stop", "length")


def refusal(stack: Stack, body: dict, key: str | None = None) -> httpx.Response:
    with httpx.Client(base_url=stack.url, timeout=120, headers={"Authorization": f"Bearer {key or stack.key}"}) as c:
        return c.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize(("change", "status", "param"), [
    ({"model": "no-such-model"}, 404, "model"),
    ({"model": "ft:tiny-llama:x:ftjob-000000000000000000000000"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),
    ({"max_tokens": 10**6}, 400, "max_tokens"),
    ({"max_tokens": 2040}, 400, "max_tokens"),  # fits the service's cap, not the context after the prompt
    ({"temperature": 3}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"n": 2}, 400, "n"),
    ({"max_tokens": True}, 400, "max_tokens"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({"logprobs": True}, 400, "logprobs"),
])
def test_bad_requests_name_their_field(chat_stack, change, status, param):
    r = refusal(chat_stack, {"model": "tiny-llama", "messages": ask("apple"), **change})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_another_users_model_is_not_found(chat_stack, trained):
    other = _member_key(chat_stack.env["TUNEQ_DATABASE_URL"], f"other-{secrets.token_hex(4)}", f"other-{secrets.token_hex(4)}")
    for model in (trained["fine_tuned_model"], trained["checkpoints"][0]["fine_tuned_model_checkpoint"]):
        r = refusal(chat_stack, {"model": model, "messages": ask("apple")}, key=other)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["param"] == "model" and r.json()["error"]["type"] == "not_found_error"
    # The same answer as for a name that never existed: nothing confirms the model is there.
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        sdk(dataclasses.replace(chat_stack, key=other)).chat.completions.create(model=trained["fine_tuned_model"], messages=ask("apple"))
