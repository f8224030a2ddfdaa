"""A succeeded job's results file, OpenAI's `result_files`: its figures per step as CSV.

It is written from the job's events in the database (every attempt's, whichever host ran it), so
a job resumed elsewhere has its whole curve. It is a file of purpose `fine-tune-results` owned by
the job's owner, which the Files API lists and serves as it does an upload; a job cannot train
on it. Columns: `step`, then each figure under the trainer's name (train_loss, learning_rate,
valid_loss, eval_<grader>, ...) in the order first seen; an empty cell where a step has none. A
step trained again after a resume keeps its last figures.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import File, Job, JobEvent, new_id
from core.storage import Storage
from trainer.curves import SCALARS, step_figures

PURPOSE = "fine-tune-results"
FILENAME = "step_metrics.csv"
MEDIA_TYPE = "text/csv"
EVENT_TYPES = (*SCALARS, "eval")


def results_table(events: Iterable[tuple[str, Any]]) -> bytes:
    """The CSV of (event type, data) pairs in the order they happened."""
    rows: dict[int, dict[str, float]] = {}
    columns: dict[str, None] = {}
    for ev_type, data in events:
        found = step_figures(ev_type, data)
        if found is None:
            continue
        step, figures = found
        rows.setdefault(step, {}).update(figures)
        columns.update(dict.fromkeys(figures))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", *columns])
    for step in sorted(rows):
        writer.writerow([step, *(rows[step].get(name, "") for name in columns)])
    return out.getvalue().encode()


def store_results(db: Session, storage: Storage, job: Job) -> File:
    """Store the job's results file; its row, not added yet. Called before the job's row is
    locked to record the success: a long job has many thousands of events to read."""
    events = db.execute(select(JobEvent.type, JobEvent.data)
                        .where(JobEvent.job_id == job.id, JobEvent.type.in_(EVENT_TYPES)).order_by(JobEvent.seq))
    data = results_table((t, d) for t, d in events)
    file_id = new_id("file")
    key = f"files/{file_id}.csv"
    size, sha256 = storage.put_stream(key, io.BytesIO(data))
    return File(id=file_id, owner_id=job.owner_id, filename=FILENAME, purpose=PURPOSE, bytes=size, storage_key=key,
                status="processed", sha256=sha256, report={})
