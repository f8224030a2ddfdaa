"""The tuneq CLI against the real app (database + Redis): submit, status, cancel, download."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tuneq import cli
from tuneq.client import Client

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]})


@pytest.fixture
def runner(service_env: dict[str, str], admin_key: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    from api.main import create_app

    app = create_app()
    # The key comes the way a user's does: from the environment, read by the client.
    monkeypatch.setenv("TUNEQ_API_KEY", admin_key)
    monkeypatch.setattr(cli, "make_client", lambda: Client("http://testserver", http=TestClient(app)))
    return CliRunner()


def job_row(job_id: str):  # noqa: ANN201
    from core.db import session_scope
    from core.models import Job

    with session_scope() as db:
        return db.get(Job, job_id)


def test_submit_prints_the_job_id_and_queues_it(runner: CliRunner, tmp_path: Path, service_env: dict[str, str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text((GOOD_LINE + "\n") * 4)
    result = runner.invoke(cli.app, ["submit", str(data), "--model", "tiny-llama", "--method", "qlora", "--epochs", "2",
                                     "--lr", "0.001", "--lora-r", "4", "--suffix", "rev", "--validation-file", str(data)])
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert job_id.startswith("ftjob-") and "\n" not in job_id
    job = job_row(job_id)
    assert job.status == "queued" and job.method == "qlora" and job.suffix == "rev" and job.validation_file
    assert job.spec["lora"]["r"] == 4 and job.spec["hyperparameters"]["n_epochs"] == 2
    assert job.spec["hyperparameters"]["learning_rate"] == 0.001
    assert redis.Redis.from_url(service_env["TUNEQ_REDIS_URL"]).llen("tuneq") == 1

    status = runner.invoke(cli.app, ["status", job_id])
    assert status.exit_code == 0 and "queued" in status.stdout and "Job queued." in status.stdout
    cancel = runner.invoke(cli.app, ["cancel", job_id])
    assert cancel.exit_code == 0 and cancel.stdout.strip() == f"{job_id} cancelled"
    again = runner.invoke(cli.app, ["cancel", job_id])  # done already: the same answer
    assert again.exit_code == 0 and again.stdout.strip() == f"{job_id} cancelled"


@pytest.mark.parametrize("method", ["ia3", "prefix", "freeze"])
def test_submit_takes_every_method_of_the_spec(runner: CliRunner, tmp_path: Path, method: str) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text((GOOD_LINE + "\n") * 4)
    spec = tmp_path / "job.yaml"
    spec.write_text("method: {type: freeze, freeze: {trainable_layers: 1}}\n")  # freeze needs its layer count
    args = ["submit", str(data), "--model", "tiny-llama", "--method", method]
    result = runner.invoke(cli.app, args + (["--spec", str(spec)] if method == "freeze" else []))
    assert result.exit_code == 0, result.output
    job = job_row(result.stdout.strip())
    assert job.status == "queued" and job.method == method == job.spec["method"]


def test_submit_shows_the_bad_lines(runner: CliRunner, tmp_path: Path, service_env: dict[str, str]) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{GOOD_LINE}\n{{oops\n{GOOD_LINE}\n\"just a string\"\n")
    result = runner.invoke(cli.app, ["submit", str(data), "--model", "tiny-llama"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "invalid_json" in result.stderr and "not_object" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "line 2" in last and "line 4" in last
    assert redis.Redis.from_url(service_env["TUNEQ_REDIS_URL"]).llen("tuneq") == 0


def test_refused_job_names_the_field(runner: CliRunner, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD_LINE + "\n")
    result = runner.invoke(cli.app, ["submit", str(data), "--model", "tiny-llama", "--batch-size", "0"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: hyperparameters.batch_size:")
    unknown = runner.invoke(cli.app, ["submit", str(data), "--model", "llama-9000"])
    assert unknown.exit_code == 1 and "available models: tiny-llama" in unknown.stderr


def stored_files() -> list[str]:
    from sqlalchemy import select

    from core.db import session_scope
    from core.identity import DELETED
    from core.models import File

    with session_scope() as db:
        return list(db.scalars(select(File.id).where(File.status != DELETED)))


def test_a_refused_submit_or_a_plan_leaves_no_uploaded_file_behind(runner: CliRunner, tmp_path: Path) -> None:
    # Each would count towards the user's file quota; the job was not made, or was only planned.
    data = tmp_path / "train.jsonl"
    data.write_text((GOOD_LINE + "\n") * 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    for args in (["submit", str(data), "--model", "tiny-llama", "--epochs", "0"],
                 ["submit", str(data), "--model", "tiny-llama", "--validation-file", str(data), "--suffix", "x" * 65],
                 ["submit", str(bad), "--model", "tiny-llama"],
                 ["plan", str(data), "--model", "tiny-llama", "--json"]):
        result = runner.invoke(cli.app, args)
        assert result.exit_code == (0 if args[0] == "plan" else 1), (args, result.output)
        assert stored_files() == [], args
    made = runner.invoke(cli.app, ["submit", str(data), "--model", "tiny-llama"])
    assert made.exit_code == 0 and len(stored_files()) == 1, made.output


def test_cli_numbers_that_json_cannot_carry_are_refused_before_any_upload(runner: CliRunner, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD_LINE + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text("hyperparameters: {learning_rate: .nan}\n")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"model: \xff\xfe\n")
    for args, said in [(["--lr", "nan"], "NaN or infinite"), (["--lr", "1e999"], "NaN or infinite"),
                       (["--spec", str(spec)], "NaN or infinite"), (["--spec", str(binary)], "not UTF-8")]:
        result = runner.invoke(cli.app, ["submit", str(data), "--model", "tiny-llama", *args])
        assert result.exit_code == 1 and said in result.stderr and "unexpected" not in result.stderr, (args, result.output)
        assert stored_files() == []
    watch = runner.invoke(cli.app, ["watch", "ftjob-x", "--poll", "--interval", "-1"])
    assert watch.exit_code == 2 and "--interval" in watch.stderr, watch.output


def _stored_archive(job_id: str, files: dict[str, bytes]) -> dict:
    from core.db import session_scope
    from core.models import Artifact
    from core.storage import get_storage

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"adapter/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    key = f"jobs/{job_id}/adapter.tar.gz"
    size, digest = get_storage().put_stream(key, io.BytesIO(buf.getvalue()))
    with session_scope() as db:
        db.add(Artifact(job_id=job_id, name="adapter.tar.gz", kind="archive", storage_key=key, bytes=size, sha256=digest))
    return {"key": key, "sha256": digest}


def test_download_unpacks_the_adapter(runner: CliRunner, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD_LINE + "\n")
    job_id = runner.invoke(cli.app, ["submit", str(data), "--model", "tiny-llama"]).stdout.strip()
    dl = tmp_path / "downloads"
    early = runner.invoke(cli.app, ["download", job_id, str(dl / "early")])
    assert early.exit_code == 1 and "has no archive" in early.stderr and "status: queued" in early.stderr

    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x00" * 4096}
    _stored_archive(job_id, files)
    result = runner.invoke(cli.app, ["download", job_id, str(dl / "adapter")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str((dl / "adapter").resolve())
    got = {p.name: p.read_bytes() for p in (dl / "adapter").iterdir()}
    assert got == files  # flattened: the archive's adapter/ folder is DIR itself
    assert [p.name for p in dl.iterdir()] == ["adapter"]  # no partial download or staging left


def test_download_refuses_a_corrupted_transfer(runner: CliRunner, tmp_path: Path) -> None:
    from core.storage import get_storage

    data = tmp_path / "train.jsonl"
    data.write_text(GOOD_LINE + "\n")
    job_id = runner.invoke(cli.app, ["submit", str(data), "--model", "tiny-llama"]).stdout.strip()
    stored = _stored_archive(job_id, {"adapter_config.json": b"{}"})
    get_storage().path(stored["key"]).write_bytes(b"tampered")
    assert hashlib.sha256(b"tampered").hexdigest() != stored["sha256"]
    result = runner.invoke(cli.app, ["download", job_id, str(tmp_path / "adapter")])
    assert result.exit_code == 1 and "sha256 mismatch" in result.stderr
    assert not (tmp_path / "adapter").exists()
