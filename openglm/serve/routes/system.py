"""The server itself: health, Prometheus metrics, the API spec and its Swagger UI page.

``/metrics`` and ``/openapi.json`` answer the admin key only, unless the app opened them to anyone
(``app.state.public_metrics`` / ``app.state.docs``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .. import schemas as S
from .deps import Svc, admin

router = APIRouter()


@router.get("/health", responses={503: {"model": S.ErrorResponse}})
async def health(svc: Svc):
    """200 once the model is loaded and the engine runs; 503 while it loads or if its engine stopped."""
    return svc.generations.health()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, svc: Svc):
    if not request.app.state.public_metrics:
        await admin(request)
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request):
    if not request.app.state.docs:
        await admin(request)
    return JSONResponse(request.app.openapi())


def add_swagger_ui(app) -> None:
    """Serve Swagger UI at ``/docs`` from the ``swagger-ui-bundle`` package's files, so that the page
    loads nothing from the network (fails now, not at the first visit, if the package is missing)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    from ...errors import OpenGLMError

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        raise OpenGLMError("serving /docs needs the swagger-ui-bundle package: pip install 'openglm[serve]'") from None
    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        # Relative URLs: the page works behind a proxy that mounts the server under a prefix.
        # No validatorUrl: Swagger UI would otherwise send the spec to validator.swagger.io.
        return get_swagger_ui_html(openapi_url="openapi.json", title="OpenGLM API",
                                   swagger_js_url="docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="docs/assets/swagger-ui.css",
                                   swagger_favicon_url="docs/assets/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})
