"""The chat app's saved conversations: private to their account, in the same database as the ledger.

Every call takes the caller's account id and only ever reads or writes that account's rows: another
account's conversation id is "no such conversation", exactly like an id that never existed. Sizes
are bounded (messages per conversation, characters per message, conversations per account) so one
account cannot grow the database without limit through the app.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from uuid import uuid4

from sqlalchemy import delete, exists, func, insert, or_, select, update

from ..errors import OpenGLMError
from .db import conversation_messages as messages_t
from .db import conversations as conversations_t

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 2048             # per conversation: OpenAI's limit on one chat
MAX_MESSAGE_CHARS = 200_000     # per message (content plus its tool calls' JSON)
MAX_CONVERSATIONS = 10_000      # per account
MAX_TITLE_CHARS = 200
MAX_LIST = 200                  # conversations in one list answer
TITLE_FROM_MESSAGE = 80         # an untitled conversation is named after its first user message, this long


class ConversationNotFound(OpenGLMError):
    """No conversation with this id belongs to the account (it may belong to another one)."""


class ConversationLimit(OpenGLMError):
    """A size bound would be exceeded."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _summary(row) -> dict:
    return {"id": row.id, "object": "conversation", "title": row.title, "model": row.model,
            "created_at": row.created_at.isoformat(), "updated_at": row.updated_at.isoformat()}


def _message(row) -> dict:
    out = {"role": row.role, "content": row.content}
    if row.tool_calls is not None:
        out["tool_calls"] = json.loads(row.tool_calls)
    return out


def _clean(text: str | None) -> str | None:
    """``text`` with each NUL (which PostgreSQL text cannot hold) made U+FFFD, as a decoder shows
    what it cannot read. A model's output can hold one; refusing it would lose the whole answer."""
    return None if text is None else text.replace("\x00", "\ufffd")


def _valid_id(cid: str) -> bool:
    return len(cid) == 32 and all(ch in "0123456789abcdef" for ch in cid)


