"""One error shape for every failure: `{"error": {"message", "type", "param", "code"}}`.

It is OpenAI's, so the official SDK raises its typed exceptions (BadRequestError, NotFoundError,
ConflictError, ...) with our message and param.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.identity import IdentityError
from core.jobs import JobError
from core.limits import LimitExceeded
from core.model_roots import ModelNotFound
from core.states import IllegalTransition

log = logging.getLogger("tuneq.api")

# What a client is told to wait after a database outage answer: about a PostgreSQL restart.
RETRY_AFTER_S = 2

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.extra = extra  # machine-readable details beside the message, e.g. a plan's numbers
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class BodyTooLarge(StarletteHTTPException):
    """A request body past its route's cap, raised while it is read (api.body_limits).

    An HTTPException, because FastAPI turns any other error raised while it reads a body into
    a 400 about parsing."""

    def __init__(self, message: str, param: str | None, code: str):
        super().__init__(413, message)
        self.param = param
        self.code = code


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(what: str, id_: str, param: str | None = None) -> APIError:
    return APIError(404, f"No {what} with id {id_!r}", param=param, code="not_found")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {message, type, param, code}}."""
    body: dict[str, Any] = {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param,
                                      "code": code}}
    if extra:
        body["error"]["details"] = extra
    return body


def envelope(status: int, message: str, param: str | None = None, code: str | None = None,
             headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> JSONResponse:
    body = error_body(status, message, param, code, extra)
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return JSONResponse(body, status_code=status, headers=headers)


def dotted(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """('body', 'hyperparameters', 'n_epochs') -> 'hyperparameters.n_epochs'; list indexes as [i]."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def _strip_prefix(msg: str) -> str:
    # pydantic prefixes errors raised in validators with "Value error, "; users need only the reason.
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def first_validation_error(errors: list[dict[str, Any]], drop: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """(message, param) of the first pydantic error, the param as a dotted path of the field."""
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p not in drop]
    # Union branches add their type name to the path ("method.str"); users never typed those.
    loc = [p for p in loc if not (isinstance(p, str) and (p in {"str", "int", "float", "bool"} or p.startswith(("dict[", "list[", "literal[", "function-", "constrained-"))))]
    param = dotted(loc)
    reason = _strip_prefix(str(err.get("msg", "invalid value")))
    if ":" in reason:
        # Model-level checks name their field first ("hyperparameters.warmup_steps: ..."), more
        # precisely than their location (the model, or nothing).
        head = reason.split(":", 1)[0]
        if head and all(c.isalnum() or c in "._[]" for c in head) and (param is None or head.startswith(param + ".")):
            param = head
    message = f"{param}: {reason}" if param and not reason.startswith(param) else reason
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return message, param


def _whole_body_error(err: dict[str, Any]) -> str | None:
    """The message for a body that is no JSON object at all, which pydantic reports at a location
    that reads like a field (a character offset, or none)."""
    loc = tuple(err.get("loc", ()))
    if not loc or loc[0] != "body":
        return None
    if err.get("type") == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return f"the request body is not valid JSON: {(err.get('ctx') or {}).get('error', 'invalid')}{where}"
    if len(loc) == 1 and err.get("type") == "missing":
        return "the request body is missing: send a JSON object with Content-Type: application/json"
    if len(loc) == 1 and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object, sent with Content-Type: application/json"
    return None


def database_unavailable(exc: BaseException) -> bool:
    """A lost or refused database connection (restart, failover), not a bad statement."""
    return isinstance(exc, DBAPIError) and (isinstance(exc, OperationalError) or exc.connection_invalidated)


def unavailable(exc: BaseException) -> JSONResponse:
    log.warning("database unavailable: %s", str(exc).splitlines()[0][:300])
    return envelope(503, "the database is unavailable; retry shortly", None, "database_unavailable",
                    {"Retry-After": str(RETRY_AFTER_S)})


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return envelope(exc.status, exc.message, exc.param, exc.code, exc.headers, exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        whole = _whole_body_error(errors[0]) if errors else None
        if whole is not None:
            return envelope(400, whole, None, "invalid_json")
        message, param = first_validation_error(errors, drop=("body", "query", "path", "header"))
        return envelope(400, message, param, "invalid_value")

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        message, param = first_validation_error(exc.errors())
        return envelope(400, message, param, "invalid_value")

    @app.exception_handler(JobError)
    async def _job_error(_: Request, exc: JobError) -> JSONResponse:
        return envelope(400, str(exc), exc.param, exc.code)

    @app.exception_handler(IdentityError)
    async def _identity_error(_: Request, exc: IdentityError) -> JSONResponse:
        status = {"not_found": 404, "user_exists": 409}.get(exc.code, 400)
        return envelope(status, str(exc), exc.param, exc.code)

    @app.exception_handler(LimitExceeded)
    async def _limit(_: Request, exc: LimitExceeded) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return envelope(exc.status, str(exc), exc.param, exc.code, headers)

    @app.exception_handler(ModelNotFound)
    async def _model_not_found(_: Request, exc: ModelNotFound) -> JSONResponse:
        return envelope(400, str(exc), "model", "model_not_found")

    @app.exception_handler(IllegalTransition)
    async def _illegal(_: Request, exc: IllegalTransition) -> JSONResponse:
        return envelope(409, str(exc), None, "invalid_state")

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        # PostgreSQL refuses what SQLite stores: NUL bytes in text, integers beyond 64 bits. Such a
        # value comes from the request, so it is the client's error, not a server fault.
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else "invalid value"
        log.warning("database refused a value on %s %s: %s", request.method, request.url.path, reason)
        return envelope(400, f"a value in the request cannot be stored: {reason}", None, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "No such route"
        if isinstance(exc, BodyTooLarge):
            return envelope(413, message, exc.param, exc.code)
        return envelope(exc.status_code, message, None, None, exc.headers)

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if not database_unavailable(exc):
            return unexpected(request, exc)
        # Read by api.db_retry: a read cut off by the outage may be run once more.
        request.state.database_unavailable = True
        return unavailable(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected(request, exc)


def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A 500 naming the request id; the log gets one line, the traceback only at debug level."""
    if database_unavailable(exc):  # raised in a middleware, outside the handler above
        return unavailable(exc)
    from api.request_log import one_line

    request_id = getattr(request.state, "request_id", None) or "-"
    log.error("500 on %s %s [%s]: %s", request.method, request.url.path, request_id, one_line(exc))
    log.debug("traceback of request %s", request_id, exc_info=exc)
    return envelope(500, f"internal error (request {request_id}); see the API server's log", None, "internal_error")
