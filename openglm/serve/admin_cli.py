"""``openglm accounts|keys|prices``: manage the serving database's accounts, API keys and prices.

Amounts on the command line are in currency (``12.50``), stored exactly as integer units
(1 unit = 1e-6); prices are currency per million tokens.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation

from ..errors import OpenGLMError

UNITS = 1_000_000  # units per currency unit


def parse_amount(text: str) -> int:
    """"12.5" -> 12_500_000 units, exactly; more than 6 decimals or a negative amount is an error."""
    try:
        value = Decimal(text) * UNITS
    except InvalidOperation:
        raise OpenGLMError(f"not an amount: {text!r}") from None
    if not value.is_finite() or value < 0 or value != value.to_integral_value():
        raise OpenGLMError(f"not an amount of at most 6 decimals >= 0: {text!r}")
    return int(value)


def format_amount(units: int) -> str:
    """12_500_000 units -> "12.500000"."""
    sign, units = ("-", -units) if units < 0 else ("", units)
    return f"{sign}{units // UNITS}.{units % UNITS:06d}"


def _amount(text: str) -> int:
    try:
        return parse_amount(text)
    except OpenGLMError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(subparsers) -> None:
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", metavar="URL", help="database URL: sqlite:///path.db or postgresql://user@host/db "
                    "(default: the database `openglm serve` uses)")

    accounts = subparsers.add_parser("accounts", help="create, top up and show billing accounts")
    verbs = accounts.add_subparsers(dest="action", metavar="<action>", required=True)
    p = verbs.add_parser("create", parents=[db], help="create an account")
    p.add_argument("name")
    p.add_argument("--balance", type=_amount, default=0, metavar="AMOUNT", help="starting balance (currency)")
    p.set_defaults(func=_accounts_create)
    p = verbs.add_parser("top-up", parents=[db], help="add to an account's balance")
    p.add_argument("account", help="account id or name")
    p.add_argument("amount", type=_amount, help="amount to add (currency)")
    p.set_defaults(func=_accounts_top_up)
    p = verbs.add_parser("show", parents=[db], help="one account's balance, keys and usage; or all accounts")
    p.add_argument("account", nargs="?", help="account id or name (default: list all accounts)")
    p.set_defaults(func=_accounts_show)

    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    verbs = keys.add_subparsers(dest="action", metavar="<action>", required=True)
    p = verbs.add_parser("create", parents=[db],
                         help="create a key; prints its secret once on stdout (only a hash is stored)")
    p.add_argument("account", help="account id or name")
    p.add_argument("--name", help="a label for the key")
    p.add_argument("--expires-in", type=float, metavar="DAYS", help="the key expires after this many days")
    p.add_argument("--models", help="comma-separated models the key may use (default: all)")
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens (prompt + max_tokens) per minute")
    p.add_argument("--max-concurrency", type=int, help="requests running at once")
    p.add_argument("--admin", action="store_true", help="the key may call the admin endpoints")
    p.set_defaults(func=_keys_create)
    p = verbs.add_parser("list", parents=[db], help="list keys (never their secrets)")
    p.add_argument("--account", help="only this account's keys (id or name)")
    p.set_defaults(func=_keys_list)
    p = verbs.add_parser("revoke", parents=[db], help="revoke a key for good")
    p.add_argument("key_id", type=int)
    p.set_defaults(func=_keys_revoke)

    prices = subparsers.add_parser("prices", help="set and list per-model prices")
    verbs = prices.add_subparsers(dest="action", metavar="<action>", required=True)
    p = verbs.add_parser("set", parents=[db], help="set a model's price per million tokens (currency)")
    p.add_argument("model")
    p.add_argument("input", type=_amount, help="price per million input (prompt) tokens")
    p.add_argument("output", type=_amount, help="price per million output (completion) tokens")
    p.set_defaults(func=_prices_set)
    p = verbs.add_parser("list", parents=[db], help="list model prices")
    p.set_defaults(func=_prices_list)


def _store(args):
    from .store import DEFAULT_DB_URL, Store  # imported here: SQLAlchemy and alembic are slow to import

    return Store(args.db or DEFAULT_DB_URL)


def _accounts_create(args) -> int:
    with _store(args) as store:
        account = store.create_account(args.name, args.balance)
    print(f"account {account.id} {account.name!r}: balance {format_amount(account.balance)}")
    return 0


def _accounts_top_up(args) -> int:
    with _store(args) as store:
        account = store.find_account(args.account)
        balance = store.top_up(account.id, args.amount)
    print(f"account {account.id} {account.name!r}: balance {format_amount(balance)}")
    return 0


def _accounts_show(args) -> int:
    with _store(args) as store:
        if args.account is None:
            print(f"{'id':>4}  {'name':<24} {'balance':>16} {'reserved':>14}")
            for a in store.list_accounts():
                print(f"{a.id:>4}  {a.name:<24} {format_amount(a.balance):>16} {format_amount(a.reserved):>14}")
            return 0
        account = store.find_account(args.account)
        keys = store.list_keys(account.id)
        totals = store.ledger_totals(account.id)
        days = store.usage(account.id)
    print(f"account {account.id} {account.name!r} (created {account.created_at:%Y-%m-%d %H:%M} UTC)")
    print(f"  balance   {format_amount(account.balance)}")
    print(f"  reserved  {format_amount(account.reserved)}  (held by requests in flight)")
    print(f"  keys      {sum(_status(k) == 'active' for k in keys)} active of {len(keys)}")
    print(f"  usage     {totals['requests']} requests, {totals['prompt_tokens']} prompt + "
          f"{totals['completion_tokens']} completion tokens, cost {format_amount(totals['cost'])}")
    for row in days:
        print(f"    {row['date']}  {row['model']:<20} {row['requests']:>7} req {row['total_tokens']:>10} tok "
              f"{format_amount(row['cost']):>14}")
    return 0


def _keys_create(args) -> int:
    expires_at = None
    if args.expires_in is not None:
        expires_at = datetime.now(timezone.utc) + timedelta(days=args.expires_in)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    with _store(args) as store:
        account = store.find_account(args.account)
        info, secret = store.create_key(account.id, name=args.name, expires_at=expires_at, models=models,
                                        rpm=args.rpm, tpm=args.tpm, max_concurrency=args.max_concurrency,
                                        admin=args.admin)
    print(f"key {info.id} for account {account.id} {account.name!r} ({_describe(info)}); "
          "its secret is shown only now:", file=sys.stderr)
    print(secret)
    return 0


def _keys_list(args) -> int:
    with _store(args) as store:
        account_id = store.find_account(args.account).id if args.account else None
        keys = store.list_keys(account_id)
    print(f"{'id':>4} {'account':>7}  {'prefix':<16} {'status':<8} {'name':<16} limits")
    for k in keys:
        print(f"{k.id:>4} {k.account_id:>7}  {k.prefix + '...':<16} {_status(k):<8} {k.name or '':<16} "
              f"{_describe(k)}")
    return 0


def _keys_revoke(args) -> int:
    with _store(args) as store:
        store.revoke_key(args.key_id)
    print(f"key {args.key_id} revoked")
    return 0


def _prices_set(args) -> int:
    with _store(args) as store:
        store.set_price(args.model, args.input, args.output)
    print(f"{args.model}: {format_amount(args.input)} per million input tokens, "
          f"{format_amount(args.output)} per million output tokens")
    return 0


def _prices_list(args) -> int:
    with _store(args) as store:
        prices = store.list_prices()
    print(f"{'model':<24} {'input/M':>14} {'output/M':>14}")
    for model, (inp, out) in prices.items():
        print(f"{model:<24} {format_amount(inp):>14} {format_amount(out):>14}")
    return 0


def _status(key) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= datetime.now(timezone.utc):
        return "expired"
    return "active"


def _describe(key) -> str:
    parts = [f"{name} {value}" for name, value in (("rpm", key.rpm), ("tpm", key.tpm),
                                                   ("concurrency", key.max_concurrency)) if value is not None]
    if key.models is not None:
        parts.append("models " + ",".join(key.models))
    if key.expires_at is not None:
        parts.append(f"expires {key.expires_at:%Y-%m-%d %H:%M} UTC")
    if key.admin:
        parts.append("admin")
    return "; ".join(parts) or "no limits"
