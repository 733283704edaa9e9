"""Shared fixtures: a real PostgreSQL (with pgvector), clean per test, and factories of source rows.

The server is the product's own embedded one (``heimdex_assets.db.embedded``), started by the
test session on 127.0.0.1 as a non-root user, unless ``HEIMDEX_TEST_DATABASE_URL`` names one.
"""

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from opensearchpy import OpenSearch
from PIL import Image, ImageDraw
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of a 45 s lookup

from heimdex_assets.db.embedded import EmbeddedPostgres
from heimdex_assets.db.tables import owners, scenes, videos
from heimdex_assets.resources import (
    AppDatabase,
    BlobStore,
    ClipEmbedder,
    OpenCvPersonDetector,
    SearchIndex,
    TextEmbedder,
)
from heimdex_assets_tests.fake_openai import FakeOpenAI

# The real node started by scripts/test.sh (scripts/opensearch.sh); unreachable means failing tests.
OPENSEARCH_URL = os.environ.get("HEIMDEX_TEST_OPENSEARCH_URL") or "http://127.0.0.1:9250"
TEST_PG_PORT = int(os.environ.get("HEIMDEX_TEST_PG_PORT", "55432"))
STATE_DIR = Path(os.environ.get("HEIMDEX_TEST_STATE_DIR", Path(tempfile.gettempdir()) / "heimdex-test"))
ALL_TABLES = (
    "partition_ledger, input_stamps, step_models, generations, generation_events, "
    "owners, videos, scenes, persons, person_reference_photos, scene_text_vectors, scene_clip_vectors, "
    "text_embedding_cache, embedding_failures, scene_person_vectors, scene_person_scans, person_photo_vectors, "
    "person_query_vectors, scene_search_documents, reprocess_plans"
)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("HEIMDEX_TEST_DATABASE_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres(data_dir=STATE_DIR / "postgres", port=TEST_PG_PORT, database="heimdex_test")
    was_running = server.is_ready()
    yield server.ensure_running()
    if not was_running:  # leave the machine as we found it
        server.stop()


@pytest.fixture
def db(database_url: str) -> AppDatabase:
    """The application database, emptied before the test."""
    resource = AppDatabase(url=database_url)
    with resource.transaction() as conn:
        conn.execute(text(f"TRUNCATE {ALL_TABLES} CASCADE"))
    return resource


@pytest.fixture(params=["opensearch", "sqlite"])
def search_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SearchIndex]:
    """A search index of each backend: OpenSearch under a prefix of its own, or SQLite in tmp_path."""
    if request.param == "sqlite":
        yield SearchIndex(sqlite_path=str(tmp_path / "search" / "scenes.sqlite"), bulk_backoff_s=0.2)
        return
    prefix = f"heimdex-test-{uuid.uuid4().hex[:12]}"
    yield SearchIndex(opensearch_url=OPENSEARCH_URL, index_prefix=prefix, bulk_backoff_s=0.2)
    OpenSearch(hosts=[OPENSEARCH_URL]).indices.delete(index=f"{prefix}-*")  # the alias goes with them


