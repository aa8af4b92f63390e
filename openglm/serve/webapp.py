"""The chat app: its page and static files at ``/``, and the account self-service API it uses.

Routes (all with the same bearer-key auth as the rest of ``/v1``; an account only ever sees its own):

- ``/v1/conversations``: list (``?q=`` searches titles and messages), create, get, rename, delete,
  and ``/v1/conversations/{id}/messages`` to append (``keep`` first cuts the tail: regenerate, edit);
- ``/v1/account``: the key's account and balance; ``/v1/usage/requests``: its newest ledger rows;
- ``/v1/keys``: the account's keys; create one (its secret shown once; it inherits the creating key's
  limits, so a limited key cannot mint an unlimited one), revoke one.

The page is plain ES modules and vendored libraries under ``static/`` (no CDN), served with a strict
Content-Security-Policy: no inline script or style, nothing loaded from elsewhere.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import Depends, FastAPI, Path as PathParam, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import Field

from . import conversations as C
from .schemas import MAX_LIMIT, MAX_UNITS, _Request

# Scripts, styles, fonts and API calls from this origin only; no inline code, no frames, no plugins.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; font-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
                "x-frame-options": "DENY", "cache-control": "no-cache"}
MAX_KEYS = 100  # live keys an account may create for itself
MAX_RECENT = 500


class ConversationMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=C.MAX_MESSAGE_CHARS)] = ""
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=64)] | None = None


_Messages = Annotated[list[ConversationMessage], Field(max_length=C.MAX_MESSAGES)]
_Title = Annotated[str, Field(max_length=C.MAX_TITLE_CHARS)]
_Model = Annotated[str, Field(max_length=200)]


class NewConversation(_Request):
    title: _Title | None = None
    model: _Model | None = None
    messages: _Messages = []


class ConversationUpdate(_Request):
    title: _Title


class AppendMessages(_Request):
    messages: Annotated[list[ConversationMessage], Field(min_length=1, max_length=C.MAX_MESSAGES)]
    keep: Annotated[int, Field(ge=0, lt=MAX_LIMIT)] | None = None
    model: _Model | None = None


class NewOwnKey(_Request):
    name: Annotated[str, Field(max_length=200)] | None = None


_ConversationId = Annotated[str, PathParam(min_length=1, max_length=64)]
_KeyId = Annotated[int, PathParam(ge=1, lt=MAX_UNITS)]


class _Static(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers["x-content-type-options"] = "nosniff"
        return response


def _key_view(key, current_id: int) -> dict:
    return {"id": key.id, "name": key.name, "prefix": key.prefix, "created_at": key.created_at,
            "expires_at": key.expires_at, "revoked_at": key.revoked_at, "models": key.models, "rpm": key.rpm,
            "tpm": key.tpm, "max_concurrency": key.max_concurrency, "current": key.id == current_id}


def add_webapp(app: FastAPI, srv, static_dir, api_error) -> None:
    """Add the page, its static files and the self-service routes to ``app`` (``srv``: its ``_Server``;
    ``api_error``: the app's error class, ``APIError(status, message, ..., code=...)``)."""
    conversations = C.Conversations(srv.store)
    auth = Depends(srv.authenticate)

    async def call(fn, *args):
        try:
            return await to_thread.run_sync(fn, *args)
        except C.ConversationNotFound as e:
            raise api_error(404, str(e), code="conversation_not_found") from None
        except C.ConversationLimit as e:
            raise api_error(400, str(e), code="conversation_too_large") from None

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(static_dir / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", _Static(directory=static_dir), name="static")

    # ------------------------------------------------------------------------ conversations

    @app.get("/v1/conversations")
    async def list_conversations(key=auth, q: Annotated[str, Query(max_length=200)] = "",
                                 limit: Annotated[int, Query(ge=1, le=C.MAX_LIST)] = 50):
        """The account's conversations, newest first; ``q`` keeps those whose title or a message contains it."""
        return {"object": "list", "data": await call(conversations.list, key.account_id, q.strip() or None, limit)}

    @app.post("/v1/conversations", status_code=201)
    async def create_conversation(body: NewConversation, key=auth):
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        return await call(conversations.create, key.account_id, body.title, body.model, messages)

    @app.get("/v1/conversations/{cid}")
    async def get_conversation(cid: _ConversationId, key=auth):
        return await call(conversations.get, key.account_id, cid)

    @app.patch("/v1/conversations/{cid}")
    async def rename_conversation(cid: _ConversationId, body: ConversationUpdate, key=auth):
        return await call(conversations.rename, key.account_id, cid, body.title)

    @app.delete("/v1/conversations/{cid}")
    async def delete_conversation(cid: _ConversationId, key=auth):
        await call(conversations.delete, key.account_id, cid)
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    @app.post("/v1/conversations/{cid}/messages")
    async def append_messages(cid: _ConversationId, body: AppendMessages, key=auth):
        """Append messages; ``keep``: first drop the messages from that position on."""
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        return await call(conversations.append, key.account_id, cid, messages, body.keep, body.model)

    # ------------------------------------------------------------------------ account self-service

    @app.get("/v1/account")
    async def account(key=auth):
        """The key's account: balance, held and available units (1e-6 of the currency), and the key."""
        acct = await to_thread.run_sync(srv.store.get_account, key.account_id)
        return {"id": acct.id, "name": acct.name, "balance": acct.balance, "reserved": acct.reserved,
                "available": acct.available, "key": _key_view(key, key.id)}

    @app.get("/v1/usage/requests")
    async def recent_requests(key=auth, limit: Annotated[int, Query(ge=1, le=MAX_RECENT)] = 50):
        """The account's newest settled requests from the ledger, newest first."""
        rows = await to_thread.run_sync(srv.store.recent_requests, key.account_id, limit)
        return {"object": "list", "data": jsonable_encoder(rows)}

    @app.get("/v1/keys")
    async def own_keys(key=auth):
        keys = await to_thread.run_sync(srv.store.list_keys, key.account_id)
        return {"object": "list", "data": jsonable_encoder([_key_view(k, key.id) for k in keys])}

    @app.post("/v1/keys", status_code=201)
    async def create_own_key(body: NewOwnKey, key=auth):
        """A new key for the account, with the calling key's limits; its secret is in this answer only."""
        keys = await to_thread.run_sync(srv.store.list_keys, key.account_id)
        if sum(k.revoked_at is None for k in keys) >= MAX_KEYS:
            raise api_error(400, f"this account has {MAX_KEYS} live keys, the most it may have; revoke some first",
                            code="too_many_keys")
        info, secret = await to_thread.run_sync(lambda: srv.store.create_key(
            key.account_id, body.name, key.expires_at, key.models, key.rpm, key.tpm, key.max_concurrency))
        return {**jsonable_encoder(_key_view(info, key.id)), "secret": secret}

    @app.delete("/v1/keys/{key_id}")
    async def revoke_own_key(key_id: _KeyId, key=auth):
        """Revoke one of the account's keys (the calling one too); another account's key is a 404."""
        keys = await to_thread.run_sync(srv.store.list_keys, key.account_id)
        if not any(k.id == key_id for k in keys):
            raise api_error(404, f"no key with id {key_id}", code="key_not_found")
        await to_thread.run_sync(srv.store.revoke_key, key_id)
        srv.keys.clear()  # drop cached checks: the revoked key must fail at once everywhere in this process
        return {"id": key_id, "revoked": True}
