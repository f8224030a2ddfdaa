"""`tuneq download`: a job's adapter, model, merged model, TensorBoard logs or offline W&B runs, unpacked into a folder."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from tuneq.cli.common import client, err, fail, friendly
from tuneq.client import TuneqError

# Archive names of worker/artifacts.py: one tar.gz of the job's final/ directory.
ARCHIVES = ("adapter.tar.gz", "model.tar.gz")
# What `tuneq download` fetches: the adapter (or model), the merged model, the TensorBoard logs, or
# the offline W&B runs of a job with a wandb integration.
MERGED_ARCHIVE = "merged.tar.gz"
TENSORBOARD_ARCHIVE = "tensorboard.tar.gz"
WANDB_ARCHIVE = "wandb.tar.gz"
# Published whatever the job's outcome, when it ends.
LOG_ARCHIVES = (TENSORBOARD_ARCHIVE, WANDB_ARCHIVE)


def _pick_archive(arts: list[dict[str, Any]], name: str | None = None) -> dict[str, Any] | None:
    if name is not None:
        return next((a for a in arts if a["name"] == name), None)
    archives = [a for a in arts if a.get("kind") == "archive" and a["name"] != MERGED_ARCHIVE]
    for wanted in ARCHIVES:
        for a in archives:
            if a["name"] == wanted:
                return a
    return archives[0] if archives else None


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack into dest; a single top-level folder (adapter/) is flattened so dest is loadable."""
    staging = Path(tempfile.mkdtemp(prefix=".tuneq-unpack-", dir=dest.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            # The "data" filter refuses absolute paths, '..', links out of the tree and devices.
            tar.extractall(staging, filter="data")
        entries = list(staging.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        dest.mkdir(parents=True, exist_ok=True)
        for entry in root.iterdir():
            shutil.move(str(entry), dest / entry.name)
    except tarfile.TarError as exc:
        raise TuneqError(f"{archive.name}: not a valid archive ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _missing_archive(job: dict[str, Any], wanted: str | None) -> str:
    if job["status"] != "succeeded" and wanted not in LOG_ARCHIVES:
        return f"job {job['id']} has no archive to download (status: {job['status']}; results appear when it succeeds)"
    if wanted == MERGED_ARCHIVE:
        return f"job {job['id']} exported no merged model; create the job with \"export\": {{\"merged\": true}}"
    if wanted == TENSORBOARD_ARCHIVE:
        return f"job {job['id']} has no TensorBoard logs (yet: they are published when the job ends; status: {job['status']})"
    if wanted == WANDB_ARCHIVE:
        return (f"job {job['id']} has no W&B run (yet: it is published when the job ends, for jobs created with "
                f"integrations [{{\"type\": \"wandb\", ...}}]; status: {job['status']})")
    return f"job {job['id']} has no archive to download"


@friendly
def download(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A succeeded job's id.")],
    dest: Annotated[Path, typer.Argument(metavar="DIR", help="Where the adapter (or model) files go.")],
    merged: Annotated[bool, typer.Option("--merged", help="The adapter merged into the base model (jobs with export.merged).")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="The TensorBoard logs: `tensorboard --logdir DIR`.")] = False,
    wandb: Annotated[bool, typer.Option("--wandb", help="The offline W&B runs: `wandb sync DIR/offline-run-*`.")] = False,
    keep_archive: Annotated[bool, typer.Option(help="Also keep the .tar.gz next to DIR.")] = False,
) -> None:
    """Download a job's adapter (or full model, merged model, TensorBoard logs, W&B runs) and unpack it into DIR."""
    chosen = [name for name, given in ((MERGED_ARCHIVE, merged), (TENSORBOARD_ARCHIVE, tensorboard),
                                       (WANDB_ARCHIVE, wandb)) if given]
    if len(chosen) > 1:
        raise fail("--merged, --tensorboard and --wandb: choose one")
    wanted = chosen[0] if chosen else None
    dest = dest.resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise fail(f"{dest} exists and is not an empty directory")
    with client() as c:
        job = c.get_job(job_id)
        art = _pick_archive(c.artifacts(job_id), wanted)
        if art is None:
            raise fail(_missing_archive(job, wanted))
        dest.parent.mkdir(parents=True, exist_ok=True)
        archive = dest.parent / f".{dest.name}.{art['name']}.part"
        try:
            with err.status(f"downloading {art['name']} ({art['bytes']} bytes)"):
                c.download_artifact(job_id, art, archive)
            _unpack(archive, dest)
            if keep_archive:
                archive.replace(dest.parent / f"{dest.name}.{art['name']}")
        finally:
            archive.unlink(missing_ok=True)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    err.print(f"unpacked {art['name']} into {dest}: {len(files)} files")
    print(dest)