@pytest.fixture(scope="session")
def tiny_clip_checkpoint() -> Path:
    """A tiny open_clip model with random weights, saved as a checkpoint file."""
    import open_clip
    import torch

    from heimdex_assets.resources.clip_embedder import CONFIG_DIR, TINY_MODEL

    path = STATE_DIR / "tiny-clip.pt"
    if not path.exists():
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        open_clip.add_model_config(CONFIG_DIR)
        torch.manual_seed(1234)
        model = open_clip.create_model(TINY_MODEL)
        torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def clip(tiny_clip_checkpoint: Path) -> ClipEmbedder:
    """CLIP loaded through the product's checkpoint path; no fallback allowed."""
    from heimdex_assets.resources.clip_embedder import TINY_MODEL

    return ClipEmbedder(model_name=TINY_MODEL, checkpoint_path=str(tiny_clip_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def text_embedder() -> TextEmbedder:
    return TextEmbedder(provider="local")


@pytest.fixture
def resources(db: AppDatabase, clip: ClipEmbedder, text_embedder: TextEmbedder, tmp_path: Path) -> dict:
    return {
        "db": db,
        "clip": clip,
        "text_embedder": text_embedder,
        "blobs": BlobStore(allowed_roots=[str(tmp_path)]),
        "person_detector": OpenCvPersonDetector(),
    }


@pytest.fixture
def person_detector() -> OpenCvPersonDetector:
    return OpenCvPersonDetector()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


def render_thumbnail(path: Path, seed: int) -> str:
    """A rendered PNG thumbnail (distinct per seed); returns its sha256."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (96, 64), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, 80, 2))
        draw.rectangle([x, y % 60, x + 15, (y % 60) + 10], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class SourceRows:
    """Writes owners, videos and scenes the way the product would."""

    def __init__(self, db: AppDatabase, media: Path) -> None:
        self.db = db
        self.media = media
        self._n = 0

    def owner(self, name: str = "owner") -> uuid.UUID:
        owner_id = uuid.uuid4()
        with self.db.transaction() as conn:
            conn.execute(insert(owners).values(id=owner_id, name=name))
        return owner_id

    def video(
        self,
        owner_id: uuid.UUID,
        n_scenes: int = 3,
        status: str = "READY",
        created_at: datetime | None = None,
    ) -> uuid.UUID:
        video_id = uuid.uuid4()
        self._n += 1
        created = created_at or datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=self._n)
        with self.db.transaction() as conn:
            conn.execute(
                insert(videos).values(
                    id=video_id,
                    owner_id=owner_id,
                    title=f"video {self._n}",
                    status=status,
                    created_at=created,
                    updated_at=created,
                )
            )
        for i in range(n_scenes):
            self.scene(video_id, owner_id, i)
        return video_id

    def scene(self, video_id: uuid.UUID, owner_id: uuid.UUID, index: int, **fields: object) -> uuid.UUID:
        scene_id = uuid.uuid4()
        self._n += 1
        thumb = self.media / f"{scene_id}.png"
        sha = render_thumbnail(thumb, self._n)
        values = {
            "id": scene_id,
            "video_id": video_id,
            "owner_id": owner_id,
            "scene_index": index,
            "start_s": index * 10.0,
            "end_s": index * 10.0 + 9.5,
            "transcript": f"In scene {index} the narrator explains how the tide turns at harbour {self._n}.",
            "visual_description": f"A wide shot of boats number {self._n} at dawn.",
            "tags": ["boats", "harbour", f"t{self._n}"],
            "summary": None,
            "thumbnail_uri": str(thumb),
            "thumbnail_sha256": sha,
        } | fields
        with self.db.transaction() as conn:
            conn.execute(insert(scenes).values(**values))
        return scene_id


@pytest.fixture
def rows(db: AppDatabase, tmp_path: Path) -> SourceRows:
    return SourceRows(db, tmp_path / "media")


def materialize_videos(
    assets: list,
    keys: list[str],
    resources: dict,
    instance: dg.DagsterInstance,
    tags: dict | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """Materialise ``assets`` for ``keys`` in ONE run (a partition range when several keys)."""
    known = set(instance.get_dynamic_partitions("videos"))
    new = [k for k in keys if k not in known]
    if new:
        instance.add_dynamic_partitions("videos", new)
    run_tags = dict(tags or {})
    if len(keys) == 1:
        return dg.materialize(
            assets,
            partition_key=keys[0],
            resources=resources,
            instance=instance,
            tags=run_tags,
            raise_on_error=raise_on_error,
        )
    run_tags |= {
        "dagster/asset_partition_range_start": keys[0],
        "dagster/asset_partition_range_end": keys[-1],
    }
    return dg.materialize(assets, resources=resources, instance=instance, tags=run_tags, raise_on_error=raise_on_error)


def tick_sensor(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, resources: dict) -> dg.SensorResult:
    """Evaluate a discovery sensor once and apply its partition requests, as the daemon would."""
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = sensor(context)
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """The local stand-in for the paid OpenAI API (the only one in the suite), reached through the real client."""
    server = FakeOpenAI().start()
    yield server
    server.stop()
