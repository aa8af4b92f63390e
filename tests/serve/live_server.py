"""Real servers for the API tests: the app in a uvicorn thread, or ``openglm serve`` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``app`` served by uvicorn on a free loopback port in a thread; ``url`` is its base URL."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@contextlib.contextmanager
def serving(checkpoint, db_url: str, *, max_batch_size: int = 4, max_seq_len: int = 256, balance: int = 10**9,
            price: tuple[int, int] = (1_000_000, 2_000_000), admin_key: str | None = None,
            engine_process: bool = True, max_queue: int = 256, app_options: dict | None = None, **key_limits):
    """A live server for ``checkpoint`` on a fresh account; yields (server, store, secret, account id).

    The model id is "tiny"; the account's key has ``key_limits`` (rpm, tpm, max_concurrency, models).
    ``engine_process``: the engine runs in a process of its own, as ``openglm serve`` runs it (False: in this one).
    ``app_options``: more keyword arguments of ``create_app`` (public_metrics, docs).
    """
    from openglm import load_model, load_tokenizer
    from openglm.serve.app import create_app
    from openglm.serve.engine import Engine
    from openglm.serve.store import Store

    store = Store(db_url)
    store.set_price("tiny", *price)
    account = store.create_account("test", balance)
    _, secret = store.create_key(account.id, **key_limits)
    tokenizer = load_tokenizer(checkpoint)
    if engine_process:
        from openglm.serve.engine.process import EngineProcess

        engine = EngineProcess(str(checkpoint), threads=1, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                               max_queue=max_queue)
    else:
        engine = Engine(load_model(checkpoint), tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                        max_queue=max_queue)
    app = create_app(engine, store, "tiny", tokenizer, admin_key=admin_key, **(app_options or {}))
    try:
        with LiveServer(app) as server:
            yield server, store, secret, account.id
    finally:
        store.close()


class ServerProcess:
    """``openglm serve`` in a subprocess on a free port; ``kill()`` sends SIGKILL."""

    def __init__(self, checkpoint, db_url: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openglm", "serve", "--model", str(checkpoint), "--served-model-name", "tiny",
             "--port", str(self.port), "--db", db_url, "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"openglm serve exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("openglm serve did not become healthy")

    def children(self) -> list[int]:
        """Pids of the server's child processes (its engine)."""
        pids = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == \
                        self.proc.pid:
                    pids.append(int(entry))
            except OSError:  # gone meanwhile
                pass
        return pids

    def engine_pid(self) -> int:
        """Pid of the server's engine process."""
        return next(pid for pid in self.children() if "spawn_main" in open(f"/proc/{pid}/cmdline").read())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.stdout.read()


def sse_events(response) -> list:
    """The JSON events of a streamed response (an ``httpx`` response), up to ``data: [DONE]``."""
    import json

    events = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            events.append("[DONE]")
            break
        events.append(json.loads(line[6:]))
    return events
