"""The CLI's failures are one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainer.vocabulary import METHODS
from tuneq import cli
from tuneq.cli.download import _unpack
from tuneq.client import Client, TuneqError
from core.ports import free_port

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def one_error_line(result) -> str:  # noqa: ANN001
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("TUNEQ_URL", url)
    return url


def test_unreachable_server(runner: CliRunner, nowhere: str, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD_LINE + "\n")
    for args in (["status", "ftjob-x"], ["submit", str(data), "--model", "tiny-llama"], ["jobs"], ["models"],
                 ["cancel", "ftjob-x"], ["download", "ftjob-x", str(tmp_path / "out")]):
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 1, (args, result.output)
        line = one_error_line(result)
        assert f"cannot reach tuneq at {nowhere}" in line and "TUNEQ_URL" in line


def test_missing_training_file(runner: CliRunner, nowhere: str, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["submit", str(tmp_path / "nope.jsonl"), "--model", "m"])
    assert result.exit_code == 1
    assert "nope.jsonl: no such file" in one_error_line(result)


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        # DoRA is LoRA with use_dora, not a method of the spec.
        (["submit", "x.jsonl", "--model", "m", "--method", "dora"], 1, f"--method: must be one of {', '.join(METHODS)}"),
        (["submit", "x.jsonl", "--model", "m", "--method", "full", "--lora-r", "8"], 1, "--lora-r/--lora-alpha apply"),
        (["submit", "x.jsonl", "--model", "m", "--method", "ia3", "--lora-alpha", "8"], 1, "--lora-r/--lora-alpha apply"),
        (["submit", "x.jsonl", "--model", "m", "--epochs", "three"], 2, "Invalid value for '--epochs'"),
        (["submit", "x.jsonl"], 2, "Missing option '--model'"),
        (["status"], 2, "Missing argument 'JOB'"),
        (["frobnicate"], 2, "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line(runner: CliRunner, nowhere: str, args: list[str], code: int, expected: str) -> None:
    result = runner.invoke(cli.app, args)
    assert result.exit_code == code, result.output
    assert expected in one_error_line(result)


def test_download_refuses_a_non_empty_directory(runner: CliRunner, nowhere: str, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = runner.invoke(cli.app, ["download", "ftjob-x", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "is not an empty directory" in one_error_line(result)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_api_errors_are_shown_with_their_message(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Against the real app on a SQLite file (no services): the server's message reaches the user."""
    from fastapi.testclient import TestClient

    from core.migrate import upgrade_head
    from tests.conftest import create_user_with_key, reset_caches

    url = f"sqlite:///{tmp_path / 'tuneq.db'}"
    upgrade_head(url)
    monkeypatch.setenv("TUNEQ_DATABASE_URL", url)
    monkeypatch.setenv("TUNEQ_HOME", str(tmp_path / "home"))
    reset_caches()
    monkeypatch.setenv("TUNEQ_API_KEY", create_user_with_key("cli-user")[1])
    from api.main import create_app

    app = create_app()
    monkeypatch.setattr(cli, "make_client", lambda: Client("http://testserver", http=TestClient(app)))
    try:
        result = runner.invoke(cli.app, ["status", "ftjob-nope"])
        assert result.exit_code == 1
        assert one_error_line(result) == "error: No fine-tuning job with id 'ftjob-nope'"
    finally:
        reset_caches()


def test_unpack_refuses_paths_that_leave_the_directory(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"owned"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "sub" / "out"
    dest.parent.mkdir()
    with pytest.raises(TuneqError, match="not a valid archive"):
        _unpack(archive, dest)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "sub" / "escaped.txt").exists()
    assert [p.name for p in dest.parent.iterdir()] == []  # no staging left behind


def test_unpack_flattens_the_single_top_folder(tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    archive = tmp_path / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="adapter")
    _unpack(archive, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_config.json").read_text() == "{}"
