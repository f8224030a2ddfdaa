"""What a job exports names no path of the server: a user downloads final/, not the server's layout."""

from __future__ import annotations

import json
from pathlib import Path

from tests.security.conftest import GOOD_LINE


def test_final_names_no_server_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    from trainer.job import run_job
    from trainer.spec import JobSpec

    uploads = tmp_path / "srv" / "artifacts" / "files"
    uploads.mkdir(parents=True)
    train = uploads / "file-abc.jsonl"
    train.write_text((GOOD_LINE + "\n") * 8)
    spec = JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": "lora", "training_file": str(train), "validation_file": str(train),
        "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_seq_len": 32, "warmup_steps": 0},
    })
    out = tmp_path / "srv" / "work" / "job"
    assert run_job(spec, out) == 0
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert manifest["base_model"] == "tiny-llama"
    assert manifest["spec"]["model"] == "tiny-llama" and manifest["spec"]["training_file"] == "file-abc.jsonl"
    server_paths = (str(tmp_path), str(tiny_model_dir.parent))
    leaks = [(p.name, s) for p in (out / "final").rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".jinja")
             for s in server_paths if s in p.read_text(errors="replace")]
    assert leaks == []
