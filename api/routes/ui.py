"""The web dashboard: one HTML page and its ES modules, served without a key.

The page holds no data of its own; it calls the /v1 API from the browser with the API key the
user types in, so every rule of the API (who sees which job) applies to it unchanged.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

UI_DIR = Path(__file__).resolve().parents[1] / "ui"

# Scripts, styles and fetches from this origin only: no inline script can run, so text from a
# job or file that slipped into the page could still not execute. blob: lets a download be saved.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new deploy must reach browsers without a hard reload; the files are small.
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["ui"], include_in_schema=False)


class _UIFiles(StaticFiles):
    """The dashboard's modules and stylesheet, with the same headers as the page."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


@router.get("/ui")
def dashboard() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/ui/")
def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", _UIFiles(directory=UI_DIR / "static"), name="ui-static")
