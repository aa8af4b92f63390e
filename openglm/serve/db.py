"""The billing schema as SQLAlchemy Core tables; the migrations in ``migrations/versions`` build it.

Money columns are integer units (1 unit = 1e-6 of the currency). Times are stored as naive UTC and
read back as aware UTC datetimes, the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, Column, DateTime, ForeignKey, Index, Integer,
                        MetaData, String, Table, Text, TypeDecorator, UniqueConstraint)


class UTCDateTime(TypeDecorator):
    """A UTC timestamp: aware datetimes in, aware UTC datetimes out; naive UTC in the database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; pass an aware datetime")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


metadata = MetaData()

accounts = Table(
    "accounts", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("balance", BigInteger, nullable=False),
    # Sum of the holds of this account's open reservations; what can be spent is balance - reserved.
    Column("reserved", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    CheckConstraint("reserved >= 0 AND reserved <= balance", name="ck_accounts_reserved"),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", String(200)),
    Column("prefix", String(32), nullable=False),  # the first characters of the secret, for listing
    Column("secret_hash", String(64), nullable=False, unique=True),  # SHA-256 hex of the secret
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
    Column("models", Text),  # JSON list of allowed model names; NULL: every model
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("max_concurrency", Integer),
    Column("admin", Boolean, nullable=False),
)

prices = Table(
    "prices", metadata,
    Column("model", String(200), primary_key=True),
    Column("input_per_million", BigInteger, nullable=False),
    Column("output_per_million", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# A request in flight: its worst-case cost is held on the account until settle/release/recover
# deletes the row. The owner columns let recover() tell a crashed server's rows from a live one's.
reservations = Table(
    "reservations", metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("model", String(200), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("max_tokens", Integer, nullable=False),
    Column("input_per_million", BigInteger, nullable=False),  # the prices at reserve time, used at settle
    Column("output_per_million", BigInteger, nullable=False),
    Column("hold", BigInteger, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("owner_host", String(255), nullable=False),
    Column("owner_pid", Integer, nullable=False),
    Column("owner_instance", String(32), nullable=False),
    # Completion tokens sent to the client so far (streams only), written in batches as they go out,
    # and when: what recover() bills for a request whose server died.
    Column("delivered", Integer, nullable=False, server_default="0"),
    Column("delivered_at", UTCDateTime),
    UniqueConstraint("account_id", "request_id", name="uq_reservations_account_request"),
    Index("ix_reservations_key_created", "key_id", "created_at"),
)

# The append-only usage ledger: one row per settled request, never updated or deleted.
usage = Table(
    "usage", metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("model", String(200), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cost", BigInteger, nullable=False),
    Column("latency_ms", Integer, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("finish_reason", String(32), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),  # when the request was reserved: rate windows
    Column("created_at", UTCDateTime, nullable=False),  # when it was settled: usage by day
    UniqueConstraint("account_id", "request_id", name="uq_usage_account_request"),
    Index("ix_usage_key_started", "key_id", "started_at"),
    Index("ix_usage_account_created", "account_id", "created_at"),
)

# The chat app's saved conversations, private to their account. ``id`` is a random public id (never
# a counter, so one account's ids say nothing about another's); ``updated_at`` orders the list.
conversations = Table(
    "conversations", metadata,
    Column("id", String(32), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("title", String(200), nullable=False),
    Column("model", String(200)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_conversations_account_updated", "account_id", "updated_at"),
)

# Their messages in order (``position`` from 0); ``tool_calls`` is the JSON list an assistant turn called.
conversation_messages = Table(
    "conversation_messages", metadata,
    Column("id", Integer, primary_key=True),
    Column("conversation_id", String(32), ForeignKey("conversations.id"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False),
    Column("tool_calls", Text),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("conversation_id", "position", name="uq_conversation_messages_position"),
)
