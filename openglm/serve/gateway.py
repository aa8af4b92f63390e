"""``openglm serve --upstream URL ...``: the gateway, with no model of its own.

Keys, limits, the ledger, the chat app and the admin, account, OpenAI and Zhipu routes are those of
``openglm serve``, over the same database: several gateways (and embedded servers) on one PostgreSQL
keep one ledger and one set of limits. Chat and text completions go to upstream servers
(``openglm worker``s, llama.cpp's ``llama-server``, vLLM, SGLang) through an ``UpstreamPool``,
billed by the ``Forwarder``, as are embeddings. Infilling needs GLM's model in the server: a gateway
has no such route.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from anyio import to_thread
from fastapi import APIRouter, FastAPI

from .app import app_for
from .conversations import Conversations
from .metrics import Metrics
from .routes import account, admin, conversations, openai, system, web, zhipu
from .routes.deps import ADMIN, Svc
from .services.auth import Auth
from .services.forward import Forwarder
from .upstream import UpstreamPool

SETTLE_SECONDS = 10  # at shutdown, how long the requests cut short may take to settle their bills


class _Forwarded:
    """A route's service whose ``create`` is one of the ``Forwarder``'s calls."""

    def __init__(self, create):
        self.create = create


@dataclass
class GatewayServices:
    """What the routes of a gateway share: the routes' ``Services``, with generation forwarded."""

    store: object
    auth: Auth
    generations: Forwarder
    chat: _Forwarded
    completions: _Forwarded
    embeddings: _Forwarded
    conversations: Conversations
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))


upstreams_router = APIRouter(dependencies=[ADMIN])


@upstreams_router.get("/admin/upstreams")
async def admin_upstreams(svc: Svc):
    """Each upstream: whether it is in, why not, its models, and its load as this gateway sees it."""
    return {"object": "list", "data": [
        {"url": u.url, "healthy": u.healthy, "error": u.error, "models": sorted(u.models), "in_flight": u.in_flight,
         "others": u.others, "free_slots": u.free_slots, "requests": u.picked}
        for u in svc.generations.pool.upstreams]}


def create_gateway_app(pool: UpstreamPool, store, *, admin_key: str | None = None, max_body_bytes: int = 1 << 20,
                       public_metrics: bool = False, docs: bool = False, on_start=None) -> FastAPI:
    """The gateway's HTTP API: the routes of ``openglm serve`` (less infilling) with
    generation on the upstreams of ``pool``, accounts and ledger in ``store``. The app starts the pool
    when it starts (then calls ``on_start(pool)`` on a worker thread, if given) and closes it at shutdown."""
    metrics = Metrics(pool)
    forwarder = Forwarder(pool, store, metrics)
    services = GatewayServices(store=store, auth=Auth(store, admin_key), generations=forwarder,
                               chat=_Forwarded(forwarder.chat), completions=_Forwarded(forwarder.completions),
                               embeddings=_Forwarded(forwarder.embeddings), conversations=Conversations(store),
                               metrics=metrics)

    @asynccontextmanager
    async def lifespan(app):
        await pool.start()
        if on_start is not None:
            await to_thread.run_sync(on_start, pool)
        yield
        await forwarder.wait_settled(SETTLE_SECONDS)
        forwarder.close()
        await pool.close()

    app = app_for(services, lifespan, title="OpenGLM gateway",
                  description="OpenAI-compatible and Zhipu-compatible API over upstream servers.",
                  max_body_bytes=max_body_bytes, public_metrics=public_metrics, docs=docs)
    web.mount_static(app)
    for module in (web, conversations, account, system, openai, zhipu, admin):
        app.include_router(module.router)
    app.include_router(upstreams_router)
    return app


def cmd_gateway(args) -> int:
    """``openglm serve --upstream URL ...``."""
    import uvicorn

    from ..errors import OpenGLMError
    from .cli import examples, open_store

    if args.model or args.served_model_name:
        raise OpenGLMError("--model and --served-model-name do not go with --upstream: a gateway serves the "
                           "models its upstreams serve")
    for url in args.upstream:
        if not url.startswith(("http://", "https://")):
            raise OpenGLMError(f"--upstream {url!r}: not an http:// or https:// URL")
    store = open_store(args.db)
    base = f"http://{args.host}:{args.port}"

    def on_start(pool: UpstreamPool) -> None:
        for u in pool.upstreams:
            state = f"in, serving {', '.join(sorted(u.models))}" if u.healthy else f"out for now: {u.error}"
            print(f"upstream {u.url}: {state}", file=sys.stderr, flush=True)
        models = sorted(pool.model_cards())
        secret = store.ensure_demo(models[0]) if models else None
        if secret:
            print(f"created the demo account with a starting balance\n{examples(base, models[0], secret)}", flush=True)
        elif models:
            print("the database has accounts already; make a key with `openglm keys create`", flush=True)
        else:
            print("no upstream answers yet; make a key with `openglm keys create`", flush=True)

    key = args.upstream_key or os.environ.get("OPENGLM_UPSTREAM_KEY") or None
    app = create_gateway_app(UpstreamPool(args.upstream, key), store,
                             admin_key=args.admin_key or os.environ.get("OPENGLM_ADMIN_KEY"),
                             max_body_bytes=args.max_body_bytes, public_metrics=args.public_metrics, docs=args.docs,
                             on_start=on_start)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        store.close()
    return 0
