"""Plans of automatic reprocessing, with the spend guard's decision: launched, or waiting for approval.

Revision ID: 0007_reprocess_plans
Revises: 0006_generation_evaluation
Create Date: 2026-12-04
"""

from alembic import op

revision = "0007_reprocess_plans"
down_revision = "0006_generation_evaluation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per plan an automatic launcher (the stale sensor) made: what it would redo (asset ->
    # partition keys), its OpenAI estimate, and what became of it. Launched plans within the last day
    # are the day's automatic spend; a plan above the ceiling waits until an operator approves it.
    op.execute(
        """CREATE TABLE reprocess_plans (
               id uuid PRIMARY KEY,
               created_at timestamptz NOT NULL DEFAULT now(),
               created_by text NOT NULL,
               status text NOT NULL CHECK (status IN ('waiting', 'launched', 'superseded')),
               fingerprint text NOT NULL,
               assets jsonb NOT NULL,
               partitions integer NOT NULL,
               estimated_tokens bigint NOT NULL,
               estimated_usd double precision NOT NULL,
               reason text,
               approved_by text,
               approved_at timestamptz,
               launched_at timestamptz,
               backfill_ids jsonb
           )"""
    )
    op.execute("CREATE INDEX reprocess_plans_status ON reprocess_plans (status, created_at)")
    # At most one plan waits at a time: a newer stale set supersedes the older waiting plan.
    op.execute("CREATE UNIQUE INDEX reprocess_plans_one_waiting ON reprocess_plans ((true)) WHERE status = 'waiting'")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS reprocess_plans")
