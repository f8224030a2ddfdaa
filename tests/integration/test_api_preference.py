"""Preference jobs through the official openai SDK (in process): OpenAI's DPO shape, tuneq's SimPO
and ORPO in the same shape, preference files checked line by line, bad input named by field."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient

from tests.integration.test_api_cli import job_row, runner  # noqa: F401 - runner is a fixture

pytestmark = pytest.mark.timeout(900)  # building the tiny model on a busy machine is most of it


def pair(word: str) -> dict:
    return {"input": {"messages": [{"role": "user", "content": f"Reverse: {word}"}]},
            "preferred_output": [{"role": "assistant", "content": word[::-1]}],
            "non_preferred_output": [{"role": "assistant", "content": word}]}


PAIRS = [pair(w) for w in ("apple", "river", "stone", "cloud")]
CHAT = [{"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]}]


@pytest.fixture
def sdk(service_env: dict[str, str], admin_key: str) -> Iterator[openai.OpenAI]:
    from api.main import create_app

    with TestClient(create_app()) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=admin_key, http_client=http, max_retries=0)


def upload(sdk: openai.OpenAI, rows: list) -> openai.types.FileObject:
    body = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    return sdk.files.create(file=("prefs.jsonl", body), purpose="fine-tune")


def test_a_dpo_job_in_openais_shape(sdk: openai.OpenAI) -> None:
    f = upload(sdk, PAIRS)
    assert f.status == "processed" and f.validation["format"] == "preference"
    job = sdk.fine_tuning.jobs.create(
        model="tiny-llama", training_file=f.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 2}}},
    )
    assert job.method.type == "dpo"
    assert job.method.dpo.hyperparameters.beta == 0.2 and job.method.dpo.hyperparameters.n_epochs == 2
    assert job.method.dpo.method == "lora"
    auto = sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, method={"type": "dpo"})
    assert auto.method.dpo.hyperparameters.beta == "auto"
    # The preference learning rate starts at a tenth of the method's.
    assert auto.hyperparameters.learning_rate_multiplier == pytest.approx(1.0)
    assert auto.method.dpo.hyperparameters.learning_rate == pytest.approx(2e-5)
    full = sdk.fine_tuning.jobs.create(
        model="tiny-llama", training_file=f.id,
        method={"type": "simpo", "simpo": {"method": "qlora", "lora": {"r": 4}, "quantization": {"bits": 8},
                                            "hyperparameters": {"beta": 2.5, "gamma": 0.5}}},
    )
    assert full.method.type == "simpo"
    body = full.method.simpo
    assert body["method"] == "qlora" and body["lora"]["r"] == 4 and body["quantization"]["bits"] == 8
    assert body["hyperparameters"]["gamma"] == 0.5
    orpo = sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                       method={"type": "orpo", "orpo": {"method": "full"}})
    assert orpo.method.orpo["method"] == "full"
    supervised = sdk.fine_tuning.jobs.create(
        model="tiny-llama", training_file=upload(sdk, CHAT).id,
        method={"type": "supervised", "supervised": {"method": "lora", "lora": {"r": 8}}},
    )
    assert supervised.method.type == "supervised"
    assert supervised.method.supervised.method == "lora" and supervised.method.supervised.lora["r"] == 8


@pytest.mark.parametrize("method, param", [
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}}, "method.dpo.hyperparameters.gamma"),
    ({"type": "dpo", "dpo": {"method": "sgd"}}, "method.dpo.method"),
    ({"type": "dpo", "dpo": {"ia3": {}}}, "method.dpo.ia3"),
    ({"type": "dpo", "dpo": {"lora": {"r": 0}}}, "method.dpo.lora.r"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}, "method.supervised.hyperparameters.beta"),
    ({"type": "reinforcement"}, "method.type"),
    ({"type": "dpo", "dpo": {"method": "full"}, "gpus": 2}, "strategy"),
])
def test_bad_preference_input_names_the_field(sdk: openai.OpenAI, method: dict, param: str) -> None:
    f = upload(sdk, PAIRS)
    method = dict(method)
    gpus = method.pop("gpus", None)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, method=method,
                                    **({"extra_body": {"gpus": gpus}} if gpus else {}))
    assert exc.value.param == param, exc.value.message
    assert param in exc.value.message


def test_preference_files_are_checked_line_by_line(sdk: openai.OpenAI) -> None:
    missing = {k: v for k, v in pair("tiger").items() if k != "non_preferred_output"}
    f = upload(sdk, [PAIRS[0], missing, PAIRS[1], "{not json"])
    assert f.status == "error"
    assert "line 2: 'non_preferred_output' is missing" in f.status_details and "line 4: invalid JSON" in f.status_details
    assert [(e["line"], e["code"]) for e in f.validation["errors"]] == [(2, "missing_field"), (4, "invalid_json")]
    # A chat file cannot train a preference objective, nor a preference file a supervised one.
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=upload(sdk, CHAT).id, method={"type": "dpo"})
    assert exc.value.param == "training_file" and "line 1" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=upload(sdk, PAIRS).id)
    assert exc.value.param == "training_file" and "'dpo'" in exc.value.message
    # The plan refuses them as well, from the uploads' reports.
    for rows, method, said in [(CHAT, {"type": "dpo"}, "is a chat file"), (PAIRS, None, "'dpo'")]:
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.post("/fine_tuning/plan", cast_to=object, body={"model": "tiny-llama", "training_file": upload(sdk, rows).id,
                                                                 **({"method": method} if method else {})})
        assert exc.value.param == "training_file" and said in exc.value.message, exc.value.message


def test_the_cli_submits_a_preference_job_and_shows_its_metrics(runner, tmp_path) -> None:
    from core.db import session_scope
    from core.models import Job
    from tuneq import cli

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    result = runner.invoke(cli.app, ["submit", str(data), "--model", "tiny-llama", "--method", "qlora", "--lora-r", "4",
                                     "--objective", "dpo", "--beta", "0.25"])
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    job = job_row(job_id)
    assert job.method == "qlora" and job.spec["objective"] == "dpo" and job.spec["lora"]["r"] == 4
    assert job.spec["preference"]["beta"] == 0.25
    bad = runner.invoke(cli.app, ["submit", str(data), "--model", "tiny-llama", "--beta", "0.1"])
    assert bad.exit_code != 0 and "--beta: applies to --objective" in bad.output
    with session_scope() as db:
        db.get(Job, job_id).metrics = {"train_loss": 0.3, "train_reward_margin": 1.5, "train_preference_accuracy": 0.9}
    status = runner.invoke(cli.app, ["status", job_id])
    assert status.exit_code == 0 and "train_reward_margin" in status.stdout and "train_preference_accuracy" in status.stdout


def test_the_planner_and_method_auto_understand_preference_jobs(sdk: openai.OpenAI) -> None:
    f = upload(sdk, PAIRS)

    def plan(method: dict) -> dict:
        return sdk.post("/fine_tuning/plan", cast_to=object, body={"model": "tiny-llama", "training_file": f.id,
                                                                    "method": method})

    full_dpo = plan({"type": "dpo", "dpo": {"method": "full"}})["plan"]
    full_simpo = plan({"type": "simpo", "simpo": {"method": "full"}})["plan"]
    dpo_parts = full_dpo["methods"]["full"]["estimate"]["parts"]
    assert dpo_parts["reference_weights"] > 0 and "reference_weights" not in full_simpo["methods"]["full"]["estimate"]["parts"]
    auto = sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                       method={"type": "dpo", "dpo": {"method": "auto"}})
    assert auto.method.type == "dpo" and auto.method.dpo.method in ("full", "lora", "qlora")


def test_tuneq_plan_takes_the_objective(runner, tmp_path) -> None:
    from tuneq import cli

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    got = runner.invoke(cli.app, ["plan", str(data), "--model", "tiny-llama", "--method", "full", "--objective", "dpo",
                                  "--json"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout)["plan"]["methods"]["full"]["estimate"]["parts"]["reference_weights"] > 0
    bad = runner.invoke(cli.app, ["plan", str(data), "--model", "tiny-llama", "--objective", "ppo"])
    assert bad.exit_code != 0 and "--objective: must be one of" in bad.output
