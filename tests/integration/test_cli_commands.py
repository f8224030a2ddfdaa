"""The CLI's read and control commands against the real app (database + Redis): --json output,
`watch` (stream and polling) and its exit codes, events, files, download of the merged model and
the TensorBoard logs, the config file."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from tests.conftest import create_user_with_key
from tests.integration.conftest import chat_lines, make_job
from tuneq import cli
from tuneq.client import Client

# The CLI's behaviour does not depend on the database; the API tests cover both.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def app(db_env: dict[str, str]) -> Any:
    from api.main import create_app

    return create_app()


@pytest.fixture
def runner(app: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    _, key = create_user_with_key("cli-user", "admin")
    monkeypatch.setenv("TUNEQ_API_KEY", key)
    monkeypatch.setenv("TUNEQ_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setattr(cli, "make_client", lambda: Client("http://testserver", http=TestClient(app)))
    return CliRunner()


def finish(job_id: str, status: str, *, losses: tuple[float, ...] = (2.0, 1.5, 1.0), delay: float = 0.0) -> None:
    """Run the job's life in the database as a worker would: running, metrics events, the end."""
    from core import states
    from core.db import session_scope
    from core.models import Job

    time.sleep(delay)
    with session_scope() as db:
        states.transition(db, db.get(Job, job_id), states.RUNNING, "Job started on test.")
    for step, loss in enumerate(losses, start=1):
        time.sleep(delay / 4)
        with session_scope() as db:
            job = db.get(Job, job_id)
            data = {"step": step, "total_steps": len(losses), "epoch": step / len(losses), "train_loss": loss,
                    "tokens_per_second": 1000.0 + step}
            states.add_event(db, job, f"step {step}/{len(losses)} loss {loss:.4f}", type="metrics", data=data)
            job.progress = {**job.progress, **data, "eta_seconds": 3.0}
            job.metrics = {**job.metrics, "train_loss": loss}
    with session_scope() as db:
        job = db.get(Job, job_id)
        error = {"code": "data", "message": "line 3 is bad"} if status == states.FAILED else None
        if status == states.CANCELLED:
            job.status = states.CANCELLING
        states.transition(db, job, status, f"Job {status}.", error=error)


def in_background(fn: Callable[..., None], *args: Any, **kw: Any) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, kwargs=kw, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(("status", "code"), [("succeeded", 0), ("failed", 1), ("cancelled", 3)])
def test_watch_of_a_finished_job_prints_the_result_and_exits_with_it(runner: CliRunner, db: Session, status: str,
                                                                       code: int) -> None:
    job = make_job(db)
    finish(job.id, status)
    result = runner.invoke(cli.app, ["watch", job.id])
    assert result.exit_code == code, result.output
    assert status in result.stdout and "train_loss" in result.stdout and "1.0000" in result.stdout
    assert ("line 3 is bad" in result.stdout) == (status == "failed")
    assert ("tuneq download" in result.stdout) == (status == "succeeded")
    as_json = runner.invoke(cli.app, ["watch", job.id, "--json"])
    assert as_json.exit_code == code and json.loads(as_json.stdout)["status"] == status


@pytest.mark.parametrize("mode", ["--stream", "--poll"])
def test_watch_follows_a_running_job_to_its_end(runner: CliRunner, db: Session, mode: str) -> None:
    job = make_job(db)
    worker = in_background(finish, job.id, "succeeded", delay=1.0)
    t0 = time.monotonic()
    result = runner.invoke(cli.app, ["watch", job.id, "--json", mode, "--interval", "0.2"])
    worker.join()
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    events, final = lines[:-1], lines[-1]
    assert [e["data"]["train_loss"] for e in events if e["type"] == "metrics"] == [2.0, 1.5, 1.0]
    assert [e["data"]["to"] for e in events if e["kind"] == "status"][-2:] == ["running", "succeeded"]
    assert len({e["id"] for e in events}) == len(events)  # nothing twice
    assert final["status"] == "succeeded" and final["progress"]["step"] == 3
    assert time.monotonic() - t0 < 20

    # The human view: the bar's last state and the result.
    again = make_job(db)
    in_background(finish, again.id, "failed", delay=0.5)
    shown = runner.invoke(cli.app, ["watch", again.id, mode, "--interval", "0.2"])
    assert shown.exit_code == 1, shown.output
    assert "3/3" in shown.stdout and "loss 1.0000" in shown.stdout and "Job failed." in shown.stdout


