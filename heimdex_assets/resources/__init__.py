"""Dagster resources: one per external system, each with a small domain-shaped interface."""

from heimdex_assets.resources.app_database import AppDatabase
from heimdex_assets.resources.blob_store import BlobStore
from heimdex_assets.resources.clip_embedder import ClipEmbedder
from heimdex_assets.resources.person_detector import OpenCvPersonDetector, PersonDetector
from heimdex_assets.resources.search_index import SearchIndex
from heimdex_assets.resources.text_embedder import TextEmbedder

__all__ = [
    "AppDatabase",
    "BlobStore",
    "ClipEmbedder",
    "OpenCvPersonDetector",
    "PersonDetector",
    "SearchIndex",
    "TextEmbedder",
]
