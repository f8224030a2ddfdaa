"""A job created on a file while the file's owner deletes it: exactly one of the two wins.

The job's creator need not own the file (an admin trains on a member's file), so the creation
and the deletion must serialise on something both take whoever the users are. Runs on SQLite
and on PostgreSQL, whose row locks are where a lock on the wrong row lets both through.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.security.conftest import GOOD_LINE, create, upload

# How long the creation, past its check that the files still exist, waits for the deletion to
# make its own check: a deletion that is not held off by the creation's lock makes it at once.
OVERLAP_S = 3.0


def outcome(created, deleted) -> tuple[int, int]:  # noqa: ANN001
    """(creation, deletion) status codes, after checking that each loser names its reason."""
    if created.status_code == 400:
        assert created.json()["error"]["code"] == "file_not_found", created.text
        assert created.json()["error"]["param"] == "training_file", created.text
    if deleted.status_code == 409:
        assert deleted.json()["error"]["code"] == "file_in_use", deleted.text
    return created.status_code, deleted.status_code


@pytest.mark.dialects
def test_admin_creation_and_owner_deletion_serialise(member, admin, monkeypatch) -> None:  # noqa: ANN001
    """The deletion asks whether a job uses the file while the creation, having checked the file,
    has not committed yet: only a lock the deletion waits on keeps it from answering 200 too."""
    import api.admission
    import api.routes.files

    f = upload(member)
    admin.get("/v1/fine_tuning/jobs")  # the app's first request is slow; not this test's business
    creation_checked, deletion_checked = threading.Event(), threading.Event()
    real_deleted_files, real_jobs_using_file = api.admission.deleted_files, api.routes.files.jobs_using_file

    def deleted_files(db, file_ids):  # noqa: ANN001, ANN202
        gone = real_deleted_files(db, file_ids)
        creation_checked.set()
        deletion_checked.wait(OVERLAP_S)
        return gone

    def jobs_using_file(db, file_id):  # noqa: ANN001, ANN202
        users = real_jobs_using_file(db, file_id)
        deletion_checked.set()
        return users

    monkeypatch.setattr(api.admission, "deleted_files", deleted_files)
    monkeypatch.setattr(api.routes.files, "jobs_using_file", jobs_using_file)

    def delete():  # noqa: ANN202
        assert creation_checked.wait(60)
        return member.delete(f"/v1/files/{f}")

    with ThreadPoolExecutor(2) as pool:
        deleting = pool.submit(delete)
        created = create(admin, f)
        deleted = deleting.result(timeout=60)
    # The creation holds the file when the deletion comes: the deletion must wait and refuse.
    assert outcome(created, deleted) == (200, 409), (created.text, deleted.text)
    assert member.get(f"/v1/files/{f}").status_code == 200


@pytest.mark.dialects
def test_concurrent_creation_and_deletion_never_both_succeed(member, admin, limits, service_env) -> None:  # noqa: ANN001
    """Unprompted races, admin creating and owner deleting at one barrier: never both 200."""
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import File, Job

    limits(job_create_rate=10_000)
    admin.get("/v1/fine_tuning/jobs")
    results = []
    for _ in range(6):
        f = upload(member)
        barrier = threading.Barrier(2)

        def at_once(call):  # noqa: ANN001, ANN202
            barrier.wait(30)
            return call()

        with ThreadPoolExecutor(2) as pool:
            deleting = pool.submit(at_once, lambda: member.delete(f"/v1/files/{f}"))
            created = at_once(lambda: create(admin, f))
            deleted = deleting.result(timeout=60)
        results.append(outcome(created, deleted))
        with session_scope() as db:
            status = db.scalar(select(File.status).where(File.id == f))
            jobs = db.scalars(select(Job.status).where(Job.training_file == f)).all()
        assert (status == "deleted") == (deleted.status_code == 200)
        assert bool(jobs) == (created.status_code == 200)
    assert all(r in ((200, 409), (400, 200)) for r in results), results



def test_a_file_deleted_while_its_job_is_checked_is_400_naming_it(member, monkeypatch) -> None:  # noqa: ANN001
    """The owner deletes the file after the creation read its row, before the data check reads its
    bytes (no job holds it yet, so the deletion succeeds): the creation answers 400, not 500."""
    import api.admission

    # Content of its own: no token report of an earlier test stands in for reading the bytes.
    f = upload(member, text=GOOD_LINE.replace("abc", "deleted-midway") + "\n")
    real_job_files = api.admission.job_files
    deleted = []

    def job_files(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        files = real_job_files(*args, **kwargs)
        with ThreadPoolExecutor(1) as pool:  # the DELETE as another request, on another thread
            deleted.append(pool.submit(member.delete, f"/v1/files/{f}").result(timeout=60))
        return files

    monkeypatch.setattr(api.admission, "job_files", job_files)
    r = create(member, f)
    assert deleted[0].status_code == 200, deleted[0].text
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "file_not_found" and r.json()["error"]["param"] == "training_file"
    assert f in r.json()["error"]["message"]
