"""Accounts, API keys, prices, rate limits and the usage ledger, in SQLite (embedded) or PostgreSQL (replicas).

Money is integer units: 1 unit = 1e-6 of the currency. Prices are units per million tokens and a
request costs ``ceil((prompt * input_price + completion * output_price) / 1_000_000)`` units.

The request path is ``authenticate`` -> ``reserve`` -> (generate) -> ``settle`` or ``release``.
``reserve`` holds the worst-case cost (prompt + max_tokens) on the account in the same transaction
that checks the duplicate request id, the key's limits and the balance; ``settle`` releases the hold,
charges the real usage and appends the ledger row in one transaction. Every check-then-write runs
with the account row locked (``SELECT ... FOR UPDATE`` on PostgreSQL; ``BEGIN IMMEDIATE`` on SQLite,
which takes the database's write lock), so replicas sharing one database never overspend a key.

A streamed request's reservation records the completion tokens sent so far (``record_delivered``,
written in batches as they go out); ``recover``, at the next start, bills a crashed server's
requests for those and releases the rest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from uuid import uuid4

from alembic import command
from alembic.config import Config
from sqlalchemy import bindparam, create_engine, delete, event, func, insert, select, text, union_all, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from ..errors import OpenGLMError
from .db import accounts, api_keys, prices, reservations, usage

DEFAULT_DB_URL = "sqlite:///" + str(Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
                                    / "openglm" / "openglm.db")
KEY_PREFIX = "sk-glm-"
DEMO_ACCOUNT = "demo"
DEMO_BALANCE = 10_000_000                    # 10 currency units
DEMO_PRICE = (1_000_000, 2_000_000)          # 1 per million input tokens, 2 per million output tokens
RATE_WINDOW = timedelta(seconds=60)          # rpm/tpm count the requests started in the last 60 s
_VISIBLE_CHARS = 6                           # random characters of a secret kept in clear for listing
_SETUP_LOCK = 0x6F676C6D                     # PostgreSQL advisory lock: one migration or bootstrap at a time

_HOST = socket.gethostname()
_live_instances: set[str] = set()            # Stores open in this process (see _owner_gone)
_live_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------- errors

class StoreError(OpenGLMError):
    """A billing or auth refusal; ``code`` is the Zhipu error code (a string), ``http_status`` the HTTP one."""
    code = "1000"
    http_status = 400

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class AuthError(StoreError):
    """Authentication failed. Codes: 1000 no key, 1001 malformed key, 1002 unknown key, 1003 expired or revoked."""
    http_status = 401

    def __init__(self, code: str, message: str):
        super().__init__(message, code)


class ModelNotAllowed(AuthError):
    """The key is valid but may not use this model (code 1004)."""
    http_status = 403

    def __init__(self, message: str):
        super().__init__("1004", message)


class InsufficientBalance(StoreError):
    """The account cannot cover the request's worst-case cost: HTTP 429 ``insufficient_quota``, Zhipu 1113."""
    code = "1113"
    http_status = 429


class DuplicateRequest(StoreError):
    """This account already used this request id (running or finished): Zhipu 1231."""
    code = "1231"
    http_status = 400


class RateLimited(StoreError):
    """A key limit is reached. ``kind``: "requests" | "tokens" (Zhipu 1303) or "concurrency" (Zhipu 1302)."""
    http_status = 429

    def __init__(self, message: str, kind: str, retry_after: float):
        super().__init__(message, "1302" if kind == "concurrency" else "1303")
        self.kind = kind
        self.retry_after = retry_after


class RequestTooLarge(StoreError):
    """The request's worst case (prompt + max_tokens) is above the key's tokens-per-minute limit: it can
    never run, so it is a 400 (a 429 would tell clients to retry it forever)."""
    code = "1210"
    http_status = 400


# ----------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Account:
    id: int
    name: str
    balance: int          # units owned, including those held by open reservations
    reserved: int         # units held by open reservations
    created_at: datetime

    @property
    def available(self) -> int:
        return self.balance - self.reserved


