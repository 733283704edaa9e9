"""Resources configured from environment variables, with safe defaults (listed in the README)."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from heimdex_assets.demo.run import media_dir
from heimdex_assets.resources import (
    AppDatabase,
    BlobStore,
    ClipEmbedder,
    OpenCvPersonDetector,
    SearchIndex,
    TextEmbedder,
)
from heimdex_assets.resources.clip_embedder import TINY_RANDOM_MODEL, TINY_RANDOM_MODEL_ID


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _secret(name: str, deferred: bool) -> Any:
    """Deferred (for Definitions): a dg.EnvVar, so the value never lands in run config or the UI.
    Otherwise (CLI, API) the value itself, for code that uses the resource outside Dagster; in-process
    runs get the EnvVar back through ``deferred_secrets``."""
    if not _env(name):
        return None
    return dg.EnvVar(name) if deferred else _env(name)


# Per resource class, its fields that hold secrets and the variables they are read from.
SECRET_FIELDS: dict[type[dg.ConfigurableResource], dict[str, str]] = {
    AppDatabase: {"url": "HEIMDEX_DATABASE_URL"},
    TextEmbedder: {"openai_api_key": "OPENAI_API_KEY"},
    SearchIndex: {"opensearch_url": "HEIMDEX_OPENSEARCH_URL"},
}


def deferred_secrets(resources: dict[str, Any]) -> dict[str, Any]:
    """``resources`` for an in-process ``dg.materialize``: each secret read from the environment becomes
    its ``dg.EnvVar`` again. Dagster writes a resource's plain values into the run's job snapshot (in the
    instance's storage under ``DAGSTER_HOME``), an EnvVar only as its name, and resolves it in the run.
    A value that is not the environment's (set in code) is left as it is."""
    deferred = dict(resources)
    for key, resource in resources.items():
        fields = SECRET_FIELDS.get(type(resource), {})
        swap = {f: dg.EnvVar(var) for f, var in fields.items() if _is_env_value(getattr(resource, f), var)}
        if swap:
            values = {name: getattr(resource, name) for name in type(resource).model_fields}
            deferred[key] = type(resource)(**(values | swap))
    return deferred


def _is_env_value(value: Any, name: str) -> bool:
    return isinstance(value, str) and not isinstance(value, dg.EnvVar) and value == _env(name)


def database_from_env(deferred: bool = True) -> AppDatabase:
    """``HEIMDEX_DATABASE_URL``, or the embedded PostgreSQL when it is unset."""
    return AppDatabase(url=_secret("HEIMDEX_DATABASE_URL", deferred))


def text_embedder_from_env(deferred: bool = True) -> TextEmbedder:
    """``HEIMDEX_TEXT_PROVIDER`` (auto|openai|local), ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``."""
    return TextEmbedder(
        provider=_env("HEIMDEX_TEXT_PROVIDER") or "auto",
        openai_api_key=_secret("OPENAI_API_KEY", deferred),
        openai_base_url=_env("OPENAI_BASE_URL"),
        openai_model=_env("HEIMDEX_OPENAI_MODEL") or "text-embedding-3-small",
    )


def clip_from_env() -> ClipEmbedder:
    """``HEIMDEX_CLIP_MODEL``/``_PRETRAINED``/``_CHECKPOINT``/``_DEVICE``. ``HEIMDEX_CLIP_MODEL=tiny-random``
    asks for placeholder weights; there is no fallback to them (a leftover ``HEIMDEX_CLIP_FALLBACK`` is ignored).
    ``HEIMDEX_CLIP_URL``: embed on that ``heimdex clip-server`` instead, with ``HEIMDEX_CLIP_SERVER_TOKEN``."""
    return ClipEmbedder(
        model_name=_env("HEIMDEX_CLIP_MODEL") or "ViT-B-32",
        pretrained=_env("HEIMDEX_CLIP_PRETRAINED") or "openai",
        checkpoint_path=_env("HEIMDEX_CLIP_CHECKPOINT"),
        device=_env("HEIMDEX_CLIP_DEVICE") or "auto",
        remote_url=_env("HEIMDEX_CLIP_URL"),
        # Always the variable, never its value: Dagster keeps an EnvVar's name in run config and snapshots,
        # and the embedder reads the value when it calls the server.
        remote_token=dg.EnvVar("HEIMDEX_CLIP_SERVER_TOKEN") if _env("HEIMDEX_CLIP_SERVER_TOKEN") else None,
    )


CLIP_SETTINGS = ("HEIMDEX_CLIP_MODEL", "HEIMDEX_CLIP_PRETRAINED", "HEIMDEX_CLIP_CHECKPOINT", "HEIMDEX_CLIP_URL")


def follow_recorded_placeholder(resources: dict[str, dg.ConfigurableResource]) -> dict[str, dg.ConfigurableResource]:
    """When this process leaves CLIP unconfigured and the database's deployment recorded the placeholder
    weights (``heimdex demo`` asked for them), use them too, so the CLI agrees with the demo it follows.
    Configured CLIP settings always win; Dagster workers read only their configuration."""
    if any(_env(name) for name in CLIP_SETTINGS):
        return resources
    from sqlalchemy import select

    from heimdex_assets.db.tables import step_models

    with resources["db"].engine.connect() as conn:
        recorded = conn.execute(select(step_models.c.model_id).where(step_models.c.step == "scene_clip")).scalar()
    if recorded == TINY_RANDOM_MODEL_ID:
        resources = resources | {"clip": ClipEmbedder(model_name=TINY_RANDOM_MODEL, device=resources["clip"].device)}
    return resources


def blob_store_from_env() -> BlobStore:
    """``HEIMDEX_BLOB_ROOTS`` (directories, separated by ``os.pathsep``; unset: the demo's media folder)
    and ``HEIMDEX_BLOB_HOSTS`` (``host`` or ``host:port``, comma-separated; unset: no HTTP at all)."""
    roots = _env("HEIMDEX_BLOB_ROOTS")
    hosts = _env("HEIMDEX_BLOB_HOSTS") or ""
    return BlobStore(
        allowed_roots=[r.strip() for r in roots.split(os.pathsep) if r.strip()] if roots else [str(media_dir())],
        allowed_hosts=[h.strip() for h in hosts.split(",") if h.strip()],
    )


def search_index_from_env(deferred: bool = True) -> SearchIndex:
    """``HEIMDEX_OPENSEARCH_URL`` (may hold credentials; unset: embedded SQLite FTS5),
    ``HEIMDEX_SEARCH_INDEX_PREFIX``, ``HEIMDEX_SEARCH_SQLITE_PATH``."""
    return SearchIndex(
        opensearch_url=_secret("HEIMDEX_OPENSEARCH_URL", deferred),
        index_prefix=_env("HEIMDEX_SEARCH_INDEX_PREFIX") or "heimdex-scenes",
        sqlite_path=_env("HEIMDEX_SEARCH_SQLITE_PATH"),
    )


def resources_from_env(deferred: bool = True) -> dict[str, dg.ConfigurableResource]:
    """Every resource the assets and sensors name, keyed by parameter name. ``deferred=False`` for
    use outside a Dagster code location (the CLI, the API), where secrets are read right away."""
    return {
        "db": database_from_env(deferred),
        "text_embedder": text_embedder_from_env(deferred),
        "clip": clip_from_env(),
        "blobs": blob_store_from_env(),
        "search_index": search_index_from_env(deferred),
        "person_detector": OpenCvPersonDetector(),
    }
