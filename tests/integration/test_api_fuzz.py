"""Schemathesis against the app's own OpenAPI schema, in process: no input may cause a 5xx.

Every operation gets valid inputs (positive) and inputs that break the schema (negative), sent
with a valid admin key so requests get past authentication into the routes, on PostgreSQL (it
refuses more than SQLite does: NUL bytes in text, integers out of range).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import reset_caches

pytestmark = pytest.mark.slow

POSITIVE_PER_OPERATION = 30
NEGATIVE_PER_OPERATION = 20
MIN_CASES = 1000


def numeric_fields(schema: Any, path: str, defs: dict[str, Any], seen: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """(where, schema) of every integer/number in a request schema, through $refs and unions."""
    if not isinstance(schema, dict):
        return []
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return []
        return numeric_fields(defs[name], path, defs, seen | {name})
    out = []
    if schema.get("type") in ("integer", "number"):
        out.append((path, schema))
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            out += numeric_fields(sub, path, defs, seen)
    for name, sub in (schema.get("properties") or {}).items():
        out += numeric_fields(sub, f"{path}.{name}", defs, seen)
    if isinstance(schema.get("items"), dict):
        out += numeric_fields(schema["items"], f"{path}[]", defs, seen)
    return out


def test_every_numeric_input_is_bounded() -> None:
    from api.main import create_app

    doc = create_app().openapi()
    defs = doc.get("components", {}).get("schemas", {})
    unbounded = []
    for route, ops in doc["paths"].items():
        for method, op in ops.items():
            fields = []
            for p in op.get("parameters", []):
                fields += numeric_fields(p.get("schema"), f"{method.upper()} {route} {p['in']}:{p['name']}", defs, set())
            for media in (op.get("requestBody") or {}).get("content", {}).values():
                fields += numeric_fields(media.get("schema"), f"{method.upper()} {route} body", defs, set())
            for where, s in fields:
                low = "minimum" in s or "exclusiveMinimum" in s
                high = "maximum" in s or "exclusiveMaximum" in s
                if not (low and high):
                    unbounded.append(where)
    assert unbounded == []


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_fuzz_the_openapi_schema(service_env: dict[str, str], admin_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    from api.main import create_app

    # Fuzzed job creations must meet the code under test, not the rate limit.
    monkeypatch.setenv("TUNEQ_JOB_CREATE_RATE", "100000")
    reset_caches()
    app = create_app()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {admin_key}"}
    cases = 0
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20

    for operation in operations:
        for mode, examples in ((GenerationMode.POSITIVE, POSITIVE_PER_OPERATION), (GenerationMode.NEGATIVE, NEGATIVE_PER_OPERATION)):

            @given(data=st.data())
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(data: st.DataObject) -> None:
                nonlocal cases
                case = data.draw(operation.as_strategy(generation_mode=mode))
                cases += 1
                response = case.call(headers=headers)
                # The readiness probe's 503 (it names what it waits on) is its answer, not an error.
                not_ready = case.path == "/readyz" and response.status_code == 503 and "waiting_on" in response.text
                if response.status_code >= 500 and not not_ready and len(failures) < 20:
                    failures.append(f"{case.method} {case.formatted_path} {mode.value}: {response.status_code} "
                                    f"{response.text[:300]}\n  {json.dumps(case.body, default=str)[:300] if case.body is not None else ''}"
                                    f" query={case.query} path={case.path_parameters}")

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - a strategy that cannot generate is reported, not fatal
                if "Unsatisfiable" not in type(exc).__name__:
                    raise
    print(f"schemathesis: {cases} cases over {len(operations)} operations, {len(failures)} server errors")
    assert failures == []
    assert cases >= MIN_CASES


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_nul_bytes_anywhere_are_a_client_error(service_env: dict[str, str], admin_headers: dict[str, str]) -> None:
    """A NUL byte in an id, a cursor, a filter or a body field: 4xx, never 500 (PostgreSQL refuses NUL in text)."""
    from fastapi.routing import iter_route_contexts
    from fastapi.testclient import TestClient

    from api.main import create_app

    app = create_app()
    wrong = []
    with TestClient(app, headers=admin_headers, raise_server_exceptions=False) as c:
        for ctx in iter_route_contexts(app.routes):
            if "{" not in (ctx.path_format or ""):
                continue
            url = ctx.path_format
            while "{" in url:
                start, end = url.index("{"), url.index("}")
                url = url[:start] + "a%00b" + url[end + 1:]
            for method in sorted((ctx.methods or set()) - {"HEAD"}):
                r = c.request(method, url, json={})
                if not 400 <= r.status_code < 500:
                    wrong.append((method, url, r.status_code))
        for url in ("/v1/fine_tuning/jobs?after=a%00b", "/v1/files?after=a%00b", "/v1/files?purpose=a%00",
                    "/v1/fine_tuning/jobs?status=a%00", "/v1/admin/users?after=a%00"):
            if not 400 <= (code := c.get(url).status_code) < 500:
                wrong.append(("GET", url, code))
        for body in ({"model": "tiny-llama", "training_file": "f\x00"}, {"model": "tiny\x00", "training_file": "f"},
                     {"model": "tiny-llama", "training_file": "f", "validation_file": "\x00"}):
            if not 400 <= (code := c.post("/v1/fine_tuning/jobs", json=body).status_code) < 500:
                wrong.append(("POST", json.dumps(body), code))
    assert wrong == []