def _check_messages(messages: list[dict]) -> None:
    for m in messages:
        m["content"] = _clean(m["content"])
        if m["role"] not in ROLES:
            raise OpenGLMError(f"messages: role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        size = len(m["content"]) + (len(json.dumps(m["tool_calls"])) if m.get("tool_calls") else 0)
        if size > MAX_MESSAGE_CHARS:
            raise ConversationLimit(f"messages: a message has {size} characters, more than {MAX_MESSAGE_CHARS}")


def _title_of(messages: list[dict]) -> str:
    first = next((m["content"] for m in messages if m["role"] == "user" and m["content"].strip()), "")
    return " ".join(first.split())[:TITLE_FROM_MESSAGE]


def _like(text: str) -> str:
    """``text`` as a LIKE pattern that matches it anywhere, its own % and _ taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Conversations:
    """Conversations of accounts in ``store``'s database (an ``openglm.serve.store.Store``)."""

    def __init__(self, store):
        self._engine, self._reader = store._engine, store._reader

    def list(self, account_id: int, query: str | None = None, limit: int = 50) -> list[dict]:
        """The account's conversations, most recently updated first; ``query``: only those whose title
        or a message contains it (case-insensitive)."""
        query = _clean(query)
        c = conversations_t
        q = select(c).where(c.c.account_id == account_id).order_by(c.c.updated_at.desc(), c.c.id).limit(limit)
        if query:
            pattern = _like(query)
            in_messages = exists().where(messages_t.c.conversation_id == c.c.id,
                                         messages_t.c.content.ilike(pattern, escape="\\"))
            q = q.where(or_(c.c.title.ilike(pattern, escape="\\"), in_messages))
        with self._reader.begin() as conn:
            return [_summary(r) for r in conn.execute(q)]

    def create(self, account_id: int, title: str | None = None, model: str | None = None,
               messages: list[dict] = ()) -> dict:
        messages = list(messages)
        _check_messages(messages)
        title, model = _clean(title), _clean(model)
        if len(messages) > MAX_MESSAGES:
            raise ConversationLimit(f"messages: {len(messages)} messages, more than the {MAX_MESSAGES} a "
                                    "conversation may hold")
        now = _now()
        cid = uuid4().hex
        with self._engine.begin() as conn:
            count = conn.execute(select(func.count()).select_from(conversations_t)
                                 .where(conversations_t.c.account_id == account_id)).scalar()
            if count >= MAX_CONVERSATIONS:
                raise ConversationLimit(f"this account already has {count} conversations, the most it may keep; "
                                        "delete some first")
            conn.execute(insert(conversations_t).values(id=cid, account_id=account_id,
                                                        title=title if title is not None else _title_of(messages),
                                                        model=model, created_at=now, updated_at=now))
            self._insert(conn, cid, 0, messages, now)
            return self._read(conn, account_id, cid)

    def get(self, account_id: int, cid: str) -> dict:
        """The conversation with its messages; ConversationNotFound unless the account owns it."""
        with self._reader.begin() as conn:
            return self._read(conn, account_id, cid)

    def rename(self, account_id: int, cid: str, title: str) -> dict:
        title = _clean(title)
        with self._engine.begin() as conn:
            self._own(conn, account_id, cid)
            conn.execute(update(conversations_t).where(conversations_t.c.id == cid)
                         .values(title=title, updated_at=_now()))
            return _summary(conn.execute(select(conversations_t).where(conversations_t.c.id == cid)).one())

    def delete(self, account_id: int, cid: str) -> None:
        with self._engine.begin() as conn:
            self._own(conn, account_id, cid)
            conn.execute(delete(messages_t).where(messages_t.c.conversation_id == cid))
            conn.execute(delete(conversations_t).where(conversations_t.c.id == cid))

    def append(self, account_id: int, cid: str, messages: list[dict], keep: int | None = None,
               model: str | None = None) -> dict:
        """Append ``messages``; ``keep``: first drop every message from position ``keep`` on (a
        regenerated answer or an edited question replaces what followed it). Returns the conversation."""
        _check_messages(messages)
        model = _clean(model)
        now = _now()
        with self._engine.begin() as conn:
            row = self._own(conn, account_id, cid, lock=True)
            count = conn.execute(select(func.count()).select_from(messages_t)
                                 .where(messages_t.c.conversation_id == cid)).scalar()
            if keep is not None and keep < count:
                conn.execute(delete(messages_t).where(messages_t.c.conversation_id == cid,
                                                      messages_t.c.position >= keep))
                count = keep
            if count + len(messages) > MAX_MESSAGES:
                raise ConversationLimit(f"a conversation holds at most {MAX_MESSAGES} messages; "
                                        "start a new one")
            self._insert(conn, cid, count, messages, now)
            values = {"updated_at": now}
            if not row.title:
                values["title"] = _title_of(messages)
            if model is not None:
                values["model"] = model
            conn.execute(update(conversations_t).where(conversations_t.c.id == cid).values(**values))
            return self._read(conn, account_id, cid)

    # ----------------------------------------------------------------------------------- helpers

    @staticmethod
    def _own(conn, account_id: int, cid: str, lock: bool = False):
        if not _valid_id(cid):  # not one this store made: no such conversation, without asking the database
            raise ConversationNotFound(f"no conversation {cid!r}")
        q = select(conversations_t).where(conversations_t.c.id == cid, conversations_t.c.account_id == account_id)
        row = conn.execute(q.with_for_update() if lock else q).first()
        if row is None:
            raise ConversationNotFound(f"no conversation {cid!r}")
        return row

    def _read(self, conn, account_id: int, cid: str) -> dict:
        row = self._own(conn, account_id, cid)
        rows = conn.execute(select(messages_t).where(messages_t.c.conversation_id == cid)
                            .order_by(messages_t.c.position))
        return {**_summary(row), "messages": [_message(r) for r in rows]}

    @staticmethod
    def _insert(conn, cid: str, start: int, messages: list[dict], now: datetime) -> None:
        if messages:
            conn.execute(insert(messages_t), [
                {"conversation_id": cid, "position": start + i, "role": m["role"], "content": m["content"],
                 "tool_calls": json.dumps(m["tool_calls"]) if m.get("tool_calls") else None, "created_at": now}
                for i, m in enumerate(messages)])
