"""A deterministic demo corpus: sample owners, videos, scenes, persons and photos, and its loader."""

from heimdex_assets.demo.corpus import (
    BASE_TIME,
    DEMO_NAMESPACE,
    DISTINCTIVE_WORDS,
    Corpus,
    DemoOwner,
    DemoPerson,
    DemoPhoto,
    DemoScene,
    DemoVideo,
    build_corpus,
    demo_id,
    load_corpus,
)

__all__ = [
    "BASE_TIME",
    "DEMO_NAMESPACE",
    "DISTINCTIVE_WORDS",
    "Corpus",
    "DemoOwner",
    "DemoPerson",
    "DemoPhoto",
    "DemoScene",
    "DemoVideo",
    "build_corpus",
    "demo_id",
    "load_corpus",
]
