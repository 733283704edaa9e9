"""Generations: which (step version, model) each step serves from, with who, when and why.

Revision ID: 0005_generations
Revises: 0004_ledger_and_stamps
Create Date: 2026-11-29
"""

from alembic import op

revision = "0005_generations"
down_revision = "0004_ledger_and_stamps"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE generations (
    step text NOT NULL,
    step_version text NOT NULL,
    model_id text NOT NULL,
    state text NOT NULL CHECK (state IN ('active', 'previous', 'retired')),
    activated_at timestamptz NOT NULL DEFAULT now(),
    activated_by text NOT NULL,
    reason text NOT NULL,
    coverage jsonb NOT NULL DEFAULT '{}',
    retired_at timestamptz,  -- when it stopped being active or previous: pruning's grace counts from here
    PRIMARY KEY (step, step_version, model_id)
);
-- At most one active and one previous generation per step: a flip is one transaction.
CREATE UNIQUE INDEX generations_one_active ON generations (step) WHERE state = 'active';
CREATE UNIQUE INDEX generations_one_previous ON generations (step) WHERE state = 'previous';

CREATE TABLE generation_events (
    id bigserial PRIMARY KEY,
    step text NOT NULL,
    step_version text NOT NULL,
    model_id text NOT NULL,
    action text NOT NULL,
    actor text NOT NULL,
    reason text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}',
    at timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE = "DROP TABLE IF EXISTS generation_events, generations;"


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
