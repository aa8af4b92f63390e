"""``openglm serve``: the HTTP API over one model, with accounts and billing in SQLite or PostgreSQL."""

from __future__ import annotations

import os
import sys
import threading

DEFAULT_MODEL = "glm-tiny-chat"


def examples(base: str, model: str, secret: str) -> str:
    return (
        f"API key: {secret}\n"
        f"  curl {base}/v1/chat/completions -H 'Authorization: Bearer {secret}' "
        f"-H 'Content-Type: application/json' "
        f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
        f"  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"{base}/v1\", api_key=\"{secret}\"); "
        f"print(c.chat.completions.create(model=\"{model}\", "
        f"messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}]).choices[0].message.content)'\n"
        f"  chat page: {base}/"
    )


def load_engine(args, directory, name: str, fail):
    """(engine, tokenizer) for the checkpoint in ``directory`` from the engine flags of ``args``, not
    started. The engine runs in a process of its own unless ``args.engine_in_process``; ``fail(error)``
    is called if that process dies."""
    from ..data.tokenizer import load_tokenizer
    from ..errors import OpenGLMError

    tokenizer = load_tokenizer(directory)
    engine_kw = dict(max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                     max_seq_len=args.max_seq_len, preempt_tokens=args.preempt_tokens, model_name=name)
    if args.engine_in_process:
        import torch

        from ..model.checkpoint import load_model
        from .engine import Engine

        if args.threads:
            torch.set_num_threads(args.threads)
        return Engine(load_model(directory, device=args.device), tokenizer, **engine_kw), tokenizer
    from .engine.process import EngineProcess

    # An engine process that dies stops the server, for its supervisor to restart it.
    return EngineProcess(str(directory), device=args.device, threads=args.threads, tokenizer=tokenizer,
                         on_exit=lambda message: fail(OpenGLMError(message)), **engine_kw), tokenizer


def cmd_serve(args) -> int:
    if args.upstream:
        from .gateway import cmd_gateway

        return cmd_gateway(args)
    import uvicorn

    from ..model.checkpoint import checkpoint_dir
    from .app import attach_model, create_app

    source = args.model or DEFAULT_MODEL
    directory = checkpoint_dir(source)  # a bad name fails here, before the server starts
    name = args.served_model_name or directory.name
    store = open_store(args.db)
    secret = store.ensure_demo(name)
    app = create_app(None, store, name, None, admin_key=args.admin_key or os.environ.get("OPENGLM_ADMIN_KEY"),
                     max_body_bytes=args.max_body_bytes, public_metrics=args.public_metrics, docs=args.docs)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    failure: list[BaseException] = []

    def fail(error: BaseException) -> None:  # stop the server; cmd_serve raises the error once it has stopped
        failure.append(error)
        server.should_exit = True

    def load() -> None:  # the server answers /health with 503 meanwhile
        try:
            engine, tokenizer = load_engine(args, directory, name, fail)
            attach_model(app, engine, tokenizer)  # starts the engine (and waits for its process to load the model)
            print(f"model {name} loaded; serving on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        except BaseException as e:
            fail(e)

    base = f"http://{args.host}:{args.port}"
    if secret:
        print(f"created the demo account with a starting balance\n{examples(base, name, secret)}", flush=True)
    else:
        print("the database has accounts already; make a key with `openglm keys create`", flush=True)
    threading.Thread(target=load, name="openglm-load", daemon=True).start()
    try:
        server.run()
    finally:
        engine = app.state.services.backend.engine
        if engine is not None:
            engine.stop()
        store.close()
    if failure:
        raise failure[0]
    return 0


def open_store(db: str):
    """The store at ``db``, with the requests of a server that stopped billed or released (and said so)."""
    from .store import Store

    store = Store(db)
    recovered = store.recover()
    if recovered.settled or recovered.released:
        print(f"recovered the requests of a server that stopped: {recovered.settled} billed for the "
              f"{recovered.completion_tokens} tokens they had sent, {recovered.released} released unbilled",
              file=sys.stderr)
    return store


def register(sub) -> None:
    from .store import DEFAULT_DB_URL

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve MODEL over HTTP: OpenAI-compatible /v1 routes, Zhipu's "
                                   "/api/paas/v4/chat/completions, GLM infilling, a chat page at /, with "
                                   "API keys, balances and rate limits in the database. On an empty database "
                                   "it creates a demo account and prints its key.")
    p.add_argument("--model", default=None,
                   help=f"checkpoint directory or bundled name (default: {DEFAULT_MODEL})")
    p.add_argument("--upstream", action="append", metavar="URL",
                   help="serve as a gateway with no model of its own: forward generation to this OpenAI-compatible "
                        "server (an `openglm worker`, llama-server, vLLM, SGLang); repeat for several, which share "
                        "the load and stand in for each other; keys, limits and the ledger stay here")
    p.add_argument("--upstream-key", default=None,
                   help="bearer token sent to the upstreams (their --worker-key or --api-key; default: "
                        "$OPENGLM_UPSTREAM_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the checkpoint's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default=DEFAULT_DB_URL, help="sqlite:///path.db or postgresql://user@host/db "
                                                        "(default: %(default)s)")
    add_engine_args(p)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--admin-key", default=None, help="secret for the /admin routes (default: $OPENGLM_ADMIN_KEY; "
                                                     "keys created with --admin work too)")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics to anyone (default: only to the admin key, e.g. a Prometheus "
                        "scrape with an authorization bearer)")
    p.add_argument("--docs", action="store_true",
                   help="serve the API's Swagger UI at /docs and its spec at /openapi.json to anyone "
                        "(default: no /docs; /openapi.json only to the admin key)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def add_engine_args(p) -> None:
    """The engine's flags, shared by ``openglm serve`` and ``openglm worker``."""
    p.add_argument("--max-batch-size", type=int, default=16, help="requests generated together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before 503; one request of more choices (prompts x n) is a 400")
    p.add_argument("--preempt-tokens", type=int, default=64,
                   help="new prompts up to this many tokens are prefilled at once, between two layers of a "
                        "running step if need be (time to first token ~ one prefill); 0: they join the next step")
    p.add_argument("--max-seq-len", type=int, default=None, help="prompt + completion tokens per request "
                                                                 "(default: the model's, at most 4096)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine-in-process", action="store_true",
                   help="run the engine in the server's process (default: a process of its own, so that the HTTP "
                        "side and the model steps never wait for each other's interpreter lock)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the model (default: torch's; fewer than the free cores avoids stalls)")