@dataclass(frozen=True)
class KeyInfo:
    id: int
    account_id: int
    name: str | None
    prefix: str           # the secret's first characters, e.g. "sk-glm-Ab3dE9", for listing
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    models: list[str] | None   # None: every model
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    admin: bool

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class Reservation:
    id: int
    request_id: str
    account_id: int
    key_id: int
    model: str
    prompt_tokens: int
    max_tokens: int
    hold: int             # worst-case cost held on the account
    stream: bool
    created_at: datetime


@dataclass(frozen=True)
class UsageRecord:
    id: int
    request_id: str
    account_id: int
    key_id: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: int
    latency_ms: int
    stream: bool
    finish_reason: str
    started_at: datetime
    created_at: datetime


@dataclass(frozen=True)
class Recovered:
    """What ``recover`` did with the reservations of servers that are gone."""
    settled: int            # billed for the completion tokens recorded as sent
    released: int           # nothing recorded as sent: released unbilled
    completion_tokens: int  # tokens the settled ones were billed for


def cost_of(prompt_tokens: int, completion_tokens: int, price: tuple[int, int]) -> int:
    """Units charged for this usage at ``price`` = (input, output) units per million tokens; rounded up."""
    return -(-(prompt_tokens * price[0] + completion_tokens * price[1]) // 1_000_000)


def hash_secret(secret: str) -> str:
    # Keys are 256 random bits, so a fast hash is as safe as a slow one and keeps auth cheap.
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _check_count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OpenGLMError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# -------------------------------------------------------------------------------------------- store

class Store:
    """Accounts, keys and billing in the database at ``url``; migrates it to the newest schema on open.

    ``url``: ``sqlite:///path.db`` (WAL journal, one writer at a time) or ``postgresql://...``
    (``postgresql+psycopg`` is used). ``reservation_ttl``: seconds after which ``recover`` treats an
    open reservation as abandoned whoever owns it (set it above the longest request a server allows).
    """

    def __init__(self, url: str = DEFAULT_DB_URL, *, reservation_ttl: float = 900.0):
        self.url = url
        self.reservation_ttl = reservation_ttl
        self._engine = _make_engine(url)
        # Read-only transactions: a plain BEGIN on SQLite, so reads never wait for the write lock.
        self._reader = self._engine.execution_options(openglm_read_only=True)
        self._instance = uuid4().hex
        with _live_lock:
            _live_instances.add(self._instance)
        self._migrate()

    def close(self) -> None:
        """Close the connection pool; this Store's open reservations become recoverable."""
        with _live_lock:
            _live_instances.discard(self._instance)
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _migrate(self) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self._engine.begin() as conn:
            _lock_setup(conn)  # replicas starting together: one migrates, the others wait
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # ------------------------------------------------------------------------------------- admin

    def create_account(self, name: str, balance: int = 0) -> Account:
        try:
            with self._engine.begin() as conn:
                return _insert_account(conn, name, balance)
        except IntegrityError:  # created concurrently after _insert_account looked
            raise OpenGLMError(f"an account named {name!r} already exists") from None

    def top_up(self, account_id: int, amount: int) -> int:
        """Add ``amount`` (> 0) units to the account; returns the new balance."""
        _check_count("amount", amount, 1)
        with self._engine.begin() as conn:
            balance = conn.execute(update(accounts).where(accounts.c.id == account_id)
                                   .values(balance=accounts.c.balance + amount)
                                   .returning(accounts.c.balance)).scalar()
        if balance is None:
            raise OpenGLMError(f"no account with id {account_id}")
        return balance

    def get_account(self, account_id: int) -> Account:
        with self._reader.begin() as conn:
            row = conn.execute(select(accounts).where(accounts.c.id == account_id)).first()
        if row is None:
            raise OpenGLMError(f"no account with id {account_id}")
        return _account(row)

    def find_account(self, id_or_name: str) -> Account:
        """An account by id (all digits) or by name."""
        if id_or_name.isdigit():
            return self.get_account(int(id_or_name))
        with self._reader.begin() as conn:
            row = conn.execute(select(accounts).where(accounts.c.name == id_or_name)).first()
        if row is None:
            raise OpenGLMError(f"no account named {id_or_name!r}")
        return _account(row)

    def list_accounts(self) -> list[Account]:
        with self._reader.begin() as conn:
            return [_account(r) for r in conn.execute(select(accounts).order_by(accounts.c.id))]

    def create_key(self, account_id: int, name: str | None = None, expires_at: datetime | None = None,
                   models: list[str] | None = None, rpm: int | None = None, tpm: int | None = None,
                   max_concurrency: int | None = None, admin: bool = False) -> tuple[KeyInfo, str]:
        """A new key for the account; returns (its info, the secret). Only the secret's hash is stored."""
        with self._engine.begin() as conn:
            return _insert_key(conn, account_id, name, expires_at, models, rpm, tpm, max_concurrency, admin)

    def list_keys(self, account_id: int | None = None) -> list[KeyInfo]:
        query = select(api_keys).order_by(api_keys.c.id)
        if account_id is not None:
            query = query.where(api_keys.c.account_id == account_id)
        with self._reader.begin() as conn:
            return [_key(r) for r in conn.execute(query)]

    def revoke_key(self, key_id: int) -> None:
        """Revoke the key for good; requests with it fail with AuthError 1003 from now on."""
        with self._engine.begin() as conn:
            if conn.execute(select(api_keys.c.id).where(api_keys.c.id == key_id)).first() is None:
                raise OpenGLMError(f"no key with id {key_id}")
            conn.execute(update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                         .values(revoked_at=_now()))

    def set_price(self, model: str, input_per_million: int, output_per_million: int) -> None:
        """Set the model's price in units per million input and output tokens (applies to new requests)."""
        with self._engine.begin() as conn:
            _set_price(conn, model, input_per_million, output_per_million)

    def get_price(self, model: str) -> tuple[int, int]:
        """(input, output) units per million tokens; a model with no price set is free: (0, 0)."""
        with self._reader.begin() as conn:
            return _price(conn, model)

    def list_prices(self) -> dict[str, tuple[int, int]]:
        with self._reader.begin() as conn:
            rows = conn.execute(select(prices).order_by(prices.c.model))
            return {r.model: (r.input_per_million, r.output_per_million) for r in rows}

    # ------------------------------------------------------------------------------ request path

    def authenticate(self, secret: str | None) -> KeyInfo:
        """The key whose secret this is; raises AuthError (1000 missing, 1001 malformed, 1002 unknown,
        1003 expired or revoked)."""
        if not secret:
            raise AuthError("1000", "no API key given: send 'Authorization: Bearer <key>'")
        if not secret.startswith(KEY_PREFIX) or len(secret) > 256:
            raise AuthError("1001", f"malformed API key: keys start with {KEY_PREFIX!r}")
        digest = hash_secret(secret)
        with self._reader.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.secret_hash == digest)).first()
        if row is None or not hmac.compare_digest(row.secret_hash, digest):
            raise AuthError("1002", "invalid API key")
        key = _key(row)
        _check_live(key, _now())
        return key

    def check(self, key: KeyInfo, model: str, request_id: str | None, prompt_tokens: int, max_tokens: int) -> None:
        """Raise what ``reserve`` would raise for a request of at least this size, holding nothing.

        A read for the routes with costly work to do (rendering a long chat) before they know the
        request's real size: a refused key is refused before that work. ``reserve`` checks again.
        """
        _check_count("prompt_tokens", prompt_tokens)
        _check_count("max_tokens", max_tokens)
        with self._reader.begin() as conn:
            account = conn.execute(select(accounts).where(accounts.c.id == key.account_id)).one()
            _admit(conn, key, account, model, request_id, prompt_tokens, max_tokens, _now())

    def reserve(self, key: KeyInfo, model: str, request_id: str | None, prompt_tokens: int, max_tokens: int,
                stream: bool) -> Reservation:
        """Hold the request's worst-case cost, in one transaction with its checks.

        Raises ModelNotAllowed, AuthError (key revoked or expired since authenticate), DuplicateRequest
        (this account already used ``request_id``, running or finished), RequestTooLarge (above the key's
        tpm), RateLimited (the key's rpm, tpm or concurrency), InsufficientBalance (available balance below the worst-case cost). ``request_id``
        None: a fresh one is made.
        """
        _check_count("prompt_tokens", prompt_tokens)
        _check_count("max_tokens", max_tokens)
        request_id = request_id or uuid4().hex
        with self._engine.begin() as conn:
            # The account lock serialises every check-then-write of this account (and so of its keys).
            account = conn.execute(select(accounts).where(accounts.c.id == key.account_id)
                                   .with_for_update()).one()
            now = _now()  # after the lock: the order of start times is the order of the checks
            price, hold = _admit(conn, key, account, model, request_id, prompt_tokens, max_tokens, now)
            conn.execute(update(accounts).where(accounts.c.id == account.id)
                         .values(reserved=accounts.c.reserved + hold))
            reservation_id = conn.execute(insert(reservations).values(
                account_id=account.id, key_id=key.id, request_id=request_id, model=model,
                prompt_tokens=prompt_tokens, max_tokens=max_tokens, input_per_million=price[0],
                output_per_million=price[1], hold=hold, stream=stream, created_at=now, owner_host=_HOST,
                owner_pid=os.getpid(), owner_instance=self._instance)).inserted_primary_key[0]
        return Reservation(reservation_id, request_id, account.id, key.id, model, prompt_tokens, max_tokens,
                           hold, stream, now)

    def settle(self, reservation: Reservation, prompt_tokens: int, completion_tokens: int, finish_reason: str,
               latency_ms: int) -> UsageRecord:
        """Release the hold, charge the real usage (at the prices of reserve time) and append its ledger
        row, in one transaction. A stream cut by the client is settled with the tokens it generated.

        Settling an already settled reservation returns its ledger row again and charges nothing.
        """
        _check_count("prompt_tokens", prompt_tokens)
        _check_count("completion_tokens", completion_tokens)
        if prompt_tokens > reservation.prompt_tokens or completion_tokens > reservation.max_tokens:
            raise OpenGLMError(f"usage ({prompt_tokens} + {completion_tokens} tokens) exceeds the reservation "
                               f"({reservation.prompt_tokens} + {reservation.max_tokens})")
        with self._engine.begin() as conn:
            row = conn.execute(delete(reservations).where(reservations.c.id == reservation.id)
                               .returning(*reservations.c)).first()
            if row is None:
                done = conn.execute(select(usage).where(usage.c.account_id == reservation.account_id,
                                                        usage.c.request_id == reservation.request_id)).first()
                if done is None:
                    raise OpenGLMError(f"reservation {reservation.request_id!r} is no longer open "
                                       "(released, or recovered as abandoned)")
                return _usage(done)
            return _charge(conn, row, prompt_tokens, completion_tokens, finish_reason, latency_ms)

    def record_delivered(self, counts: dict[int, int]) -> None:
        """Record in the open reservations ``{reservation id: completion tokens sent so far}``, in one
        transaction, for ``recover`` to bill should the server die before it settles them. A count
        never goes down; one for a reservation already settled or released is ignored."""
        if not counts:
            return
        for n in counts.values():
            _check_count("delivered tokens", n)
        now = _now()
        with self._engine.begin() as conn:
            conn.execute(update(reservations)
                         .where(reservations.c.id == bindparam("rid"), reservations.c.delivered < bindparam("n"))
                         .values(delivered=bindparam("n"), delivered_at=now),
                         [{"rid": rid, "n": n} for rid, n in sorted(counts.items())])  # one lock order

    def release(self, reservation: Reservation) -> None:
        """The request failed before generating anything: drop the hold, charge nothing, write no ledger
        row (so the same request_id may be retried). Releasing twice is harmless."""
        with self._engine.begin() as conn:
            _drop_reservation(conn, reservation.id)

    def recover(self) -> Recovered:
        """Settle or release the reservations whose server is gone; call at server start.

        A reservation is abandoned when its process on this host no longer runs (or is this process
        and its Store is closed: a restarted server that got the same pid), or when it is older than
        ``reservation_ttl`` (the only evidence about replicas on other hosts). An abandoned request
        with completion tokens recorded as sent (``record_delivered``: a stream, in batches as it went
        out) is settled for its prompt and those tokens (at most its ``max_tokens``, so never above
        its hold), with finish reason "interrupted"; one with none recorded is released unbilled.
        """
        now = _now()
        settled = tokens = 0
        with self._engine.begin() as conn:
            rows = conn.execute(select(reservations.c.id, reservations.c.created_at, reservations.c.owner_host,
                                       reservations.c.owner_pid, reservations.c.owner_instance)
                                .order_by(reservations.c.id)).all()  # one order: concurrent recovers never deadlock
            abandoned = [r.id for r in rows if self._owner_gone(r, now)]
            for reservation_id in abandoned:
                row = conn.execute(delete(reservations).where(reservations.c.id == reservation_id)
                                   .returning(*reservations.c)).one()
                if row.delivered:
                    sent = min(row.delivered, row.max_tokens)
                    latency = (row.delivered_at or row.created_at) - row.created_at
                    _charge(conn, row, row.prompt_tokens, sent, "interrupted", latency.total_seconds() * 1000, now)
                    settled, tokens = settled + 1, tokens + sent
                else:
                    conn.execute(update(accounts).where(accounts.c.id == row.account_id)
                                 .values(reserved=accounts.c.reserved - row.hold))
        return Recovered(settled, len(abandoned) - settled, tokens)

    def _owner_gone(self, row, now: datetime) -> bool:
        if (now - row.created_at).total_seconds() > self.reservation_ttl:
            return True
        if row.owner_host != _HOST:
            return False
        if row.owner_pid == os.getpid():
            with _live_lock:
                return row.owner_instance not in _live_instances
        return not _pid_alive(row.owner_pid)

    def rate_limit_headers(self, key: KeyInfo) -> dict[str, str]:
        """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the key's rpm and tpm limits
        (none for a limit the key does not have); reset is the time until the window frees room."""
        now = _now()
        with self._reader.begin() as conn:
            requests, tokens, oldest = _window_totals(conn, key.id, now)
        reset = 0.0 if oldest is None else (oldest + RATE_WINDOW - now).total_seconds()
        headers = {}
        for kind, limit, used in (("requests", key.rpm, requests), ("tokens", key.tpm, tokens)):
            if limit is None:
                continue
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
            headers[f"x-ratelimit-reset-{kind}"] = f"{max(0.0, reset):.3f}s"
        return headers

    # ------------------------------------------------------------------------------- reporting

    def usage(self, account_id: int, since: date | None = None, until: date | None = None) -> list[dict]:
        """The account's settled usage by UTC day and model, ``since``..``until`` inclusive: dicts with
        date ("YYYY-MM-DD"), model, requests, prompt_tokens, completion_tokens, total_tokens, cost."""
        day = func.date(usage.c.created_at)
        query = (select(day.label("day"), usage.c.model, func.count().label("requests"),
                        func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
                        func.sum(usage.c.completion_tokens).label("completion_tokens"),
                        func.sum(usage.c.cost).label("cost"))
                 .where(usage.c.account_id == account_id).group_by(day, usage.c.model).order_by(day, usage.c.model))
        if since is not None:
            query = query.where(usage.c.created_at >= _midnight(since))
        if until is not None:
            query = query.where(usage.c.created_at < _midnight(until + timedelta(days=1)))
        with self._reader.begin() as conn:
            rows = conn.execute(query).all()
        return [{"date": str(r.day), "model": r.model, "requests": r.requests,
                 "prompt_tokens": int(r.prompt_tokens), "completion_tokens": int(r.completion_tokens),
                 "total_tokens": int(r.prompt_tokens + r.completion_tokens), "cost": int(r.cost)} for r in rows]

    def recent_requests(self, account_id: int, limit: int = 50) -> list[UsageRecord]:
        """The account's newest ledger rows (settled requests), newest first."""
        with self._reader.begin() as conn:
            rows = conn.execute(select(usage).where(usage.c.account_id == account_id)
                                .order_by(usage.c.id.desc()).limit(limit))
            return [_usage(r) for r in rows]

    def ledger_totals(self, account_id: int | None = None) -> dict:
        """Sums over the ledger (one account's or everyone's): prompt_tokens, completion_tokens, cost, requests."""
        query = select(func.coalesce(func.sum(usage.c.prompt_tokens), 0), func.coalesce(
            func.sum(usage.c.completion_tokens), 0), func.coalesce(func.sum(usage.c.cost), 0), func.count())
        if account_id is not None:
            query = query.where(usage.c.account_id == account_id)
        with self._reader.begin() as conn:
            prompt, completion, cost, requests = conn.execute(query).one()
        return {"prompt_tokens": int(prompt), "completion_tokens": int(completion), "cost": int(cost),
                "requests": int(requests)}

    def open_reservations(self, account_id: int | None = None) -> list[Reservation]:
        """The reservations not yet settled or released."""
        r = reservations
        query = select(r.c.id, r.c.request_id, r.c.account_id, r.c.key_id, r.c.model, r.c.prompt_tokens,
                       r.c.max_tokens, r.c.hold, r.c.stream, r.c.created_at).order_by(r.c.id)
        if account_id is not None:
            query = query.where(r.c.account_id == account_id)
        with self._reader.begin() as conn:
            return [Reservation(*row) for row in conn.execute(query)]

    def ensure_demo(self, model: str) -> str | None:
        """On a database with no accounts: create account "demo" with DEMO_BALANCE units, a key, and the
        price DEMO_PRICE for ``model`` if it has none. Returns the key's secret; None if accounts exist."""
        with self._engine.begin() as conn:
            _lock_setup(conn)  # replicas starting together: one bootstraps, the others see its account
            if conn.execute(select(func.count()).select_from(accounts)).scalar():
                return None
            account = _insert_account(conn, DEMO_ACCOUNT, DEMO_BALANCE)
            if _price(conn, model) == (0, 0):
                _set_price(conn, model, *DEMO_PRICE)
            return _insert_key(conn, account.id, "demo")[1]


