"""A continued job's init_from: the source job or checkpoint id, made a local directory."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Artifact, Checkpoint
from core.storage import get_storage
from worker.checkpoint_store import weights_dir


def resolve_init_from(db: Session, ref: str) -> str:
    """The directory of `ref`'s weights on this host; ValueError saying what is missing."""
    if ref.startswith("ftckpt-"):
        ck = db.get(Checkpoint, ref)
        if ck is None:
            raise ValueError(f"from_checkpoint: checkpoint {ref} does not exist")
        if ck.uploaded_at is None or not ck.storage_key:
            if Path(ck.path).is_dir():  # a checkpoint from before the store kept them, on its host
                return ck.path
            raise ValueError(f"from_checkpoint: checkpoint {ref} (step {ck.step}) is not in the store yet")
        return str(weights_dir(get_storage(), ck.storage_key))
    if ref.startswith("ftjob-"):
        storage = get_storage()
        rows = db.scalars(select(Artifact).where(Artifact.job_id == ref, Artifact.name.like("final/%"))).all()
        # The merged model is not needed to continue, and may be large.
        wanted = [a for a in rows if not a.name.startswith("final/merged/")]
        if not wanted:
            raise ValueError(f"from_checkpoint: job {ref} has no final weights stored")
        # Every file is fetched: storage keeps final/ as one folder, so they land side by side.
        paths = {a.name: storage.local_path(a.storage_key) for a in wanted}
        anchor = paths.get("final/adapter_config.json") or paths.get("final/config.json") or next(iter(paths.values()))
        return str(anchor.parent)
    return ref  # already a path (a spec written by hand)
