"""The evaluation gate's figures, kept with each generation they were measured on.

Revision ID: 0006_generation_evaluation
Revises: 0005_generations
Create Date: 2026-11-29
"""

from alembic import op

revision = "0006_generation_evaluation"
down_revision = "0005_generations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # What the gate measured when the generation was last made active (candidate and active MRR@10,
    # queries, margin): shown by status and the admin API, and the baseline when the active model
    # cannot be run by the process that evaluates the next candidate.
    op.execute("ALTER TABLE generations ADD COLUMN evaluation jsonb")


def downgrade() -> None:
    op.execute("ALTER TABLE generations DROP COLUMN IF EXISTS evaluation")