# ----------------------------------------------------------------------------------------- helpers

def _make_engine(url: str):
    try:
        parsed = make_url(url)
    except Exception as e:
        raise OpenGLMError(f"not a database URL: {url!r} ({e})") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise OpenGLMError("SQLite needs a file (sqlite:///path.db): the store is shared by threads and processes")
        _create_private(Path(parsed.database).expanduser())
        engine = create_engine(parsed, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # let SQLAlchemy emit BEGIN itself (below)
            dbapi_connection.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            # No fsync per commit: a killed process loses nothing, a power cut at most the last commits
            # (settles then come back as open reservations, which recover() bills for the tokens
            # recorded as sent, or releases).
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")
            dbapi_connection.execute("PRAGMA foreign_keys=ON")

        @event.listens_for(engine, "begin")
        def _begin(conn):
            # Writers take the write lock at BEGIN: a deferred transaction that reads and then writes
            # fails with "database is locked" instead of waiting; IMMEDIATE waits up to the busy timeout.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("openglm_read_only")
                                 else "BEGIN IMMEDIATE")
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True, pool_size=8, max_overflow=24)
    raise OpenGLMError(f"unsupported database {backend!r}: use sqlite:///path.db or postgresql://...")


def _check_text(name: str, value: str | None) -> None:
    """PostgreSQL text cannot hold NUL: refuse it on every backend alike, before it reaches the database."""
    if value is not None and "\x00" in value:
        raise OpenGLMError(f"{name} must not contain NUL characters")


