"""The chat app's page at ``/`` and its static files.

The page is plain ES modules and vendored libraries under ``static/`` (no CDN), served with a strict
Content-Security-Policy: no inline script or style, nothing loaded from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent.parent / "static"
# Scripts, styles, fonts and API calls from this origin only; no inline code, no frames, no plugins.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; font-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                "x-frame-options": "DENY", "cache-control": "no-cache"}

router = APIRouter()


class _Static(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers["x-content-type-options"] = "nosniff"
        return response


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


def mount_static(app) -> None:
    """Serve ``static/`` at ``/static`` (a mount: routers cannot carry one)."""
    app.mount("/static", _Static(directory=STATIC_DIR), name="static")
