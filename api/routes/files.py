"""Training and validation files: stored under a key tuneq chooses, validated line by line on upload."""

from __future__ import annotations

import asyncio
from pathlib import PurePath
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from python_multipart.multipart import parse_options_header
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from api.content import stored_content
from api.crud import bad_lines_summary, load_file
from api.deps import CurrentUser, SessionDep, SettingsDep, StorageDep
from api.errors import APIError, bad_request, not_found
from api.limits import check_examples
from api.pagination import MAX_LIMIT, AfterQuery, LimitQuery, make_page, page_size
from api.schemas import FileDeleted, FileObject, Page
from api.upload_stream import MultipartFile, Pipe, feed
from api.uploads import FORM_OVERHEAD, too_large_message
from core import results
from core.identity import DELETED, can_read_file, readable_files
from core.limits import check_file_quota, jobs_using_file, lock_files
from core.models import File, User, new_id
from core.settings import Settings
from core.storage import Storage

router = APIRouter(prefix="/v1/files", tags=["files"])

PURPOSES = ("fine-tune",)
# An upload holds its thread while its body arrives (seconds to minutes): uploads count against a
# limit of their own, not against the threads that short reads need.
UPLOAD_THREADS = anyio.CapacityLimiter(16)


def file_out(f: File) -> FileObject:
    return FileObject(
        id=f.id, bytes=f.bytes, created_at=int(f.created_at), filename=f.filename, purpose=f.purpose,
        status="processed" if f.status == "processed" else "error",
        status_details=None if f.status == "processed" else bad_lines_summary(f.report),
        sha256=f.sha256, validation=f.report or {},
    )


def _display_name(filename: str | None) -> str:
    # Shown back to the user only; the stored key never contains it.
    name = PurePath((filename or "").replace("\\", "/")).name
    return name[:255] or "upload.jsonl"


def validate_upload(path: str) -> dict[str, Any]:
    from trainer.data.validate import validate_file  # no torch: a file is checked without it

    return validate_file(path, tokenizer=None, max_seq_len=None)


def _validate(path: str) -> dict[str, Any]:
    # Parsing every line is seconds of pure-Python CPU for a large file; in the API's child
    # process it does not hold the interpreter lock that other requests need meanwhile.
    from api.validation import run_in_child

    return run_in_child(validate_upload, path)


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "contentMediaType": "application/octet-stream",
                 "description": "A JSONL file, one example per line."},
        "purpose": {"type": "string", "description": "'fine-tune'."}}}}}}}


@router.post("", response_model=FileObject, openapi_extra=UPLOAD_BODY)
async def create_file(request: Request, user: CurrentUser, db: SessionDep, settings: SettingsDep,
                      storage: StorageDep) -> FileObject:
    """Upload a file (multipart/form-data: `file`, `purpose`), streamed into storage as it arrives
    (api/upload_stream.py): the event loop only passes the body's chunks on."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not options.get(b"boundary"):
        raise bad_request("file: required; send the file as multipart/form-data with a part named 'file'", "file")
    pipe = Pipe(asyncio.get_running_loop())
    form = MultipartFile(pipe, options[b"boundary"], settings.max_upload_bytes,
                         lambda: APIError(413, too_large_message(settings.max_upload_bytes), param="file", code="file_too_large"))
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() else 0
    work = asyncio.ensure_future(anyio.to_thread.run_sync(_store_upload, form, db, user, settings, storage, declared,
                                                          limiter=UPLOAD_THREADS))
    feeder = asyncio.ensure_future(feed(pipe, request.stream(), work))
    feeder.add_done_callback(lambda f: f.cancelled() or f.exception())  # its error reaches `work`
    try:
        return await work
    finally:
        feeder.cancel()
        if not work.done():  # this request was cancelled: the thread must not wait for chunks forever
            pipe.abort()


def _store_upload(form: MultipartFile, db: Session, user: User, settings: Settings, storage: Storage,
                  declared: int) -> FileObject:
    """On a worker thread: the file part into storage, then the checks and the row."""
    try:
        # Before a byte is stored: a user at the quota hears so at once (checked again, exactly, below).
        check_file_quota(db, user, max(0, declared - FORM_OVERHEAD), settings, lock=False)
        db.rollback()  # no pooled connection held while the body arrives
        if not form.wait_for_file():
            _check_purpose(form.fields)
            raise bad_request("file: required; send the file as a multipart part named 'file'", "file")
        if "purpose" in form.fields:  # sent before the file, as most clients do: refused before storing
            _check_purpose(form.fields)
        file_id = new_id("file")
        key = f"files/{file_id}.jsonl"
        try:
            size, sha256 = storage.put_stream(key, form)  # type: ignore[arg-type]
            form.finish()
            _check_purpose(form.fields)
            row = _checked_row(db, user, settings, storage, key, file_id=file_id, owner_id=user.id,
                               filename=_display_name(form.filename), purpose=form.fields["purpose"], bytes=size,
                               sha256=sha256)
            db.commit()
        except BaseException:
            # A refused or failed upload leaves no stored object without a row behind.
            db.rollback()
            storage.delete(key)
            raise
        return file_out(row)
    finally:
        form.pipe.close()


def _check_purpose(fields: dict[str, str]) -> None:
    if "purpose" not in fields:
        raise bad_request("purpose: required; send it as a form field", "purpose")
    if fields["purpose"] not in PURPOSES:
        raise bad_request(f"purpose: must be 'fine-tune', got {fields['purpose']!r}", "purpose")


def _checked_row(db: Session, user: User, settings: Settings, storage: Storage, key: str, **fields: Any) -> File:
    """The row of a stored upload, validated and within the user's quota (checked under the lock)."""
    report = _validate(str(storage.local_path(key)))
    check_examples(report, settings)
    check_file_quota(db, user, fields["bytes"], settings)
    row = File(id=fields.pop("file_id"), storage_key=key, status="processed" if report.get("valid") else "error",
               report=report, **fields)
    db.add(row)
    return row