def _create_private(path: Path) -> None:
    """Create the SQLite file (and its folder) readable by its owner only, if it does not exist: it holds
    key hashes and every account's usage. SQLite gives its -wal and -shm files the database's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _insert_account(conn, name: str, balance: int) -> Account:
    if not name:
        raise OpenGLMError("an account needs a name")
    _check_text("name", name)
    _check_count("balance", balance)
    if conn.execute(select(accounts.c.id).where(accounts.c.name == name)).first() is not None:
        raise OpenGLMError(f"an account named {name!r} already exists")
    account_id = conn.execute(insert(accounts).values(
        name=name, balance=balance, reserved=0, created_at=_now())).inserted_primary_key[0]
    return _account(conn.execute(select(accounts).where(accounts.c.id == account_id)).one())


def _insert_key(conn, account_id: int, name: str | None = None, expires_at: datetime | None = None,
                models: list[str] | None = None, rpm: int | None = None, tpm: int | None = None,
                max_concurrency: int | None = None, admin: bool = False) -> tuple[KeyInfo, str]:
    if conn.execute(select(accounts.c.id).where(accounts.c.id == account_id)).first() is None:
        raise OpenGLMError(f"no account with id {account_id}")
    _check_text("name", name)
    for model in models or ():
        _check_text("models", model)
    for limit_name, limit in (("rpm", rpm), ("tpm", tpm), ("max_concurrency", max_concurrency)):
        if limit is not None:
            _check_count(limit_name, limit, 1)
    if expires_at is not None and expires_at.tzinfo is None:
        raise OpenGLMError("expires_at must be timezone-aware")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits
    key_id = conn.execute(insert(api_keys).values(
        account_id=account_id, name=name, prefix=secret[:len(KEY_PREFIX) + _VISIBLE_CHARS],
        secret_hash=hash_secret(secret), created_at=_now(), expires_at=expires_at,
        models=None if models is None else json.dumps(list(models)), rpm=rpm, tpm=tpm,
        max_concurrency=max_concurrency, admin=admin)).inserted_primary_key[0]
    return _key(conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()), secret


def _set_price(conn, model: str, input_per_million: int, output_per_million: int) -> None:
    _check_text("model", model)
    _check_count("input_per_million", input_per_million)
    _check_count("output_per_million", output_per_million)
    conn.execute(delete(prices).where(prices.c.model == model))
    conn.execute(insert(prices).values(model=model, input_per_million=input_per_million,
                                       output_per_million=output_per_million, updated_at=_now()))


def _account(row) -> Account:
    return Account(row.id, row.name, row.balance, row.reserved, row.created_at)


def _key(row) -> KeyInfo:
    return KeyInfo(row.id, row.account_id, row.name, row.prefix, row.created_at, row.expires_at, row.revoked_at,
                   None if row.models is None else json.loads(row.models), row.rpm, row.tpm,
                   row.max_concurrency, bool(row.admin))


def _usage(row) -> UsageRecord:
    return UsageRecord(row.id, row.request_id, row.account_id, row.key_id, row.model, row.prompt_tokens,
                       row.completion_tokens, row.cost, row.latency_ms, bool(row.stream), row.finish_reason,
                       row.started_at, row.created_at)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def _check_live(key: KeyInfo, now: datetime) -> None:
    if key.revoked_at is not None:
        raise AuthError("1003", "this API key was revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise AuthError("1003", "this API key has expired")


def _lock_setup(conn) -> None:
    if conn.dialect.name == "postgresql":  # SQLite's BEGIN IMMEDIATE already serialises writers
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SETUP_LOCK})


def _price(conn, model: str) -> tuple[int, int]:
    _check_text("model", model)
    row = conn.execute(select(prices.c.input_per_million, prices.c.output_per_million)
                       .where(prices.c.model == model)).first()
    return (0, 0) if row is None else (row[0], row[1])


def _window_totals(conn, key_id: int, now: datetime) -> tuple[int, int, datetime | None]:
    """(requests, tokens, oldest start) of the key's requests started in the last RATE_WINDOW: settled
    ones count their real tokens, open ones their worst case (prompt + max_tokens)."""
    since = now - RATE_WINDOW
    settled = conn.execute(select(func.count(), func.sum(usage.c.prompt_tokens + usage.c.completion_tokens),
                                  func.min(usage.c.started_at))
                           .where(usage.c.key_id == key_id, usage.c.started_at > since)).one()
    running = conn.execute(select(func.count(), func.sum(reservations.c.prompt_tokens + reservations.c.max_tokens),
                                  func.min(reservations.c.created_at))
                           .where(reservations.c.key_id == key_id, reservations.c.created_at > since)).one()
    oldest = min((t for t in (settled[2], running[2]) if t is not None), default=None)
    return settled[0] + running[0], int(settled[1] or 0) + int(running[1] or 0), oldest


def _window(conn, key_id: int, now: datetime) -> list[tuple[datetime, int]]:
    """(start time, tokens) of each request counted by _window_totals, oldest first."""
    since = now - RATE_WINDOW
    settled = conn.execute(select(usage.c.started_at, usage.c.prompt_tokens + usage.c.completion_tokens)
                           .where(usage.c.key_id == key_id, usage.c.started_at > since)).all()
    running = conn.execute(select(reservations.c.created_at, reservations.c.prompt_tokens + reservations.c.max_tokens)
                           .where(reservations.c.key_id == key_id, reservations.c.created_at > since)).all()
    return sorted((t, int(n)) for t, n in settled + running)


def _admit(conn, key: KeyInfo, account, model: str, request_id: str | None, prompt_tokens: int, max_tokens: int,
           now: datetime) -> tuple[tuple[int, int], int]:
    """``reserve``'s checks of a request on ``account`` (its row); returns (price, worst-case cost)."""
    if request_id is not None and len(request_id) > 128:
        raise OpenGLMError("request_id is longer than 128 characters")
    _check_text("request_id", request_id)
    fresh = _key(conn.execute(select(api_keys).where(api_keys.c.id == key.id)).one())
    _check_live(fresh, now)
    if not fresh.allows(model):
        raise ModelNotAllowed(f"this API key may not use model {model!r}")
    if request_id is not None:
        used = union_all(*(select(t.c.id).where(t.c.account_id == key.account_id, t.c.request_id == request_id)
                           for t in (reservations, usage)))
        if conn.execute(used).first():
            raise DuplicateRequest(f"request_id {request_id!r} was already used")
    _check_limits(conn, fresh, prompt_tokens + max_tokens, now)
    price = _price(conn, model)
    hold = cost_of(prompt_tokens, max_tokens, price)
    if account.balance - account.reserved < hold:
        raise InsufficientBalance(
            f"insufficient balance: this request may cost up to {hold} units, "
            f"{account.balance - account.reserved} available; top up the account")
    return price, hold


