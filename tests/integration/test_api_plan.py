"""The planner through the API: the plan route, method/batch "auto", plans stored on jobs, refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import reset_caches

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]})


@pytest.fixture
def client(service_env: dict[str, str], admin_headers: dict[str, str]) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app(), headers=admin_headers) as c:
        yield c


@pytest.fixture
def file_id(client: TestClient) -> str:
    r = client.post("/v1/files", files={"file": ("t.jsonl", (GOOD_LINE + "\n") * 4)}, data={"purpose": "fine-tune"})
    assert r.json()["status"] == "processed"
    return r.json()["id"]


def test_plan_route_returns_every_method_with_its_breakdown(client: TestClient, file_id: str) -> None:
    r = client.post("/v1/fine_tuning/plan", json={"model": "tiny-llama", "training_file": file_id, "method": "auto"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "fine_tuning.plan"
    methods = body["plan"]["methods"]
    assert set(methods) == {"full", "lora", "qlora"}
    for mp in methods.values():
        est = mp["estimate"]
        parts = ("weights", "gradients", "optimizer_states", "activations", "logits", "overhead")
        assert sum(est[k] for k in parts) == est["total"] > 0
        assert set(parts) <= set(est["breakdown_gib"])
    assert body["recommendation"]["method"] == "full" and body["recommendation"]["fits"]  # the tiny model fits full
    # speed auto: the tiny model fits without checkpointing; one GPU neither replicates nor shards.
    assert body["recommendation"]["speed"] == "fast" and body["recommendation"]["strategy"] == "single"
    assert methods["full"]["estimate"]["loss"].startswith("chunked(")  # the trainer's fast-path loss
    assert body["plan"]["checked"] is True and body["plan"]["available_gib"] == 80
    t = body["time"]
    assert t["dataset_tokens"] and t["dataset_tokens"] > 0  # counted by the data check
    assert t["flops"] > 0 and t["seconds"] > 0 and t["gpu_hours"] > 0
    # The worker GPUs' model (setting plan_gpu_model, an H100 by default) times the plan: its
    # measured efficiency for the setting, and its start-up on top of the steps.
    assert t["startup_seconds"] > 0 and t["checkpoints"] == 0  # one epoch: its only save is the end
    assert t["wall_seconds"] == pytest.approx(t["seconds"] + t["startup_seconds"] + t["checkpoint_seconds"])
    assert t["efficiency_source"].startswith("H100 ") and "full lean" in t["efficiency_source"]


def test_plan_times_the_start_up_the_job_will_have_on_the_workers(client: TestClient, file_id: str) -> None:
    """One process and no bitsandbytes: the worker's template has done the trainer's imports, so the
    plan counts the warm start-up (from submission). QLoRA needs bitsandbytes, which the template
    cannot take; with no standby trainer (as here) it starts a fresh process, as do jobs of several
    GPUs, and the plan counts the fresh start-up."""
    from trainer.planning import speeds

    def time_of(method: str, **extra: object) -> dict:
        body = {"model": "tiny-llama", "training_file": file_id, "method": {"type": method}, **extra}
        r = client.post("/v1/fine_tuning/plan", json=body)
        assert r.status_code == 200, r.text
        return r.json()["time"]

    startup = speeds.table()["gpus"]["H100"]["startup"]
    lora, qlora, two = time_of("lora"), time_of("qlora"), time_of("lora", gpus=2)
    assert "imports done before the job" in lora["startup_source"]
    assert "fresh trainer" in qlora["startup_source"] and "fresh trainer" in two["startup_source"]
    assert qlora["startup_seconds"] - lora["startup_seconds"] == pytest.approx(
        startup["fixed_s"] - startup["warm_fixed_s"], abs=0.15)
    assert lora["wall_seconds"] == pytest.approx(lora["seconds"] + lora["startup_seconds"] + lora["checkpoint_seconds"])


def test_a_file_not_counted_yet_is_timed_by_max_steps(service_env: dict[str, str], admin_headers: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A large file is counted by the upload's check in the background, not within a plan request:
    a plan asked before that is still timed when max_steps fixes the steps, and says its file's
    tokens are not counted; without max_steps it has no time until the count exists."""
    from api.main import create_app

    monkeypatch.setenv("TUNEQ_DATA_CHECK_INLINE_BYTES", "0")
    reset_caches()
    with TestClient(create_app(), headers=admin_headers) as c:
        line = json.dumps({"messages": [{"role": "user", "content": "Reverse: abcd"},
                                        {"role": "assistant", "content": "dcba"}]})
        r = c.post("/v1/files", files={"file": ("big.jsonl", (line + "\n") * 8)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        body = {"model": "tiny-llama", "training_file": r.json()["id"], "method": {"type": "lora"}}
        answer = c.post("/v1/fine_tuning/plan", json={**body, "hyperparameters": {"max_steps": 12}}).json()
        epochs = c.post("/v1/fine_tuning/plan", json=body).json()["time"]
    steps = answer["time"]
    assert steps["dataset_tokens"] is None and epochs["dataset_tokens"] is None
    assert steps["seconds"] > 0 and steps["wall_seconds"] > steps["seconds"] and steps["startup_seconds"] > 0
    assert epochs["seconds"] is None and epochs["wall_seconds"] is None
    from tuneq.cli.render import print_plan

    print_plan(answer, "tiny-llama")  # `tuneq plan` shows it
    shown = capsys.readouterr().out
    assert "file's tokens not counted yet" in shown and "wall to the last step" in shown


def test_auto_method_and_batch_pick_full_and_store_the_plan(client: TestClient, file_id: str) -> None:
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, "method": "auto",
                                                   "hyperparameters": {"batch_size": "auto"}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["method"] == {"type": "supervised", "supervised": {"method": "full", "hyperparameters": job["hyperparameters"]}}
    assert job["hyperparameters"]["batch_size"] == 4  # the largest that fits, capped at the file's 4 examples
    assert any("the job takes 4, as its file has 4 examples" in note for note in job["plan"]["notes"])
    assert job["plan"]["predicted_peak_gib"] > 0 and job["plan"]["measured_peak_gib"] is None
    assert job["plan"]["method"] == "full"
    from core.db import session_scope
    from core.models import Job

    with session_scope() as db:
        stored = db.get(Job, job["id"]).plan
    assert stored["fits"] and set(stored["methods"]) == {"full", "lora", "qlora"}
    assert stored["compute"]["gpu_hours"] > 0
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["plan"] == job["plan"]


@pytest.mark.parametrize("asked", [{"method": "lora"}, {"method": "auto"},
                                   {"method": "auto", "hyperparameters": {"batch_size": "auto", "max_seq_len": 64}}])
def test_one_plan_per_creation_is_the_plan_stored(client: TestClient, file_id: str, monkeypatch: pytest.MonkeyPatch,
                                                  asked: dict) -> None:
    from api import planning

    made: list[dict] = []
    real = planning.make_plan

    def counted(spec_like: dict, *args, **kwargs) -> dict | None:
        made.append(dict(spec_like, dataset_tokens=kwargs.get("dataset_tokens")))
        return real(spec_like, *args, **kwargs)

    monkeypatch.setattr(planning, "make_plan", counted)
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, **asked})
    assert r.status_code == 200, r.text
    assert len(made) == 1, made  # the plan that chose "auto" is the job's plan, not made again
    assert made[0]["method"] == asked["method"] and made[0]["dataset_tokens"] > 0
    assert made[0]["hyperparameters"].get("max_seq_len", 1024) == asked.get("hyperparameters", {}).get("max_seq_len", 1024)
    from core.db import session_scope
    from core.models import Job

    with session_scope() as db:
        stored = db.get(Job, r.json()["id"]).plan
    assert stored["requested_method"] == asked["method"] and stored["compute"]["gpu_hours"] > 0
    made.clear()
    r = client.post("/v1/fine_tuning/plan", json={"model": "tiny-llama", "training_file": file_id, **asked})
    assert r.status_code == 200, r.text
    assert len(made) == 1 and r.json()["plan"]["requested_method"] == asked["method"]


