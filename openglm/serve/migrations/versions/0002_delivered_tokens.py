"""Reservations record the completion tokens sent so far, so a crashed server's requests are billed for them.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(sa.Column("delivered", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("delivered_at", sa.DateTime))


def downgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("delivered_at")
        batch.drop_column("delivered")
