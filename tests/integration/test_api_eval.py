"""The eval block over HTTP (real app, database and Redis): eval files at upload, bad blocks
refused with the field named, a good one stored and shown; its scores in the worker's job state,
the checkpoint list and `tuneq status`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.integration.test_api_data import client  # noqa: F401 - the fixture: the app with the admin's key
from tuneq import cli
from tuneq.client import Client

CHAT = {"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]}
EVAL = {"messages": [{"role": "user", "content": "Reverse: abc"}], "expected": "cba"}


def post_file(c: TestClient, rows: list[dict]) -> dict:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = c.post("/v1/files", files={"file": ("f.jsonl", body, "application/jsonl")}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()


def create(c: TestClient, **body):
    return c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", **body})


def test_an_eval_file_upload_is_checked_line_by_line(client: TestClient) -> None:
    good = post_file(client, [EVAL] * 3)
    assert good["status"] == "processed" and good["validation"]["format"] == "eval"
    bad = post_file(client, [EVAL, {**EVAL, "expected": ""},
                             {"messages": [*EVAL["messages"], {"role": "assistant", "content": "x"}], "expected": "x"}])
    assert bad["status"] == "error"
    assert [e["line"] for e in bad["validation"]["errors"]] == [2, 3]
    assert "line 2:" in bad["status_details"]


@pytest.mark.parametrize(("block", "param", "reason"), [
    ({"graders": [{"type": "bleu"}]}, "eval.graders[0].type", "exact_match"),
    ({"graders": [{"type": "regex", "pattern": "a(b"}]}, "eval.graders[0].pattern", "does not compile"),
    ({"graders": [{"type": "similarity"}, {"type": "similarity"}]}, "eval.graders[1].name", "used twice"),
    ({"max_new_tokens": 100000}, "eval.max_new_tokens", "1024"),
    ({"file": "file-nope"}, "eval.file", "no file with id"),
])
def test_bad_eval_blocks_are_refused_naming_the_field(client: TestClient, block: dict, param: str, reason: str) -> None:
    train, evals = post_file(client, [CHAT] * 2)["id"], post_file(client, [EVAL] * 2)["id"]
    r = create(client, training_file=train, eval={"file": evals, **block})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and reason in err["message"], err


def test_files_of_the_wrong_kind_and_select_best_without_eval_are_refused(client: TestClient) -> None:
    train, evals = post_file(client, [CHAT] * 2)["id"], post_file(client, [EVAL] * 2)["id"]
    err = create(client, training_file=train, eval={"file": train}).json()["error"]
    assert err["param"] == "eval.file" and "is a chat file" in err["message"], err
    err = create(client, training_file=evals).json()["error"]
    assert err["param"] == "training_file" and "is an eval file" in err["message"], err
    err = create(client, training_file=train, export={"select": "best"}).json()["error"]
    assert err["param"] == "export.select" and "eval block" in err["message"], err
    err = create(client, training_file=train, eval={"file": evals}, export={"select": "best", "metric": "sim"}).json()
    assert err["error"]["param"] == "export.metric", err
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_job_with_an_eval_block_shows_its_scores(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                                   admin_key: str, tmp_path: Path) -> None:
    """The stored spec keeps the file id, the worker's run spec gets its path; the worker's event
    handling puts the scores on the job, its checkpoints and `tuneq status`."""
    from core.db import session_scope
    from core.models import Checkpoint, Job
    from worker.events import ProgressTracker
    from worker.workdir import runnable_spec

    train, evals = post_file(client, [CHAT] * 2)["id"], post_file(client, [EVAL] * 2)["id"]
    r = create(client, training_file=train, eval={"file": evals, "graders": [{"type": "exact_match"},
                                                                             {"type": "similarity", "name": "sim"}]},
               export={"select": "best", "metric": "sim"}, schedule={"checkpoint_every_steps": 2})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    check = next(e for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"] if e["kind"] == "data_check")
    assert check["data"]["eval.file"]["format"] == "eval" and check["data"]["eval.file"]["examples"] == 2
    # A file a job reads cannot be deleted under it.
    assert client.delete(f"/v1/files/{evals}").status_code == 409
    tracker = ProgressTracker(tmp_path)
    scores = {"eval_exact_match": 0.5, "eval_sim": 0.75, "eval_seconds": 1.5, "eval_examples": 2}
    with session_scope() as db:
        job = db.get(Job, job_id)
        assert job.spec["eval"]["file"] == evals
        assert runnable_spec(db, job)["eval"]["file"].endswith(".jsonl")
        tracker.apply(db, job, {"type": "eval", "data": {"step": 2, **scores, "samples": []}})
        # The checkpoint event's metrics (the trainer's, with the scores of its weights) as stored.
        db.add(Checkpoint(job_id=job_id, step=2, path="x", metrics={"train_loss": 1.0, **scores}, storage_key="k",
                          uploaded_at=1.0))
        job.metrics = {**job.metrics, "exported_step": 2, "export_metric": "eval_sim", "export_score": 0.75}
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["metrics"]["eval_sim"] == 0.75 and "eval_seconds" not in job["metrics"]
    assert job["progress"]["eval_seconds"] == 1.5 and job["progress"]["eval_step"] == 2
    cks = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert cks[0]["step_number"] == 2 and cks[0]["metrics"]["eval_sim"] == 0.75
    monkeypatch.setenv("TUNEQ_API_KEY", admin_key)
    monkeypatch.setattr(cli, "make_client", lambda: Client("http://testserver", http=client))
    out = CliRunner().invoke(cli.app, ["status", job_id])
    assert out.exit_code == 0, out.output
    assert "exact_match 0.500, sim 0.750" in out.stdout and "eval 1.5 s per pass (step 2)" in out.stdout
    assert "step 2 (best eval_sim 0.7500)" in out.stdout


def test_tuneq_submit_uploads_the_eval_file(client: TestClient, monkeypatch: pytest.MonkeyPatch, admin_key: str,
                                            tmp_path: Path) -> None:
    from core.db import session_scope
    from core.models import Job

    monkeypatch.setenv("TUNEQ_API_KEY", admin_key)
    # A new HTTP client per command: each closes its own.
    monkeypatch.setattr(cli, "make_client", lambda: Client("http://testserver", http=TestClient(client.app)))
    (tmp_path / "train.jsonl").write_text(json.dumps(CHAT) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps(EVAL) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text("model: tiny-llama\ntraining_file: train.jsonl\n"
                    "eval: {file: eval.jsonl, graders: [{type: contains}], max_new_tokens: 8}\n")
    by_spec = CliRunner().invoke(cli.app, ["submit", "--spec", str(spec), "--select-best"])
    monkeypatch.chdir(tmp_path)
    by_flag = CliRunner().invoke(cli.app, ["submit", "train.jsonl", "--model", "tiny-llama", "--eval-file", "eval.jsonl"])
    assert by_spec.exit_code == 0 and by_flag.exit_code == 0, by_spec.output + by_flag.output
    with session_scope() as db:
        first, second = db.get(Job, by_spec.stdout.strip()).spec, db.get(Job, by_flag.stdout.strip()).spec
    assert first["eval"]["file"].startswith("file-") and first["eval"]["graders"][0]["type"] == "contains"
    assert first["export"]["select"] == "best" and second["export"]["select"] == "last"
    assert second["eval"]["file"].startswith("file-") and second["eval"]["graders"][0]["type"] == "exact_match"