@router.delete("/{file_id}")
def delete_file(file_id: str, user: CurrentUser, db: SessionDep, storage: StorageDep) -> FileDeleted:
    """Delete a file and its stored bytes; refused (409) while an unfinished job uses it."""
    f = load_file(db, file_id, user)
    # A job creation that names the file locks its row too, whoever creates the job: one of the
    # two waits for the other and then sees its job, or its deletion.
    lock_files(db, {f.id})
    db.refresh(f)
    if f.status == DELETED:  # deleted by a concurrent request meanwhile
        raise not_found("file", file_id)
    users = jobs_using_file(db, f.id)
    if users:
        raise APIError(409, f"file {file_id} is used by unfinished job(s) {', '.join(users)}; cancel them or wait "
                       "until they finish", param="file_id", code="file_in_use")
    storage.delete(f.storage_key)
    f.status = DELETED
    db.commit()
    return FileDeleted(id=f.id)


@router.get("")
def list_files(
    user: CurrentUser,
    db: SessionDep,
    settings: SettingsDep,
    after: AfterQuery = None,
    limit: LimitQuery = MAX_LIMIT,  # OpenAI's default for files: all of them (a page of the server's size)
    purpose: Annotated[str | None, Query()] = None,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> Page[FileObject]:
    limit = page_size(limit, settings)
    desc = order == "desc"
    stmt = select(File).where(readable_files(user))
    if purpose is not None:
        stmt = stmt.where(File.purpose == purpose)
    if after is not None:
        cursor = db.get(File, after)
        if cursor is None or not can_read_file(user, cursor):
            raise bad_request(f"after: no file with id {after!r}", "after")
        if desc:
            stmt = stmt.where(or_(File.created_at < cursor.created_at, and_(File.created_at == cursor.created_at, File.id < cursor.id)))
        else:
            stmt = stmt.where(or_(File.created_at > cursor.created_at, and_(File.created_at == cursor.created_at, File.id > cursor.id)))
    order_by = (File.created_at.desc(), File.id.desc()) if desc else (File.created_at.asc(), File.id.asc())
    rows = db.scalars(stmt.order_by(*order_by).limit(limit + 1)).all()
    return make_page(rows, limit, file_out)


@router.get("/{file_id}")
def get_file(file_id: str, user: CurrentUser, db: SessionDep) -> FileObject:
    return file_out(load_file(db, file_id, user))


@router.get("/{file_id}/content", response_class=FileResponse)
def get_file_content(file_id: str, user: CurrentUser, db: SessionDep, storage: StorageDep) -> Response:
    f = load_file(db, file_id, user)
    if not storage.exists(f.storage_key):
        raise APIError(404, f"the content of file {file_id} is missing from storage", code="content_missing")
    media_type = results.MEDIA_TYPE if f.purpose == results.PURPOSE else "application/jsonl"
    return stored_content(storage, f.storage_key, size=f.bytes, media_type=media_type, filename=f.filename)
