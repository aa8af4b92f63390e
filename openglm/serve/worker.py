"""``openglm worker``: the engine alone behind the OpenAI routes, for a gateway (``openglm serve --upstream``).

A worker has no accounts, limits or ledger: the gateway in front of it keeps those. It serves
``/v1/completions``, ``/v1/chat/completions`` (streamed or not, with ``usage``), ``/v1/embeddings``, ``/v1/models``
and ``/health``, whose answer carries the engine's load (requests running and waiting, free batch
slots) for the gateway's routing. With a worker key every route but ``/health`` needs it as a bearer.
"""

from __future__ import annotations

import hmac
import os
import sys
import threading
from datetime import datetime, timezone
from uuid import uuid4

from fastapi import Depends

from .store import AuthError, KeyInfo, Reservation

DEFAULT_PORT = 8001
# The routes a worker keeps of the server's app: the OpenAI generation API and what a gateway asks.
WORKER_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models/{model}", "/metrics"}


class Unmetered:
    """The store the routes see in a worker: one shared secret (or none) instead of accounts, and
    reservations that hold nothing and bill nothing (the gateway in front bills)."""

    _engine = _reader = None  # no database: the chat app's routes, which would use one, are not served

    def __init__(self, worker_key: str | None):
        self.worker_key = worker_key
        now = datetime.now(timezone.utc)
        # The one key a worker knows: every model, no limits; admin, so that it may read /metrics.
        self.key = KeyInfo(id=0, account_id=0, name="worker", prefix="", created_at=now, expires_at=None,
                           revoked_at=None, models=None, rpm=None, tpm=None, max_concurrency=None, admin=True)

    def authenticate(self, secret: str | None) -> KeyInfo:
        if self.worker_key is not None and not hmac.compare_digest((secret or "").encode(), self.worker_key.encode()):
            raise AuthError("1002" if secret else "1000", "this worker needs its worker key as the bearer token"
                            if not secret else "invalid worker key")
        return self.key

    def check(self, key, model, request_id, prompt_tokens, max_tokens) -> None:
        pass

    def reserve(self, key, model, request_id, prompt_tokens, max_tokens, stream) -> Reservation:
        return Reservation(0, request_id or uuid4().hex, 0, 0, model, prompt_tokens, max_tokens, 0, stream,
                           datetime.now(timezone.utc))

    def settle(self, reservation, prompt_tokens, completion_tokens, finish_reason, latency_ms) -> None:
        pass

    def release(self, reservation) -> None:
        pass

    def record_delivered(self, counts) -> None:
        pass

    def rate_limit_headers(self, key) -> dict[str, str]:
        return {}


def create_worker_app(engine, tokenizer, model_name: str, *, worker_key: str | None = None,
                      max_body_bytes: int = 1 << 20):
    """The worker's HTTP API over ``engine`` (None while the model loads; see ``attach_model``): the
    server's own OpenAI routes, unmetered, and a ``/health`` that reports the engine's load."""
    from fastapi import APIRouter

    from .app import app_for, backend_lifespan
    from .routes import openai, system
    from .routes.deps import api_key
    from .services import EngineBackend, Services

    services = Services.build(EngineBackend(engine), Unmetered(worker_key), model_name, tokenizer, None)
    app = app_for(services, backend_lifespan, max_body_bytes=max_body_bytes)
    kept = [route for module in (openai, system) for route in module.router.routes if route.path in WORKER_ROUTES]
    app.include_router(APIRouter(routes=kept))

    @app.get("/health")
    async def health():
        """200 with the engine's load once it serves; 503 while the model loads or if its engine stopped."""
        engine = services.backend.ready()
        running = engine.num_running
        return {"status": "ok", "model": services.model_name, "running": running, "waiting": engine.num_waiting,
                "free_slots": max(0, engine.max_batch_size - running), "max_batch_size": engine.max_batch_size,
                "max_model_len": engine.max_seq_len}

    @app.get("/v1/models", dependencies=[Depends(api_key)])
    async def list_models():
        """The worker's model, with its context length (``max_model_len``, as vLLM reports it)."""
        engine = services.backend.ready()
        return {"object": "list", "data": [{"id": services.model_name, "object": "model", "created": services.created,
                                            "owned_by": "openglm", "max_model_len": engine.max_seq_len}]}

    return app


def cmd_worker(args) -> int:
    import uvicorn

    from ..model.checkpoint import checkpoint_dir
    from .app import attach_model
    from .cli import DEFAULT_MODEL, load_engine

    directory = checkpoint_dir(args.model or DEFAULT_MODEL)  # a bad name fails here, before the server starts
    name = args.served_model_name or directory.name
    worker_key = args.worker_key or os.environ.get("OPENGLM_WORKER_KEY") or None
    app = create_worker_app(None, None, name, worker_key=worker_key, max_body_bytes=args.max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    failure: list[BaseException] = []

    def fail(error: BaseException) -> None:
        failure.append(error)
        server.should_exit = True

    def load() -> None:  # /health answers 503 meanwhile
        try:
            engine, tokenizer = load_engine(args, directory, name, fail)
            attach_model(app, engine, tokenizer)
            print(f"worker: model {name} loaded; serving on http://{args.host}:{args.port}", file=sys.stderr,
                  flush=True)
        except BaseException as e:
            fail(e)

    threading.Thread(target=load, name="openglm-load", daemon=True).start()
    try:
        server.run()
    finally:
        engine = app.state.services.backend.engine
        if engine is not None:
            engine.stop()
    if failure:
        raise failure[0]
    return 0


def register(sub) -> None:
    from .cli import DEFAULT_MODEL, add_engine_args

    p = sub.add_parser("worker", help="serve a model's engine to a gateway (no accounts or billing)",
                       description="Serve MODEL's engine over OpenAI's /v1/completions and /v1/chat/completions "
                                   "(streaming, usage), /v1/models and /health (with the engine's load), with no "
                                   "accounts, limits or billing: a gateway (`openglm serve --upstream URL`) in "
                                   "front of one or more workers keeps those.")
    p.add_argument("--model", default=None, help=f"checkpoint directory or bundled name (default: {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the checkpoint's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--worker-key", default=None,
                   help="a shared secret every route but /health needs as its bearer token, e.g. the gateway's "
                        "--upstream-key (default: $OPENGLM_WORKER_KEY; none: anyone who can reach the port)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    add_engine_args(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_worker)
