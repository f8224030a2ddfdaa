"""Absurd or model-dependent values are a 400 naming the field, never a 500 or a silent coercion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import redis_db, reset_caches, sqlite_copy
from tests.security.conftest import client_for, create, upload

ABSURD = [
    ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate": 5e-324}}, "hyperparameters.learning_rate"),
    ({"hyperparameters": {"max_steps": 10_000_000}}, "hyperparameters.max_steps"),
    ({"schedule": {"keep_checkpoints": 1000, "checkpoint_every_steps": 1}}, "schedule.keep_checkpoints"),
    ({"schedule": {"checkpoint_every_minutes": 1e-300}}, "schedule.checkpoint_every_minutes"),
    ({"model": "./tiny-llama"}, "model"),
    ({"model": "tiny-llama/"}, "model"),
    ({"suffix": "r\u0435v"}, "suffix"),  # a Cyrillic 'е' posing as a Latin 'e'
    ({"gpus": True}, "gpus"),
    ({"priority": "0"}, "priority"),
    ({"method": {"type": "lora", "lora": {"r": True}}}, "method.lora.r"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path, redis_server_url: str,
           tiny_model_dir: Path) -> Iterator[tuple[TestClient, str]]:
    """A member and an uploaded file, with service_env's settings, for the tests below that change
    no setting: they send bodies that are refused, or create the few jobs that stay far below every
    per-user limit, so one app, user and upload serve them all."""
    import redis

    home = tmp_path_factory.mktemp("values")
    redis_url = f"{redis_server_url.rsplit('/', 1)[0]}/{redis_db(0)}"
    redis.Redis.from_url(redis_url).flushdb()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"TUNEQ_HOME": str(home / "home"), "TUNEQ_DATABASE_URL": sqlite_copy(sqlite_template, home / "tuneq.db"),
                     "TUNEQ_REDIS_URL": redis_url, "TUNEQ_MODEL_ROOTS": f'["{tiny_model_dir.parent}"]'}.items():
            mp.setenv(k, v)
        reset_caches()
        try:
            with client_for("alice", "member", "red") as c:
                yield c, upload(c)
        finally:
            reset_caches()
            redis.Redis.from_url(redis_url).flushdb()


@pytest.mark.parametrize(("extra", "param"), ABSURD, ids=[p for _, p in ABSURD])
def test_absurd_values_are_refused_naming_the_field(shared, extra, param) -> None:  # noqa: ANN001
    member, f = shared
    r = create(member, f, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_the_model_is_stored_by_its_one_name(shared) -> None:  # noqa: ANN001
    member, f = shared
    r = create(member, f, model="./tiny-llama")
    assert "write 'tiny-llama'" in r.json()["error"]["message"]
    assert create(member, f).json()["model"] == "tiny-llama"


@pytest.mark.parametrize("route", ["/v1/fine_tuning/jobs", "/v1/fine_tuning/plan"])
def test_more_checkpointed_layers_than_the_model_has_is_400(shared, route: str) -> None:  # noqa: ANN001
    member, f = shared
    body = {"model": "tiny-llama", "training_file": f, "speed": "balanced", "checkpoint_layers": 3}
    r = member.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "checkpoint_layers" and "0..2" in err["message"], err
    body["checkpoint_layers"] = 2
    assert member.post(route, json=body).status_code == 200


def test_a_per_user_gpu_hour_budget_bounds_the_steps(member, limits) -> None:  # noqa: ANN001
    f = upload(member)
    limits(max_gpu_hours_per_user=1e-9)
    r = create(member, f, hyperparameters={"max_steps": 1_000_000})
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "gpu_hour_budget" and "TUNEQ_MAX_GPU_HOURS_PER_USER" in err["message"]
    assert "retry-after" not in r.headers
    limits(max_gpu_hours_per_user=1.0)  # the tiny model's million steps: well under an hour
    assert create(member, f, hyperparameters={"max_steps": 1_000_000}).status_code == 200