def test_a_job_that_cannot_fit_is_refused_with_numbers(client: TestClient, file_id: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEQ_PLAN_GPU_MEMORY_GIB", "0.001")
    reset_caches()
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, "method": "full"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "does_not_fit" and "does not fit" in err["message"]
    assert err["details"]["predicted_gib"] > err["details"]["available_gib"] == 0.001
    assert isinstance(err["details"]["suggestions"], list)
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, "method": "auto"})
    assert r.status_code == 422, r.text
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    # The plan route still answers, with the refusal as its recommendation.
    r = client.post("/v1/fine_tuning/plan", json={"model": "tiny-llama", "training_file": file_id, "method": "full"})
    assert r.status_code == 200, r.text
    assert r.json()["recommendation"]["fits"] is False and "does not fit" in r.json()["recommendation"]["message"]


def test_every_method_is_planned_and_refused_when_too_big(client: TestClient, file_id: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    r = client.post("/v1/fine_tuning/plan", json={"model": "tiny-llama", "training_file": file_id, "method": "ia3"})
    assert r.status_code == 200, r.text
    assert set(r.json()["plan"]["methods"]) == {"full", "lora", "qlora", "ia3"}
    assert r.json()["recommendation"]["method"] == "ia3" and r.json()["plan"]["checked"] is True
    monkeypatch.setenv("TUNEQ_PLAN_GPU_MEMORY_GIB", "0.001")
    reset_caches()
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, "method": "ia3"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "does_not_fit" and "ia3" in r.json()["error"]["message"]


def test_auto_leaves_full_for_a_model_too_big_for_the_gpu(tmp_path: Path) -> None:
    from api.planning import make_plan
    from core.settings import Settings
    from trainer.tiny import build_config

    build_config("llama-3-8b").save_pretrained(tmp_path / "big")  # config only: planning reads no weights
    spec = {"method": "auto", "hyperparameters": {"batch_size": 1, "max_seq_len": 1024}, "gradient_checkpointing": True}
    p = make_plan(spec, str(tmp_path / "big"), 1, Settings(plan_gpu_memory_gib=80))
    assert p["methods"]["full"]["fits"] is False and p["method"] in ("lora", "qlora")
    p = make_plan(spec, str(tmp_path / "big"), 1, Settings(plan_gpu_memory_gib=12))
    assert p["method"] == "qlora"


def test_cli_plan_prints_the_table_and_json(service_env: dict[str, str], admin_key: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from api.main import create_app
    from tuneq import cli
    from tuneq.client import Client

    monkeypatch.setenv("TUNEQ_API_KEY", admin_key)
    app = create_app()
    monkeypatch.setattr(cli, "make_client", lambda: Client("http://testserver", http=TestClient(app)))
    data = tmp_path / "t.jsonl"
    data.write_text((GOOD_LINE + "\n") * 4)
    runner = CliRunner()
    r = runner.invoke(cli.app, ["plan", str(data), "--model", "tiny-llama"])
    assert r.exit_code == 0, r.output
    assert "qlora" in r.output and "recommended: full fits" in r.output and "GPU-hours" in r.output
    assert "wall to the last step:" in r.output and "checkpoint(s) before the last step" in r.output
    r = runner.invoke(cli.app, ["plan", str(data), "--model", "tiny-llama", "--method", "lora", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout[r.stdout.index("{"):])
    assert got["recommendation"]["method"] == "lora" and set(got["plan"]["methods"]) == {"full", "lora", "qlora"}


def test_jobs_are_planned_against_the_gpus_of_the_registered_hosts(client: TestClient, file_id: str) -> None:
    from core import workers

    body = {"model": "tiny-llama", "training_file": file_id, "method": "lora", "hyperparameters": {"batch_size": "auto"}}
    # No worker has registered its GPUs: TUNEQ_PLAN_GPU_MEMORY_GIB, as before.
    plan = client.post("/v1/fine_tuning/plan", json=body).json()["plan"]
    assert plan["available_gib"] == 80 and plan["gpu_memory_source"] == "setting"
    # A host too small for the tiny model (0.01 GiB) and one it fits on (0.5 GiB).
    workers.register("s:1", "small", 1, "cpu", 30, gpu_info=[{"name": "simulated", "memory_gib": 0.01}])
    workers.register("l:1", "large", 1, "cpu", 30, gpu_info=[{"name": "simulated", "memory_gib": 0.5}])
    plan = client.post("/v1/fine_tuning/plan", json=body).json()["plan"]
    assert plan["available_gib"] == 0.5 and plan["gpu_memory_source"] == "registered_hosts"
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    need = job["plan"]["min_gpu_memory_gib"]
    assert 0.01 < need <= 0.5 and job["plan"]["gpu_memory_gib"] == 0.5  # it can never land on "small"
    from core.db import get_sessionmaker
    from core.models import Job

    with get_sessionmaker()() as db:
        assert db.get(Job, job["id"]).min_gpu_memory_gib == need
    # Only the small host left: refused as the job's own, naming the field and the largest GPU.
    workers.unregister("l:1")
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "does_not_fit" and err["param"] == "method"
    assert "any registered host (the largest has 0.01 GiB)" in err["message"]


@pytest.fixture
def two_one_gpu_hosts(client: TestClient) -> Iterator[None]:
    """Two registered hosts of one GPU each, as two workers with their own TUNEQ_HOST_ID announce them."""
    from core import workers

    for host in ("host-a", "host-b"):
        workers.register(f"w-{host}", host, 1, "gpu", 60, free=1)
    yield
    for host in ("host-a", "host-b"):
        workers.unregister(f"w-{host}")


@pytest.mark.parametrize(("method", "strategy"), [("lora", "ddp"), ("full", "fsdp")])
def test_a_job_across_hosts_is_planned_over_all_its_ranks(client: TestClient, file_id: str, two_one_gpu_hosts: None,
                                                         method: str, strategy: str) -> None:
    body = {"model": "tiny-llama", "training_file": file_id, "method": method, "gpus": 1, "nodes": 2}
    r = client.post("/v1/fine_tuning/plan", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["recommendation"]["strategy"] == strategy  # across the hosts as within one: adapters DDP, full FSDP
    assert got["plan"]["gpus"] == 2 and got["plan"]["nodes"] == 2
    one = client.post("/v1/fine_tuning/plan", json={**body, "nodes": 1}).json()
    assert one["recommendation"]["strategy"] == "single"
    if method == "full":  # sharded over both hosts' ranks: less memory per GPU than on one
        assert got["plan"]["predicted_peak_gib"] < one["plan"]["predicted_peak_gib"]


def test_more_nodes_than_hosts_that_hold_them_is_refused_naming_nodes(client: TestClient, file_id: str,
                                                                      two_one_gpu_hosts: None) -> None:
    body = {"model": "tiny-llama", "training_file": file_id, "method": "lora"}
    for route in ("/v1/fine_tuning/plan", "/v1/fine_tuning/jobs"):
        r = client.post(route, json={**body, "gpus": 1, "nodes": 3})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "nodes" and err["code"] == "gpus_unavailable", err
        assert "2 of the 2 registered hosts" in err["message"]
        r = client.post(route, json={**body, "gpus": 2, "nodes": 2})  # no host has 2
        assert r.status_code == 400 and r.json()["error"]["param"] == "gpus", r.text


def test_a_job_across_hosts_that_fit_is_queued_for_the_workers(client: TestClient, file_id: str,
                                                                two_one_gpu_hosts: None) -> None:
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, "method": "lora",
                                                   "gpus": 1, "nodes": 2})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "queued" and job["nodes"] == 2 and job["gpus"] == 1, job
    # More GPUs than one host has, without nodes: spread over the hosts that hold them together.
    body = {"model": "tiny-llama", "training_file": file_id, "method": "lora", "gpus": 2}
    plan = client.post("/v1/fine_tuning/plan", json=body)
    assert plan.status_code == 200 and plan.json()["plan"]["nodes"] == 2, plan.text
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200 and (r.json()["nodes"], r.json()["gpus"]) == (2, 1), r.text
    r = client.post("/v1/fine_tuning/jobs", json={**body, "gpus": 3})  # the two hosts hold 2
    assert r.status_code == 400 and r.json()["error"]["param"] == "gpus", r.text


@pytest.mark.parametrize("route", ["/v1/fine_tuning/jobs", "/v1/fine_tuning/plan"])
def test_prefix_tuning_with_packing_is_refused_naming_packing(client: TestClient, file_id: str, route: str) -> None:
    # Packed examples would attend to each other: the prefix's key/value cache turns off their mask.
    r = client.post(route, json={"model": "tiny-llama", "training_file": file_id, "method": "prefix", "packing": True})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "packing" and "prefix" in r.json()["error"]["message"]
    ok = client.post(route, json={"model": "tiny-llama", "training_file": file_id, "method": "prefix"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("route", ["/v1/fine_tuning/jobs", "/v1/fine_tuning/plan"])
@pytest.mark.parametrize("hyperparameters, param", [
    ({"max_seq_len": 0}, "hyperparameters.max_seq_len"),
    ({"max_seq_len": 999_999_999}, "hyperparameters.max_seq_len"),
    ({"batch_size": 99_999}, "hyperparameters.batch_size"),
    ({"learning_rate_multiplier": -1}, "hyperparameters.learning_rate_multiplier"),
])
def test_method_auto_checks_the_hyperparameters_before_it_plans(client: TestClient, file_id: str, route: str,
                                                                 hyperparameters: dict, param: str) -> None:
    # The same 400 as with a method named: the planner is not asked to choose from a batch of 0.
    for method in ("auto", "lora"):
        r = client.post(route, json={"model": "tiny-llama", "training_file": file_id, "method": method,
                                     "hyperparameters": hyperparameters})
        assert r.status_code == 400, (method, r.text)
        assert r.json()["error"]["param"] == param, (method, r.json())