def _check_limits(conn, key: KeyInfo, tokens: int, now: datetime) -> None:
    """Raise RequestTooLarge if a request of ``tokens`` (worst case) exceeds the key's tpm whatever the
    time, RateLimited if it would exceed the key's limits now."""
    if key.tpm is not None and tokens > key.tpm:
        raise RequestTooLarge(f"request too large: {tokens} tokens (prompt + max_tokens) exceed the key's "
                              f"limit of {key.tpm} tokens per minute; lower max_tokens")
    if key.max_concurrency is not None:
        running = conn.execute(select(func.count()).select_from(reservations)
                               .where(reservations.c.key_id == key.id)).scalar()
        if running >= key.max_concurrency:
            raise RateLimited(f"too many concurrent requests for this key (limit {key.max_concurrency})",
                              "concurrency", 1.0)
    if key.rpm is None and key.tpm is None:
        return
    requests, used, _ = _window_totals(conn, key.id, now)
    # Refused: the wait is until enough of the oldest requests leave the window.
    if key.rpm is not None and requests >= key.rpm:
        start = _window(conn, key.id, now)[requests - key.rpm][0]
        raise RateLimited(f"rate limit reached: {key.rpm} requests per minute", "requests",
                          max((start + RATE_WINDOW - now).total_seconds(), 0.001))
    if key.tpm is not None:
        excess = used + tokens - key.tpm
        if excess > 0:
            freed = 0
            for start, n in _window(conn, key.id, now):
                freed += n
                if freed >= excess:
                    break
            raise RateLimited(f"rate limit reached: {key.tpm} tokens per minute", "tokens",
                              max((start + RATE_WINDOW - now).total_seconds(), 0.001))


