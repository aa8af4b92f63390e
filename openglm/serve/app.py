"""The HTTP API: OpenAI-compatible routes, Zhipu's chat route, GLM infilling, usage, admin, metrics, a chat page.

Every generation request goes: body checks (pydantic) -> key (``Auth``) -> model name -> prompt
tokens and length checks -> ``Billing.reserve`` (worst case: prompt + max tokens) -> the backend ->
``Billing.settle`` with the backend's own token counts. Nothing reaches the model before all checks
pass. Rendering a chat and tokenizing text cost time in their size: a chat is bounded, and the key's
limits and balance are checked (``Billing.check``) before either runs, on a worker thread.

Routes (``routes/``, one module per API) are thin over the services (``services/``); this module
only wires them together.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import schemas as S
from .errors import add_error_handlers
from .middleware import BodyLimit
from .routes import account, admin, conversations, infill, openai, system, web, zhipu
from .services import EngineBackend, Services

JOBS_SETTLE_SECONDS = 10  # at shutdown, how long the cancelled jobs may take to settle their bills
DESCRIPTION = "OpenAI-compatible and Zhipu-compatible API for GLM models, with GLM blank infilling."


def create_app(engine, store, model_name: str, tokenizer, *, admin_key: str | None = None,
               max_body_bytes: int = 1 << 20, public_metrics: bool = False, docs: bool = False) -> FastAPI:
    """The HTTP API over ``engine`` (an ``openglm.serve.engine.Engine``) and ``store`` (a ``Store``).

    ``engine`` may be None while the model loads (``/health`` and the generation routes answer 503)
    and be given later with ``attach_model``. The app starts the engine when it starts and stops it
    when it shuts down. ``admin_key``: a secret for the admin routes besides store keys marked admin.
    ``max_body_bytes``: larger request bodies get 413 before they are parsed.

    Every API route needs a key. ``/metrics`` and ``/openapi.json`` answer an admin key only, unless
    ``public_metrics`` / ``docs`` open them to anyone; ``docs`` also serves Swagger UI at ``/docs``
    from the ``swagger-ui-bundle`` package's files, so the page loads nothing from the network.
    """
    services = Services.build(EngineBackend(engine), store, model_name, tokenizer, admin_key)
    app = app_for(services, backend_lifespan, max_body_bytes=max_body_bytes, public_metrics=public_metrics, docs=docs)
    add_api_routes(app)
    return app


def add_api_routes(app: FastAPI) -> None:
    """Every route of the server: the chat app, the account, OpenAI's, Zhipu's, GLM's and the admin API."""
    web.mount_static(app)
    for module in (web, conversations, account, system, openai, zhipu, infill, admin):
        app.include_router(module.router)


def app_for(services, lifespan, *, title: str = "OpenGLM", description: str = DESCRIPTION,
            max_body_bytes: int = 1 << 20, public_metrics: bool = False, docs: bool = False) -> FastAPI:
    """An app over ``services`` (``app.state.services``) with no routes yet: its ``lifespan`` (a function
    of the app, an async context manager), error answers, body limit and Swagger UI (see ``create_app``)."""
    app = FastAPI(title=title, version=_version(), lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, description=description,
                  responses={k: {"model": S.ErrorResponse} for k in (400, 401, 403, 404, 413, 429, 503)})
    app.state.services = services
    app.state.public_metrics, app.state.docs = public_metrics, docs
    _declare_errors_as_sent(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    add_error_handlers(app)
    if docs:
        system.add_swagger_ui(app)
    return app


@asynccontextmanager
async def backend_lifespan(app: FastAPI):
    """The generation backend starts with the app; at shutdown it stops, then the jobs it ended settle."""
    services: Services = app.state.services
    services.backend.start()
    yield
    services.backend.stop()
    await services.generations.wait_for_jobs(JOBS_SETTLE_SECONDS)
    services.billing.close()


def attach_model(app: FastAPI, engine, tokenizer) -> None:
    """Give an app created with ``engine=None`` its loaded engine: ``/health`` turns 200."""
    services: Services = app.state.services
    engine.start()
    services.tokens.tokenizer = tokenizer
    services.backend.engine = engine


def _declare_errors_as_sent(app: FastAPI) -> None:
    """Drop the 422 "Validation Error" that FastAPI adds to every route's spec: bad input is a 400 here."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def _version() -> str:
    from .. import __version__

    return __version__
