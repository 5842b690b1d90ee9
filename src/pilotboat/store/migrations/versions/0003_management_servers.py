"""management servers: definitions per organisation, and the one each device is assigned

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('management_servers',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('org_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('address', sa.String(length=253), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('uri_scheme', sa.String(length=8), nullable=False),
    sa.Column('security_mode', sa.Integer(), nullable=False),
    sa.Column('short_server_id', sa.Integer(), nullable=False),
    sa.Column('lifetime', sa.Integer(), nullable=False),
    sa.Column('binding', sa.String(length=8), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organisations.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('org_id', 'address', 'port', name='uq_management_servers_org_address_port')
    )
    op.create_index(op.f('ix_management_servers_org_id'), 'management_servers', ['org_id'], unique=False)
    # The reference is written inside ADD COLUMN: SQLite cannot add a constraint to an existing table,
    # and rebuilding the devices table would fire the ON DELETE actions of the tables referencing it.
    op.add_column(
        'devices',
        sa.Column('management_server_id', sa.String(length=36), sa.ForeignKey('management_servers.id'), nullable=True),
        inline_references=True,
    )
    op.create_index(op.f('ix_devices_management_server_id'), 'devices', ['management_server_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_devices_management_server_id'), table_name='devices')
    with op.batch_alter_table('devices') as batch_op:
        batch_op.drop_column('management_server_id')
    op.drop_index(op.f('ix_management_servers_org_id'), table_name='management_servers')
    op.drop_table('management_servers')