def _charge(conn, row, prompt_tokens: int, completion_tokens: int, finish_reason: str, latency_ms: float,
            now: datetime | None = None) -> UsageRecord:
    """Bill the usage of ``row`` (a reservation just deleted) at its prices: release its hold, charge
    the cost, append the ledger row."""
    cost = cost_of(prompt_tokens, completion_tokens, (row.input_per_million, row.output_per_million))
    conn.execute(update(accounts).where(accounts.c.id == row.account_id)
                 .values(balance=accounts.c.balance - cost, reserved=accounts.c.reserved - row.hold))
    values = dict(account_id=row.account_id, key_id=row.key_id, request_id=row.request_id, model=row.model,
                  prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost,
                  latency_ms=int(latency_ms), stream=bool(row.stream), finish_reason=finish_reason,
                  started_at=row.created_at, created_at=now or _now())
    usage_id = conn.execute(insert(usage).values(**values)).inserted_primary_key[0]
    return UsageRecord(id=usage_id, **values)


def _drop_reservation(conn, reservation_id: int) -> None:
    """Delete an open reservation and its hold; nothing if it is already gone."""
    row = conn.execute(delete(reservations).where(reservations.c.id == reservation_id)
                       .returning(reservations.c.account_id, reservations.c.hold)).first()
    if row is not None:
        conn.execute(update(accounts).where(accounts.c.id == row.account_id)
                     .values(reserved=accounts.c.reserved - row.hold))