def test_events_status_list_and_control_commands_print_json(runner: CliRunner, db: Session) -> None:
    job = make_job(db)
    other = make_job(db)
    status = runner.invoke(cli.app, ["status", job.id, "--json"])
    assert status.exit_code == 0 and json.loads(status.stdout)["progress"]["queue_position"] == 1
    listed = json.loads(runner.invoke(cli.app, ["list", "--json"]).stdout)
    assert [j["id"] for j in listed] == [other.id, job.id]
    alias = runner.invoke(cli.app, ["jobs", "--status", "queued", "--json"])
    assert alias.exit_code == 0 and len(json.loads(alias.stdout)) == 2
    assert "queued #2" in runner.invoke(cli.app, ["list"]).stdout

    paused = runner.invoke(cli.app, ["pause", job.id, "--json"])
    assert paused.exit_code == 0 and json.loads(paused.stdout)["status"] == "paused"
    assert runner.invoke(cli.app, ["resume", job.id]).stdout.strip() == f"{job.id} queued"
    assert json.loads(runner.invoke(cli.app, ["cancel", job.id, "--json"]).stdout)["status"] == "cancelled"

    events = json.loads(runner.invoke(cli.app, ["events", job.id, "--json", "--limit", "100"]).stdout)
    assert [e["data"]["to"] for e in events if e["kind"] == "status" and e["data"].get("to")][-3:] == [
        "paused", "queued", "cancelled"]
    follow = runner.invoke(cli.app, ["events", job.id, "--follow", "--json"])  # the job has ended: returns
    assert follow.exit_code == 0 and [json.loads(x)["id"] for x in follow.stdout.splitlines()] == [e["id"] for e in events][-20:]
    text = runner.invoke(cli.app, ["events", job.id])
    assert text.exit_code == 0 and "Job cancelled." in text.stdout
    assert json.loads(runner.invoke(cli.app, ["models", "--json"]).stdout) == []


