"""How long the SQL freshness answer takes for a large corpus (default 100k videos x 10 scenes).

Builds the corpus with set-based SQL in a database of its own (vectors of 8 dimensions: the query
never reads them, and the row layout is otherwise the real one), marks a few partitions stale, and
times ``partition_states`` for the text and CLIP assets. Prints a table and JSON.

    .venv/bin/python bench/freshness.py [--videos 100000] [--scenes 10]
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

from sqlalchemy import text

from heimdex_assets.db.embedded import EmbeddedPostgres
from heimdex_assets.freshness import partition_states, summarize
from heimdex_assets.resources import AppDatabase
from heimdex_assets.spec import SPEC

BUILD = """
TRUNCATE owners, videos, scenes, scene_text_vectors, scene_clip_vectors, embedding_failures CASCADE;
INSERT INTO owners (id, name) SELECT md5('o' || o)::uuid, 'owner ' || o FROM generate_series(1, :owners) o;
INSERT INTO videos (id, owner_id, status, created_at)
    SELECT md5('v' || v)::uuid, md5('o' || (v % :owners + 1))::uuid, 'READY', now() - v * interval '1 second'
    FROM generate_series(1, :videos) v;
INSERT INTO scenes (id, video_id, owner_id, scene_index, start_s, end_s, transcript, visual_description, tags,
                    thumbnail_uri, thumbnail_sha256)
    SELECT md5('s' || v || '/' || i)::uuid, md5('v' || v)::uuid, md5('o' || (v % :owners + 1))::uuid, i, i * 10,
           i * 10 + 9, 'transcript of scene ' || i || ' of video ' || v, 'a view ' || i, ARRAY['tag' || i],
           '/thumbs/' || v || '/' || i || '.png', md5('t' || v || '/' || i)
    FROM generate_series(1, :videos) v, generate_series(0, :scenes - 1) i;
INSERT INTO scene_text_vectors (scene_id, channel, step_version, video_id, owner_id, model_id, input_sha256,
                                dimension, embedding)
    SELECT s.id, c.channel, :text_version, s.video_id, s.owner_id, :text_model,
           CASE c.channel WHEN 'transcript' THEN s.transcript_sha256 ELSE s.visual_sha256 END, 8,
           '[1,0,0,0,0,0,0,0]'::vector
    FROM scenes s CROSS JOIN (VALUES ('transcript'), ('visual')) c(channel);
INSERT INTO scene_clip_vectors (scene_id, step_version, video_id, owner_id, model_id, input_sha256, dimension,
                                embedding)
    SELECT s.id, :clip_version, s.video_id, s.owner_id, :clip_model, s.thumbnail_sha256, 8,
           '[0,1,0,0,0,0,0,0]'::vector
    FROM scenes s;
-- 100 edited transcripts: their videos are stale for text only.
UPDATE scenes SET transcript = transcript || ' (edited)' WHERE scene_index = 0 AND video_id IN (
    SELECT id FROM videos ORDER BY id LIMIT 100);
ANALYZE;
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--scenes", type=int, default=10)
    parser.add_argument("--owners", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg-port", type=int, default=55445)
    args = parser.parse_args()

    server = EmbeddedPostgres(data_dir=Path("/tmp/heimdex-bench-freshness"), port=args.pg_port, database="fresh")
    started_here = not server.is_ready()
    db = AppDatabase(url=server.ensure_running())
    try:
        t0 = time.perf_counter()
        with db.transaction() as conn:
            for statement in BUILD.split(";\n"):
                if statement.strip():
                    conn.execute(
                        text(statement),
                        {
                            "owners": args.owners,
                            "videos": args.videos,
                            "scenes": args.scenes,
                            "text_version": SPEC.step("scene_text").version,
                            "clip_version": SPEC.step("scene_clip").version,
                            "text_model": "text-model",
                            "clip_model": "clip-model",
                        },
                    )
        build_s = time.perf_counter() - t0
        results = {}
        for asset, model in (("scene_text_embeddings", "text-model"), ("scene_clip_embeddings", "clip-model")):
            timings = []
            for _ in range(args.rounds):
                with db.engine.connect() as conn:
                    t = time.perf_counter()
                    states = partition_states(conn, asset, model)
                    timings.append(time.perf_counter() - t)
            results[asset] = {
                "seconds": [round(x, 3) for x in timings],
                "best_s": round(min(timings), 3),
                "partitions": summarize(states),
            }
    finally:
        if started_here:
            server.stop()
    report = {
        "videos": args.videos,
        "scenes": args.videos * args.scenes,
        "build_s": round(build_s, 1),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "assets": results,
    }
    print(f"{args.videos} videos x {args.scenes} scenes (built in {build_s:.1f} s), {report['machine']}")
    for asset, r in results.items():
        print(f"  {asset:<24} best {r['best_s']:>6.3f} s  rounds {r['seconds']}  {r['partitions']}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
