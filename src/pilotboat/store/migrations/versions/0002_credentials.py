"""credentials: organisation CAs, device certificates, PSK identities, trust store, membership grants

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('trusted_certificates',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('subject', sa.String(length=1024), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('certificate_pem', sa.Text(), nullable=False),
    sa.Column('not_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('added_by', sa.String(length=320), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('fingerprint')
    )
    op.create_table('certificate_authorities',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('org_id', sa.String(length=36), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('subject', sa.String(length=1024), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('certificate_pem', sa.Text(), nullable=False),
    sa.Column('parents_pem', sa.Text(), nullable=False),
    sa.Column('key_sealed', sa.Text(), nullable=False),
    sa.Column('root_key_sealed', sa.Text(), nullable=True),
    sa.Column('not_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('crl_number', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organisations.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('fingerprint')
    )
    op.create_index(op.f('ix_certificate_authorities_org_id'), 'certificate_authorities', ['org_id'], unique=False)
    op.create_table('device_certificates',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('org_id', sa.String(length=36), nullable=False),
    sa.Column('device_id', sa.String(length=36), nullable=True),
    sa.Column('ca_id', sa.String(length=36), nullable=False),
    sa.Column('serial', sa.String(length=64), nullable=False),
    sa.Column('common_name', sa.String(length=256), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('certificate_pem', sa.Text(), nullable=False),
    sa.Column('key_source', sa.String(length=16), nullable=False),
    sa.Column('key_sealed', sa.Text(), nullable=True),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=False),
    sa.Column('not_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revocation_reason', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['ca_id'], ['certificate_authorities.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['org_id'], ['organisations.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('fingerprint')
    )
    op.create_index(op.f('ix_device_certificates_ca_id'), 'device_certificates', ['ca_id'], unique=False)
    op.create_index(op.f('ix_device_certificates_device_id'), 'device_certificates', ['device_id'], unique=False)
    op.create_index(op.f('ix_device_certificates_not_after'), 'device_certificates', ['not_after'], unique=False)
    op.create_index(op.f('ix_device_certificates_org_id'), 'device_certificates', ['org_id'], unique=False)
    op.create_table('psk_identities',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('identity', sa.String(length=128), nullable=False),
    sa.Column('org_id', sa.String(length=36), nullable=False),
    sa.Column('device_id', sa.String(length=36), nullable=False),
    sa.Column('key_sealed', sa.Text(), nullable=False),
    sa.Column('key_length', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['org_id'], ['organisations.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('identity')
    )
    op.create_index(op.f('ix_psk_identities_device_id'), 'psk_identities', ['device_id'], unique=False)
    op.create_index(op.f('ix_psk_identities_org_id'), 'psk_identities', ['org_id'], unique=False)
    op.add_column('memberships', sa.Column('grants', sa.JSON(), nullable=False, server_default='[]'))
    op.add_column('organisations', sa.Column('cert_validity_days', sa.Integer(), nullable=False, server_default='365'))
    op.add_column('organisations', sa.Column('keep_device_keys', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('organisations') as batch_op:
        batch_op.drop_column('keep_device_keys')
        batch_op.drop_column('cert_validity_days')
    with op.batch_alter_table('memberships') as batch_op:
        batch_op.drop_column('grants')
    op.drop_table('psk_identities')
    op.drop_table('device_certificates')
    op.drop_table('certificate_authorities')
    op.drop_table('trusted_certificates')
