"""The admin API: accounts, keys, prices and the ledger (the admin secret or an admin key)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Path as PathParam, Query
from fastapi.encoders import jsonable_encoder

from ...errors import OpenGLMError
from .. import schemas as S
from ..errors import APIError
from .deps import ADMIN, Svc

router = APIRouter(dependencies=[ADMIN])
_Id = Annotated[int, PathParam(ge=1, lt=S.MAX_UNITS)]
_IdQuery = Annotated[int | None, Query(ge=1, lt=S.MAX_UNITS)]


async def _call(fn, *args):
    """A store call whose OpenGLMError means "no such account/key" or a bad value: 404 or 400."""
    try:
        return await to_thread.run_sync(fn, *args)
    except OpenGLMError as e:
        raise APIError(404 if str(e).startswith("no ") else 400, str(e)) from None


@router.get("/admin/accounts")
async def admin_accounts(svc: Svc):
    return jsonable_encoder(await to_thread.run_sync(svc.store.list_accounts))


@router.post("/admin/accounts", status_code=201)
async def admin_create_account(body: S.NewAccount, svc: Svc):
    return jsonable_encoder(await to_thread.run_sync(svc.store.create_account, body.name, body.balance))


@router.get("/admin/accounts/{account_id}")
async def admin_account(account_id: _Id, svc: Svc):
    return jsonable_encoder(await _call(svc.store.get_account, account_id))


@router.post("/admin/accounts/{account_id}/top-up")
async def admin_top_up(account_id: _Id, body: S.TopUp, svc: Svc):
    return S.Balance(account_id=account_id, balance=await _call(svc.store.top_up, account_id, body.amount))


@router.get("/admin/keys")
async def admin_keys(svc: Svc, account_id: _IdQuery = None):
    return jsonable_encoder(await to_thread.run_sync(svc.store.list_keys, account_id))


@router.post("/admin/keys", status_code=201)
async def admin_create_key(body: S.NewKey, svc: Svc):
    expires = None
    if body.expires_at is not None:
        try:
            expires = datetime.fromisoformat(body.expires_at)
        except ValueError:
            raise APIError(400, "expires_at: not an ISO 8601 time", param="expires_at", code="invalid_value") from None
    info, secret = await _call(svc.store.create_key, body.account_id, body.name, expires, body.models, body.rpm,
                               body.tpm, body.max_concurrency, body.admin)
    return {**jsonable_encoder(info), "secret": secret}


@router.delete("/admin/keys/{key_id}")
async def admin_revoke_key(key_id: _Id, svc: Svc):
    await _call(svc.store.revoke_key, key_id)
    return S.Revoked(id=key_id)


@router.put("/admin/prices/{model}")
async def admin_set_price(model: str, body: S.Price, svc: Svc):
    await _call(svc.store.set_price, model, body.input_per_million, body.output_per_million)
    return S.ModelPrice(model=model, **body.model_dump())


@router.get("/admin/prices/{model}")
async def admin_price(model: str, svc: Svc):
    price = await to_thread.run_sync(svc.store.get_price, model)
    return S.ModelPrice(model=model, input_per_million=price[0], output_per_million=price[1])


@router.get("/admin/ledger")
async def admin_ledger(svc: Svc, account_id: _IdQuery = None):
    """Ledger sums (prompt_tokens, completion_tokens, cost, requests), for one account or all."""
    return await to_thread.run_sync(svc.store.ledger_totals, account_id)
