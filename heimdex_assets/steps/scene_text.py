"""``scene_text``: one item per scene and enabled channel whose text is not blank.

The text is templated here, in SQL, and embedded exactly as returned: transcript and summary
trimmed; visual = the trimmed description, then ``Tags: a, b`` on a line of its own.
"""

from heimdex_assets.db.tables import scene_text_vectors
from heimdex_assets.spec import SPEC
from heimdex_assets.steps.base import Step, sha256_sql, trim_sql

_TAGS = f"array_to_string(ARRAY(SELECT {trim_sql('t')} FROM unnest(s.tags) t WHERE {trim_sql('t')} IS NOT NULL), ', ')"
_VISUAL = f"concat_ws(E'\\n', {trim_sql('s.visual_description')}, 'Tags: ' || nullif({_TAGS}, ''))"

STEP = Step(
    spec=SPEC.step("scene_text"),
    partitioning="video",
    items_sql=f"""
        SELECT s.video_id AS partition_id, s.owner_id, s.id::text || ':' || c.channel AS item_id,
               {sha256_sql("c.text")} AS input_sha256, s.id AS scene_id, c.channel, c.text
        FROM scenes s JOIN videos v ON v.id = s.video_id AND v.status = 'READY'
        CROSS JOIN LATERAL (VALUES
            ('transcript', {trim_sql("s.transcript")}),
            ('visual', nullif({_VISUAL}, '')),
            ('summary', {trim_sql("s.summary")})
        ) AS c(channel, text)
        WHERE c.channel = ANY(:channels) AND c.text IS NOT NULL {{scope}}""",
    partition_column="s.video_id",
    owner_column="s.owner_id",
    table=scene_text_vectors,
    item_key="r.scene_id::text || ':' || r.channel",
    sources=("scenes", "videos"),
    cost_column="text",
    cached_by_identity=True,
)
