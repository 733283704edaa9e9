"""Dagster resources: one per external system, each with a small domain-shaped interface."""

from heimdex_assets.resources.app_database import AppDatabase
from heimdex_assets.resources.blob_store import BlobStore
from heimdex_assets.resources.clip_embedder import ClipEmbedder
from heimdex_assets.resources.text_embedder import TextEmbedder

__all__ = ["AppDatabase", "BlobStore", "ClipEmbedder", "TextEmbedder"]
