"""/docs, the interactive API reference: off unless TUNEQ_API_DOCS=true.

Swagger UI is not shipped in any installed package, so the page loads it from a CDN. The page
shares its origin with /ui, which keeps the user's API key in localStorage: a script swapped on
the CDN could read it. Hence it is off by default; when on, the version is pinned and a
Content-Security-Policy lets the page run only that CDN's files and its own inline script (by
hash), and talk to this server alone. /openapi.json (data, no scripts) is always served.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

CDN = "https://cdn.jsdelivr.net"
SWAGGER = f"{CDN}/npm/swagger-ui-dist@5.17.14"


def _csp(html: str) -> str:
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
        for body in re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    )
    return (f"default-src 'none'; script-src {CDN} {hashes}; style-src {CDN}; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def install(app: FastAPI, enabled: bool) -> None:
    if not enabled:
        return
    html = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
        swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js", swagger_css_url=f"{SWAGGER}/swagger-ui.css",
        swagger_favicon_url="data:,",
    ).body.decode()
    headers = {"Content-Security-Policy": _csp(html), "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)