def test_the_cli_follows_pages_to_the_count_asked(runner: CliRunner, db: Session, app: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A server serves at most its page size of a larger limit (with has_more): `list --limit 5`
    and `events --limit 5` still show five, and polling for new events pages back to the last
    one seen."""
    from tests.conftest import reset_caches

    jobs = [make_job(db) for _ in range(5)]
    for verb in ("pause", "resume", "pause", "resume", "cancel"):
        assert runner.invoke(cli.app, [verb, jobs[0].id]).exit_code == 0
    monkeypatch.setenv("TUNEQ_PAGE_LIMIT_MAX", "2")
    reset_caches()
    listed = json.loads(runner.invoke(cli.app, ["list", "--json", "--limit", "5"]).stdout)
    assert [j["id"] for j in listed] == [j.id for j in reversed(jobs)]
    events = json.loads(runner.invoke(cli.app, ["events", jobs[0].id, "--json", "--limit", "5"]).stdout)
    assert len(events) == 5 and len({e["id"] for e in events}) == 5
    with Client("http://testserver", http=TestClient(app)) as c:
        newest_first = c.events(jobs[0].id, limit=100)
        assert len(newest_first) > 5
        assert c.events_since(jobs[0].id, newest_first[-1]["id"]) == list(reversed(newest_first[:-1]))


def test_files_upload_list_show(runner: CliRunner, tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(chat_lines(3))
    up = runner.invoke(cli.app, ["files", "upload", str(good)])
    assert up.exit_code == 0, up.output
    file_id = up.stdout.strip()
    assert file_id.startswith("file-")
    shown = runner.invoke(cli.app, ["files", "show", file_id])
    assert "processed" in shown.stdout and "chat" in shown.stdout
    assert json.loads(runner.invoke(cli.app, ["files", "show", file_id, "--json"]).stdout)["validation"]["examples"] == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat_lines(1) + "{oops\n")
    refused = runner.invoke(cli.app, ["files", "upload", str(bad), "--json"])
    assert refused.exit_code == 1 and "line 2" in refused.stderr
    report = json.loads(refused.stdout)
    assert report["status"] == "error" and report["validation"]["error_counts"] == {"invalid_json": 1}
    listed = json.loads(runner.invoke(cli.app, ["files", "list", "--json"]).stdout)
    assert [f["id"] for f in listed][1] == file_id
    bad_id = listed[0]["id"]
    shown_bad = runner.invoke(cli.app, ["files", "show", bad_id])
    assert shown_bad.exit_code == 0 and "invalid_json x1" in shown_bad.stdout and "invalid_json" in shown_bad.stderr


def _store_archive(job_id: str, name: str, root: str, files: dict[str, bytes], kind: str = "archive") -> None:
    from core.db import session_scope
    from core.models import Artifact
    from core.storage import get_storage

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, data in files.items():
            info = tarfile.TarInfo(f"{root}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    key = f"jobs/{job_id}/{name}"
    size, digest = get_storage().put_stream(key, io.BytesIO(buf.getvalue()))
    with session_scope() as db:
        db.add(Artifact(job_id=job_id, name=name, kind=kind, storage_key=key, bytes=size, sha256=digest))


def test_download_merged_and_tensorboard(runner: CliRunner, db: Session, tmp_path: Path) -> None:
    job = make_job(db)
    finish(job.id, "succeeded")
    _store_archive(job.id, "adapter.tar.gz", "adapter", {"adapter_config.json": b"{}"})
    no_merged = runner.invoke(cli.app, ["download", job.id, str(tmp_path / "m0"), "--merged"])
    assert no_merged.exit_code == 1 and "exported no merged model" in no_merged.stderr
    _store_archive(job.id, "merged.tar.gz", "merged", {"config.json": b"{}", "model.safetensors": b"w"})
    _store_archive(job.id, "tensorboard.tar.gz", "tensorboard", {"events.out.tfevents.1.host": b"e"}, kind="logs")

    merged = runner.invoke(cli.app, ["download", job.id, str(tmp_path / "merged"), "--merged"])
    assert merged.exit_code == 0, merged.output
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["config.json", "model.safetensors"]
    adapter = runner.invoke(cli.app, ["download", job.id, str(tmp_path / "adapter")])
    assert adapter.exit_code == 0 and [p.name for p in (tmp_path / "adapter").iterdir()] == ["adapter_config.json"]
    tb = runner.invoke(cli.app, ["download", job.id, str(tmp_path / "tb"), "--tensorboard"])
    assert tb.exit_code == 0 and [p.name for p in (tmp_path / "tb").iterdir()] == ["events.out.tfevents.1.host"]


def test_config_file_is_used_when_the_environment_has_none(app: Any, db_env: dict[str, str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _, key = create_user_with_key("configured", "member")
    conf = tmp_path / "tuneq.toml"
    monkeypatch.setenv("TUNEQ_CONFIG", str(conf))
    monkeypatch.setenv("TUNEQ_HOME", str(tmp_path / "no-home"))  # no var/admin.key to fall back on
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in ("TUNEQ_URL", "TUNEQ_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    saved = runner.invoke(cli.app, ["config", "--url", "http://tuneq.example:8000", "--api-key", key])
    assert saved.exit_code == 0, saved.output
    assert conf.stat().st_mode & 0o777 == 0o600
    assert "http://tuneq.example:8000" in saved.stdout and str(conf) in saved.stdout

    with Client(http=TestClient(app)) as c:
        assert c.base_url == "http://tuneq.example:8000"
        assert c.list_jobs() == []  # the file's key authenticated this call
    monkeypatch.setenv("TUNEQ_URL", "http://from-env:1")
    monkeypatch.setenv("TUNEQ_API_KEY", "tq_wrong")
    with Client(http=TestClient(app)) as c:
        assert c.base_url == "http://from-env:1"
        with pytest.raises(Exception, match="invalid or revoked API key"):
            c.list_jobs()

    monkeypatch.delenv("TUNEQ_URL")
    conf.write_text('url = "http://x"\ncolour = "red"\n')
    broken = runner.invoke(cli.app, ["list"])
    assert broken.exit_code == 1 and "unknown key 'colour'" in broken.stderr and "Traceback" not in broken.output



def test_submit_from_a_yaml_spec_with_local_files_and_flag_overrides(service_env: dict[str, str], admin_key: str,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.main import create_app
    from core.db import session_scope
    from core.models import Job

    app = create_app()
    monkeypatch.setenv("TUNEQ_API_KEY", admin_key)
    monkeypatch.setattr(cli, "make_client", lambda: Client("http://testserver", http=TestClient(app)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(chat_lines(8))
    spec = tmp_path / "job.yaml"
    spec.write_text("""
model: tiny-llama
training_file: data/train.jsonl      # relative to this file; uploaded by the CLI
validation_file: data/train.jsonl
method: {type: lora, lora: {r: 4, dropout: 0.1}}
hyperparameters: {n_epochs: 2, learning_rate: 0.002}
suffix: from-spec
integrations: [{type: wandb, wandb: {project: from-spec, tags: [nightly]}}]
""")
    result = CliRunner().invoke(cli.app, ["submit", "--spec", str(spec), "--lora-alpha", "32", "--max-steps", "3",
                                          "--wandb-project", "from-flag"])
    assert result.exit_code == 0, result.output
    with session_scope() as db:
        job = db.get(Job, result.stdout.strip())
        assert job.suffix == "from-spec" and job.validation_file and job.method == "lora"
        assert (job.spec["lora"]["r"], job.spec["lora"]["alpha"], job.spec["lora"]["dropout"]) == (4, 32, 0.1)
        hp = job.spec["hyperparameters"]
        assert (hp["n_epochs"], hp["learning_rate"], hp["max_steps"]) == (2, 0.002, 3)
        assert job.spec["integrations"] == [{"type": "wandb", "wandb": {"project": "from-flag", "name": None,
                                                                         "entity": None, "tags": ["nightly"]}}]
    # An uploaded file's id works where a path does.
    file_id = CliRunner().invoke(cli.app, ["files", "upload", str(tmp_path / "data" / "train.jsonl")]).stdout.strip()
    by_id = CliRunner().invoke(cli.app, ["submit", file_id, "--model", "tiny-llama", "--max-steps", "2"])
    assert by_id.exit_code == 0, by_id.output
    with session_scope() as db:
        assert db.get(Job, by_id.stdout.strip()).training_file == file_id
    spec.write_text("model: tiny-llama\ntraining_file: data/missing.jsonl\n")
    missing = CliRunner().invoke(cli.app, ["submit", "-f", str(spec)])
    assert missing.exit_code == 1 and "training_file:" in missing.stderr and "missing.jsonl: no such file" in missing.stderr
    spec.write_text("[not, a, mapping]\n")
    assert "must be a mapping" in CliRunner().invoke(cli.app, ["submit", "-f", str(spec)]).stderr


def test_hosts_lists_each_host_once_with_its_gpus_and_disk(runner: CliRunner) -> None:
    from core import workers

    h100 = [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.6}] * 2
    # Two workers share host a (its GPUs counted once); host b's disk is nearly full.
    workers.register("a:1", "host-a", 2, "gpu", 30, free=1, gpu_info=h100, disk_free_gib=500.0, disk_full=False)
    workers.register("a:2", "host-a", 2, "gpu", 30, free=1, gpu_info=h100, disk_free_gib=500.0, disk_full=False)
    workers.register("b:1", "host-b", 1, "gpu", 30, free=1, gpu_info=[{"name": "NVIDIA L4", "memory_gib": 22.5}],
                     disk_free_gib=2.0, disk_full=True)
    result = runner.invoke(cli.app, ["hosts", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert [(h["host"], h["gpus"], h["free"], len(h["workers"]), h["disk_full"]) for h in got] == [
        ("host-a", 2, 1, 2, False), ("host-b", 1, 1, 1, True)]
    assert got[0]["gpu_info"] == h100
    text = runner.invoke(cli.app, ["hosts"]).output
    assert "host-a  1/2 free  NVIDIA H100 80GB HBM3 79.6 GiB  500.0 GiB free  workers: 2" in text
    assert "host-b  1/1 free  NVIDIA L4 22.5 GiB  disk full" in text
