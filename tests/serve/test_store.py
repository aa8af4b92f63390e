"""Store: accounts, keys, prices, reserve/settle billing, limits and crash recovery, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy

from openglm.errors import OpenGLMError
from openglm.serve.store import (DEMO_BALANCE, DEMO_PRICE, AuthError, DuplicateRequest, InsufficientBalance,
                                 ModelNotAllowed, RateLimited, Recovered, RequestTooLarge, Store, cost_of)

REPO = Path(__file__).resolve().parents[2]
PRICE = (1_000_000, 2_000_000)  # 1 unit per input token, 2 per output token


@pytest.fixture
def store(db_url):
    with Store(db_url) as s:
        s.set_price("m", *PRICE)
        yield s


def _account_and_key(store, balance=10_000, name="acme", **limits):
    account = store.create_account(name, balance)
    _, secret = store.create_key(account.id, name="k", **limits)
    return account, store.authenticate(secret)


def test_cost_rounds_up_to_whole_units():
    assert cost_of(0, 0, (3, 5)) == 0
    assert cost_of(1, 0, (1, 0)) == 1                      # 1e-6 of a unit is still charged as one
    assert cost_of(1_000_000, 1_000_000, (3, 5)) == 8
    assert cost_of(333_333, 0, (3, 0)) == 1 and cost_of(333_334, 0, (3, 0)) == 2


def test_accounts_and_top_up(store):
    account = store.create_account("acme", 100)
    assert (account.balance, account.reserved, account.available) == (100, 0, 100)
    with pytest.raises(OpenGLMError, match="already exists"):
        store.create_account("acme")
    assert store.top_up(account.id, 50) == 150
    for bad in (0, -5, 1.5, True):
        with pytest.raises(OpenGLMError):
            store.top_up(account.id, bad)
    with pytest.raises(OpenGLMError, match="no account"):
        store.top_up(999, 5)
    assert store.find_account("acme") == store.get_account(account.id) == store.find_account(str(account.id))
    assert [a.name for a in store.list_accounts()] == ["acme"]


def test_keys_are_stored_hashed_and_authenticate(store, db_url):
    account = store.create_account("acme")
    info, secret = store.create_key(account.id, name="ci", models=["m"], rpm=5)
    assert secret.startswith("sk-glm-") and len(secret) > 40 and secret.startswith(info.prefix)
    assert store.authenticate(secret) == info
    engine = sqlalchemy.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text("SELECT * FROM api_keys")).all()
    engine.dispose()
    assert secret not in repr(rows)  # only the hash is stored
    assert rows[0].secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert [k.id for k in store.list_keys(account.id)] == [info.id] and store.list_keys(account.id + 1) == []

    for given, code in ((None, "1000"), ("", "1000"), ("Bearer x", "1001"), (secret + "x", "1002"),
                        ("sk-glm-" + "A" * 43, "1002")):
        with pytest.raises(AuthError) as e:
            store.authenticate(given)
        assert (e.value.code, e.value.http_status) == (code, 401)

    store.revoke_key(info.id)
    with pytest.raises(AuthError) as e:
        store.authenticate(secret)
    assert e.value.code == "1003"
    with pytest.raises(OpenGLMError, match="no key"):
        store.revoke_key(999)


def test_expired_and_revoked_keys_are_refused(store):
    account = store.create_account("acme", 1000)
    now = datetime.now(timezone.utc)
    _, expired = store.create_key(account.id, expires_at=now - timedelta(seconds=1))
    with pytest.raises(AuthError, match="expired") as e:
        store.authenticate(expired)
    assert e.value.code == "1003"
    info, live = store.create_key(account.id, expires_at=now + timedelta(hours=1))
    key = store.authenticate(live)
    store.revoke_key(info.id)  # revoked between authenticate and reserve: reserve sees it
    with pytest.raises(AuthError, match="revoked"):
        store.reserve(key, "m", None, 1, 1, False)
    assert store.get_account(account.id).reserved == 0


def test_allowed_models(store):
    account = store.create_account("acme", 1000)
    _, secret = store.create_key(account.id, models=["m"])
    key = store.authenticate(secret)
    with pytest.raises(ModelNotAllowed) as e:
        store.reserve(key, "other", None, 1, 1, False)
    assert (e.value.code, e.value.http_status) == ("1004", 403)
    store.reserve(key, "m", None, 1, 1, False)


def test_reserve_holds_worst_case_and_settle_charges_real_usage(store):
    account, key = _account_and_key(store, 1000)
    r = store.reserve(key, "m", "req-1", 10, 20, stream=True)
    assert r.hold == 10 * 1 + 20 * 2 and r.request_id == "req-1"
    assert (store.get_account(account.id).balance, store.get_account(account.id).reserved) == (1000, 50)
    assert store.open_reservations() == [r]

    # A stream cut by the client after 7 tokens is billed for exactly those 7.
    record = store.settle(r, 10, 7, "cancelled", latency_ms=123)
    assert (record.cost, record.prompt_tokens, record.completion_tokens) == (10 + 14, 10, 7)
    assert (record.finish_reason, record.stream, record.latency_ms, record.key_id) == ("cancelled", True, 123, key.id)
    after = store.get_account(account.id)
    assert (after.balance, after.reserved) == (1000 - 24, 0)
    assert store.open_reservations() == []
    assert store.ledger_totals(account.id) == {"prompt_tokens": 10, "completion_tokens": 7, "cost": 24,
                                               "requests": 1}
    # Settling again charges nothing more.
    assert store.settle(r, 10, 7, "cancelled", latency_ms=123) == record
    assert store.get_account(account.id).balance == 1000 - 24
    with pytest.raises(OpenGLMError, match="exceeds the reservation"):
        store.settle(store.reserve(key, "m", None, 10, 20, False), 10, 21, "length", 1)


def test_price_is_fixed_at_reserve_time(store):
    _, key = _account_and_key(store, 1000)
    r = store.reserve(key, "m", None, 10, 10, False)
    store.set_price("m", 50_000_000, 50_000_000)
    assert store.get_price("m") == (50_000_000, 50_000_000)
    assert store.settle(r, 10, 10, "length", 1).cost == 10 + 20
    assert store.get_price("unpriced") == (0, 0)


def test_insufficient_balance_counts_open_holds(store):
    account, key = _account_and_key(store, 100)
    first = store.reserve(key, "m", None, 10, 20, False)          # holds 50
    second = store.reserve(key, "m", None, 10, 20, False)         # holds the other 50: exactly enough
    with pytest.raises(InsufficientBalance) as e:
        store.reserve(key, "m", None, 1, 0, False)
    assert (e.value.code, e.value.http_status) == ("1113", 429)
    store.release(second)
    store.release(second)  # twice is harmless
    assert store.get_account(account.id).reserved == 50
    store.settle(first, 10, 20, "length", 1)
    assert store.get_account(account.id).available == 50
    with pytest.raises(InsufficientBalance):
        store.reserve(key, "m", None, 11, 20, False)                # 51 > 50
    assert store.get_account(account.id).balance == 50


def test_duplicate_request_id_never_charges_twice(store):
    account, key = _account_and_key(store, 1000)
    r = store.reserve(key, "m", "abc", 1, 1, False)
    with pytest.raises(DuplicateRequest) as e:                     # still running
        store.reserve(key, "m", "abc", 1, 1, False)
    assert e.value.code == "1231"
    store.settle(r, 1, 1, "stop", 1)
    with pytest.raises(DuplicateRequest):                          # finished
        store.reserve(key, "m", "abc", 1, 1, False)
    assert store.ledger_totals(account.id)["requests"] == 1
    released = store.reserve(key, "m", "retry-me", 1, 1, False)
    store.release(released)                                        # never charged: may be retried
    store.settle(store.reserve(key, "m", "retry-me", 1, 1, False), 1, 1, "stop", 1)
    _, other = _account_and_key(store, name="other")
    store.reserve(other, "m", "abc", 1, 1, False)                   # ids are per account


def test_requests_per_minute(store):
    _, key = _account_and_key(store, 10_000, rpm=3)
    for _ in range(2):
        store.settle(store.reserve(key, "m", None, 1, 1, False), 1, 1, "stop", 1)
    open_one = store.reserve(key, "m", None, 1, 1, False)
    headers = store.rate_limit_headers(key)
    assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "0"
    assert 0 < float(headers["x-ratelimit-reset-requests"].removesuffix("s")) <= 60
    assert "x-ratelimit-limit-tokens" not in headers
    with pytest.raises(RateLimited) as e:
        store.reserve(key, "m", None, 1, 1, False)
    assert (e.value.kind, e.value.code, e.value.http_status) == ("requests", "1303", 429)
    assert 0 < e.value.retry_after <= 60
    store.release(open_one)  # a released request no longer counts
    store.reserve(key, "m", None, 1, 1, False)


def test_tokens_per_minute(store):
    _, key = _account_and_key(store, 10_000, tpm=100)
    store.settle(store.reserve(key, "m", None, 10, 50, False), 10, 20, "stop", 1)   # 30 tokens used
    running = store.reserve(key, "m", None, 10, 30, False)                          # 40 held
    headers = store.rate_limit_headers(key)
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == ("100", "30")
    with pytest.raises(RateLimited) as e:
        store.reserve(key, "m", None, 11, 20, False)                                # 31 > 30 left
    assert e.value.kind == "tokens" and 0 < e.value.retry_after <= 60
    store.settle(store.reserve(key, "m", None, 10, 20, False), 10, 20, "length", 1)  # exactly 30 fits
    store.settle(running, 10, 0, "stop", 1)
    store.reserve(key, "m", None, 10, 20, False)  # real usage replaced running's worst case: 30 + 30 + 10 + 30
    # Above the tpm whatever the window holds: never runnable, so not a (retriable) RateLimited.
    with pytest.raises(RequestTooLarge, match="request too large") as e:
        store.reserve(key, "m", None, 50, 51, False)
    assert not isinstance(e.value, RateLimited) and e.value.http_status == 400


def test_sqlite_file_is_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "new" / "openglm.db"
    store = Store(f"sqlite:///{path}")
    try:
        _account_and_key(store, 10)  # a write: the WAL and shared-memory files exist now
        files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o600" for f in files}
        assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    finally:
        store.close()


def test_concurrency_limit(store):
    _, key = _account_and_key(store, 10_000, max_concurrency=2)
    a = store.reserve(key, "m", None, 1, 1, True)
    store.reserve(key, "m", None, 1, 1, True)
    with pytest.raises(RateLimited) as e:
        store.reserve(key, "m", None, 1, 1, True)
    assert (e.value.kind, e.value.code) == ("concurrency", "1302")
    store.settle(a, 1, 1, "stop", 1)
    store.reserve(key, "m", None, 1, 1, True)



def test_check_refuses_what_reserve_would_and_holds_nothing(store):
    account, key = _account_and_key(store, 100, rpm=2)
    store.check(key, "m", "abc", 10, 20)                            # fits: nothing held, nothing counted
    assert store.get_account(account.id).reserved == 0 and store.open_reservations() == []
    with pytest.raises(InsufficientBalance):
        store.check(key, "m", None, 1, 50)                          # 1 + 100 > 100
    store.settle(store.reserve(key, "m", "abc", 1, 1, False), 1, 1, "stop", 1)
    with pytest.raises(DuplicateRequest):
        store.check(key, "m", "abc", 1, 1)
    store.reserve(key, "m", None, 1, 1, False)
    with pytest.raises(RateLimited):                                # the minute's two are used
        store.check(key, "m", None, 1, 1)

def test_usage_by_day_and_model(store):
    store.set_price("n", 0, 1_000_000)
    account, key = _account_and_key(store, 10_000)
    for model, completion in (("m", 3), ("m", 4), ("n", 5)):
        store.settle(store.reserve(key, "m" if model == "m" else "n", None, 2, 10, False), 2, completion, "stop", 1)
    today = datetime.now(timezone.utc).date()
    rows = store.usage(account.id)
    assert rows == [
        {"date": today.isoformat(), "model": "m", "requests": 2, "prompt_tokens": 4, "completion_tokens": 7,
         "total_tokens": 11, "cost": 4 + 14},
        {"date": today.isoformat(), "model": "n", "requests": 1, "prompt_tokens": 2, "completion_tokens": 5,
         "total_tokens": 7, "cost": 5},
    ]
    assert store.usage(account.id, since=today, until=today) == rows
    assert store.usage(account.id, since=today + timedelta(days=1)) == []
    assert store.usage(account.id, until=today - timedelta(days=1)) == []
    assert store.usage(account.id + 1) == []
    assert store.ledger_totals() == {"prompt_tokens": 6, "completion_tokens": 12, "cost": 23, "requests": 3}
    assert isinstance(date.fromisoformat(rows[0]["date"]), date)


def test_threads_share_one_budget_and_limits(store):
    """32 clients x 10 requests on one key: the ledger equals what clients were told, the balance never
    goes below zero, and the concurrency and rpm limits hold under contention."""
    budget = 1_000
    account, key = _account_and_key(store, budget, max_concurrency=4)
    outcomes = []  # list.append is atomic across threads
    in_flight, peak, lock = [0], [0], threading.Lock()

    def client(i):
        for j in range(10):
            try:
                r = store.reserve(key, "m", f"{i}-{j}", 10, 20, j % 2 == 0)
            except (InsufficientBalance, RateLimited) as e:
                outcomes.append(getattr(e, "kind", "balance"))
                continue
            except Exception as e:  # noqa: BLE001 - an unexpected error fails the test below
                outcomes.append(repr(e))
                continue
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            time.sleep(0.005)  # "generate"
            with lock:  # leave the count before settle commits, so it never exceeds the database's
                in_flight[0] -= 1
            outcomes.append(store.settle(r, 10, (i + j) % 21, "stop", 1).cost)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    charged = [o for o in outcomes if isinstance(o, int)]
    refused = [o for o in outcomes if not isinstance(o, int)]
    assert len(outcomes) == 320 and set(refused) <= {"balance", "concurrency"}, set(refused)
    assert "balance" in refused and peak[0] <= 4
    account = store.get_account(account.id)
    totals = store.ledger_totals(account.id)
    assert totals["cost"] == sum(charged) and totals["requests"] == len(charged)
    assert account.balance == budget - sum(charged) >= 0 and account.reserved == 0

    # rpm under contention: exactly rpm of 32 simultaneous requests get through.
    _, limited = _account_and_key(store, name="rpm", rpm=10)
    results = []
    threads = [threading.Thread(target=lambda: results.append(_try_reserve(store, limited))) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] * 10 + ["requests"] * 22


def _try_reserve(store, key):
    try:
        store.reserve(key, "m", None, 1, 1, False)
        return "ok"
    except RateLimited as e:
        return e.kind


WORKER = """
import json, sys
from openglm.serve.store import InsufficientBalance, RateLimited, Store
url, n, secrets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
results = []
with Store(url) as store:
    keys = [store.authenticate(secret) for secret in secrets]
    for key in keys:
        charged, refused = 0, {"balance": 0, "requests": 0}
        for i in range(n):
            try:
                r = store.reserve(key, "m", None, 10, 20, False)
            except InsufficientBalance:
                refused["balance"] += 1
                continue
            except RateLimited as e:
                refused[e.kind] += 1
                continue
            charged += store.settle(r, 10, i % 21, "length", 1).cost
        results.append({"charged": charged, "refused": refused})
