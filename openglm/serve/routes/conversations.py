"""The chat app's saved conversations (``openglm.serve.conversations``), private to the key's account.

``/v1/conversations``: list (``?q=`` searches titles and messages), create, get, rename, delete, and
``/v1/conversations/{id}/messages`` to append (``keep`` first cuts the tail: regenerate, edit).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Path as PathParam, Query
from pydantic import Field

from .. import conversations as C
from .. import schemas as S
from ..errors import APIError
from ..schemas import MAX_LIMIT, _Request
from .deps import Key, Svc

router = APIRouter()


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


_ConversationId = Annotated[str, PathParam(min_length=1, max_length=64)]


async def _call(fn, *args):
    try:
        return await to_thread.run_sync(fn, *args)
    except C.ConversationNotFound as e:
        raise APIError(404, str(e), code="conversation_not_found") from None
    except C.ConversationLimit as e:
        raise APIError(400, str(e), code="conversation_too_large") from None


@router.get("/v1/conversations")
async def list_conversations(svc: Svc, key: Key, q: Annotated[str, Query(max_length=200)] = "",
                             limit: Annotated[int, Query(ge=1, le=C.MAX_LIST)] = 50):
    """The account's conversations, newest first; ``q`` keeps those whose title or a message contains it."""
    return S.ObjectList(data=await _call(svc.conversations.list, key.account_id, q.strip() or None, limit))


@router.post("/v1/conversations", status_code=201)
async def create_conversation(body: NewConversation, svc: Svc, key: Key):
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    return await _call(svc.conversations.create, key.account_id, body.title, body.model, messages)


@router.get("/v1/conversations/{cid}")
async def get_conversation(cid: _ConversationId, svc: Svc, key: Key):
    return await _call(svc.conversations.get, key.account_id, cid)


@router.patch("/v1/conversations/{cid}")
async def rename_conversation(cid: _ConversationId, body: ConversationUpdate, svc: Svc, key: Key):
    return await _call(svc.conversations.rename, key.account_id, cid, body.title)


@router.delete("/v1/conversations/{cid}")
async def delete_conversation(cid: _ConversationId, svc: Svc, key: Key):
    await _call(svc.conversations.delete, key.account_id, cid)
    return S.Deleted(id=cid, object="conversation.deleted")


@router.post("/v1/conversations/{cid}/messages")
async def append_messages(cid: _ConversationId, body: AppendMessages, svc: Svc, key: Key):
    """Append messages; ``keep``: first drop the messages from that position on."""
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    return await _call(svc.conversations.append, key.account_id, cid, messages, body.keep, body.model)
