"""Account self-service, for the chat app and any key: the account, its usage, its keys.

All with the same bearer-key auth as the rest of ``/v1``; an account only ever sees its own. A key
created here inherits the creating key's limits, so a limited key cannot mint an unlimited one.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Path as PathParam, Query
from fastapi.encoders import jsonable_encoder
from pydantic import Field

from .. import schemas as S
from ..errors import APIError
from .deps import Key, Svc

router = APIRouter()
MAX_KEYS = 100  # live keys an account may create for itself
MAX_RECENT = 500
_KeyId = Annotated[int, PathParam(ge=1, lt=S.MAX_UNITS)]


class NewOwnKey(S._Request):
    name: Annotated[str, Field(max_length=200)] | None = None


@router.get("/v1/account")
async def account(svc: Svc, key: Key):
    """The key's account: balance, held and available units (1e-6 of the currency), and the key."""
    acct = await to_thread.run_sync(svc.store.get_account, key.account_id)
    return S.AccountView(id=acct.id, name=acct.name, balance=acct.balance, reserved=acct.reserved,
                         available=acct.available, key=S.KeyView.of(key, key.id))


@router.get("/v1/usage/requests")
async def recent_requests(svc: Svc, key: Key, limit: Annotated[int, Query(ge=1, le=MAX_RECENT)] = 50):
    """The account's newest settled requests from the ledger, newest first."""
    rows = await to_thread.run_sync(svc.store.recent_requests, key.account_id, limit)
    return S.ObjectList(data=jsonable_encoder(rows))


@router.get("/v1/keys")
async def own_keys(svc: Svc, key: Key):
    keys = await to_thread.run_sync(svc.store.list_keys, key.account_id)
    return S.ObjectList(data=[S.KeyView.of(k, key.id) for k in keys])


@router.post("/v1/keys", status_code=201)
async def create_own_key(body: NewOwnKey, svc: Svc, key: Key):
    """A new key for the account, with the calling key's limits; its secret is in this answer only."""
    keys = await to_thread.run_sync(svc.store.list_keys, key.account_id)
    if sum(k.revoked_at is None for k in keys) >= MAX_KEYS:
        raise APIError(400, f"this account has {MAX_KEYS} live keys, the most it may have; revoke some first",
                       code="too_many_keys")
    info, secret = await to_thread.run_sync(lambda: svc.store.create_key(
        key.account_id, body.name, key.expires_at, key.models, key.rpm, key.tpm, key.max_concurrency))
    return S.NewKeyView.of(info, key.id, secret=secret)


@router.delete("/v1/keys/{key_id}")
async def revoke_own_key(key_id: _KeyId, svc: Svc, key: Key):
    """Revoke one of the account's keys (the calling one too); another account's key is a 404."""
    keys = await to_thread.run_sync(svc.store.list_keys, key.account_id)
    if not any(k.id == key_id for k in keys):
        raise APIError(404, f"no key with id {key_id}", code="key_not_found")
    await to_thread.run_sync(svc.store.revoke_key, key_id)
    svc.auth.forget()
    return S.Revoked(id=key_id)


@router.get("/v1/usage", response_model=S.UsageReport)
async def usage(svc: Svc, key: Key, since: date | None = None, until: date | None = None):
    """The key's account: balance (units of 1e-6) and settled usage by day and model."""
    rows = await to_thread.run_sync(svc.store.usage, key.account_id, since, until)
    acct = await to_thread.run_sync(svc.store.get_account, key.account_id)
    return S.UsageReport(account_id=acct.id, balance=acct.balance, usage=rows)