print(json.dumps(results))
"""


@pytest.mark.slow  # starts two interpreters
def test_two_processes_never_overspend_one_key(store, db_url):
    """Two processes sharing keys, like two server replicas: one key runs out of money, the other
    reaches its requests-per-minute limit."""
    budget = 1_500
    paying = store.create_account("paying", budget)
    limited = store.create_account("limited", 10_000)
    secrets = [store.create_key(paying.id)[1], store.create_key(limited.id, rpm=25)[1]]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, db_url, "40", *secrets], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    (paid_a, rated_a), (paid_b, rated_b) = [json.loads(out) for out, _ in outputs]

    charged = paid_a["charged"] + paid_b["charged"]
    paying = store.get_account(paying.id)
    assert store.ledger_totals(paying.id)["cost"] == charged
    assert paying.balance == budget - charged >= 0 and paying.reserved == 0
    assert paid_a["refused"]["balance"] + paid_b["refused"]["balance"] > 0  # the budget ended the run

    assert store.ledger_totals(limited.id)["requests"] == 25
    assert rated_a["refused"]["requests"] + rated_b["refused"]["requests"] == 2 * 40 - 25


HOLDER = """
import sys, time
from openglm.serve.store import Store
store = Store(sys.argv[1])
key = store.authenticate(sys.argv[2])
store.settle(store.reserve(key, "m", "done", 10, 20, False), 10, 5, "stop", 1)
for i in range(2):
    store.reserve(key, "m", f"open-{i}", 10, 20, True)
