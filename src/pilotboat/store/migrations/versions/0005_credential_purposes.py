"""credential purposes: bootstrap or management PSKs and certificates, their state, the DTLS server key

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

CREDENTIAL_TABLES = ('psk_identities', 'device_certificates')


def upgrade() -> None:
    # Plain ADD COLUMN with a server default: existing credentials become bootstrap credentials in use,
    # and neither backend rebuilds the tables.
    for table in CREDENTIAL_TABLES:
        op.add_column(table, sa.Column('purpose', sa.String(length=16), server_default='bootstrap', nullable=False))
        op.add_column(table, sa.Column('state', sa.String(length=16), server_default='active', nullable=False))
    op.create_table('dtls_server_keys',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('common_name', sa.String(length=253), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('certificate_pem', sa.Text(), nullable=False),
    sa.Column('key_sealed', sa.Text(), nullable=False),
    sa.Column('not_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('dtls_server_keys')
    for table in CREDENTIAL_TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column('state')
            batch_op.drop_column('purpose')