print("ready", flush=True)
time.sleep(120)
"""


def test_recover_after_kill_9(store, db_url):
    account = store.create_account("acme", 1_000)
    secret = store.create_key(account.id)[1]
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, db_url, secret], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        assert store.recover() == Recovered(0, 0, 0)    # its owner still runs
        assert store.get_account(account.id).reserved == 100
    finally:
        proc.kill()                                     # SIGKILL between reserve and settle
        proc.wait()
    assert store.recover() == Recovered(0, 2, 0)      # nothing recorded as sent: released unbilled
    assert store.recover() == Recovered(0, 0, 0)
    after = store.get_account(account.id)
    assert (after.balance, after.reserved) == (1_000 - 20, 0)
    assert store.open_reservations() == []
    assert store.ledger_totals(account.id) == {"prompt_tokens": 10, "completion_tokens": 5, "cost": 20,
                                               "requests": 1}


def test_recover_in_process_and_by_age(store, db_url):
    _, key = _account_and_key(store, 1_000)
    mine = store.reserve(key, "m", None, 1, 1, False)
    closed = Store(db_url)
    closed.reserve(key, "m", None, 1, 1, False)
    closed.close()                                      # like a restarted server that got the same pid
    assert store.recover().released == 1
    assert store.open_reservations() == [mine]
    with Store(db_url, reservation_ttl=0) as impatient:  # a replica elsewhere: only age tells
        assert impatient.recover().released == 1
    assert store.open_reservations() == []
    with pytest.raises(OpenGLMError, match="no longer open"):
        store.settle(mine, 1, 1, "stop", 1)



def test_recover_bills_the_tokens_recorded_as_sent(store, db_url):
    account, key = _account_and_key(store, 1_000)
    crashed = Store(db_url)
    streams = [crashed.reserve(key, "m", f"stream-{i}", 10, 20, True) for i in range(3)]
    crashed.record_delivered({streams[0].id: 4, streams[1].id: 9})
    crashed.record_delivered({streams[0].id: 7, streams[1].id: 5})  # counts only grow
    assert crashed.open_reservations() == streams
    crashed.close()                                                  # its server died
    assert store.recover() == Recovered(settled=2, released=1, completion_tokens=7 + 9)
    assert store.recover() == Recovered(0, 0, 0)
    after = store.get_account(account.id)
    cost = cost_of(10, 7, PRICE) + cost_of(10, 9, PRICE)
    assert (after.balance, after.reserved) == (1_000 - cost, 0)
    assert store.ledger_totals(account.id) == {"prompt_tokens": 20, "completion_tokens": 16, "cost": cost,
                                               "requests": 2}
    engine = sqlalchemy.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text("SELECT request_id, finish_reason, stream FROM usage ORDER BY request_id"))
        assert [tuple(r) for r in rows] == [("stream-0", "interrupted", True), ("stream-1", "interrupted", True)]
    engine.dispose()
    # A settled request's late record changes nothing; its id stays used.
    r = store.reserve(key, "m", "late", 1, 5, True)
    store.settle(r, 1, 5, "length", 1)
    store.record_delivered({r.id: 3})
    assert store.recover() == Recovered(0, 0, 0) and store.get_account(account.id).reserved == 0

def test_ensure_demo(db_url):
    with Store(db_url) as store:
        secret = store.ensure_demo("glm-tiny")
        key = store.authenticate(secret)
        assert store.get_account(key.account_id).balance == DEMO_BALANCE
        assert store.get_price("glm-tiny") == DEMO_PRICE
        assert store.ensure_demo("glm-tiny") is None
    with Store(db_url) as again:  # reopening migrates nothing and keeps the data
        assert again.authenticate(secret) == key


def test_ensure_demo_keeps_an_existing_price(db_url):
    with Store(db_url) as store:
        store.set_price("glm-tiny", 7, 9)
        assert store.ensure_demo("glm-tiny")
        assert store.get_price("glm-tiny") == (7, 9)


def test_migrations_build_the_declared_schema(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from openglm.serve.db import metadata

    Store(db_url).close()
    engine = sqlalchemy.create_engine(db_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        indexes = {i["name"] for i in sqlalchemy.inspect(conn).get_indexes("usage")}
    engine.dispose()
    assert {"ix_usage_key_started", "ix_usage_account_created"} <= indexes



def test_an_open_reservation_survives_the_upgrade_to_recorded_tokens(db_url):
    from alembic import command
    from alembic.config import Config

    from openglm.serve import store as store_module

    with Store(db_url) as store:  # the newest schema; then back to 0001, with a request in flight there
        store.set_price("m", *PRICE)
        account, key = _account_and_key(store, 1_000)
        store.reserve(key, "m", "in-flight", 10, 20, True)
    engine = sqlalchemy.create_engine(db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store_module.__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    engine.dispose()
    with Store(db_url) as store:  # upgraded again: the reservation has nothing recorded as sent
        assert store.recover() == Recovered(0, 1, 0)
        assert store.get_account(account.id).reserved == 0

def test_bad_urls():
    for url in ("mysql://x/y", "sqlite://", "sqlite:///:memory:", "not a url"):
        with pytest.raises(OpenGLMError):
            Store(url)
