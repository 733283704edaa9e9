"""The embedding spec: what "latest embedding methods" means, as data.

Every asset takes its Dagster ``code_version`` from its step here, and every stored vector row
carries the step version it was made under. Bump a step's ``version`` (a date) when, and only
when, that step's output would change: model, preprocessing, normalisation or text template.
Bumping one step leaves every other step's partitions fresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TextChannel:
    """One text embedding channel of a scene (a vector per scene per enabled channel)."""

    name: str
    enabled: bool
    description: str


@dataclass(frozen=True)
class EmbeddingStep:
    """One derived output: the asset that makes it, its version, and the model it expects."""

    name: str
    asset_key: str
    version: str
    model_id: str
    dimension: int
    enabled: bool
    description: str
    channels: tuple[TextChannel, ...] = field(default=())

    @property
    def enabled_channels(self) -> tuple[str, ...]:
        """Names of the channels embedded under this step (text step only)."""
        return tuple(c.name for c in self.channels if c.enabled)


@dataclass(frozen=True)
class EmbeddingSpec:
    """The table of steps; the spec's version is its newest step version."""

    steps: tuple[EmbeddingStep, ...]

    def step(self, name: str) -> EmbeddingStep:
        """The step called ``name``; a clear KeyError names the known steps otherwise."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"unknown embedding step {name!r}; known: {', '.join(s.name for s in self.steps)}")

    def step_for_asset(self, asset_key: str) -> EmbeddingStep:
        """The step whose output is the asset ``asset_key``."""
        for s in self.steps:
            if s.asset_key == asset_key:
                return s
        raise KeyError(f"no embedding step produces asset {asset_key!r}")

    @property
    def version(self) -> str:
        """The newest step version (ISO dates sort as strings)."""
        return max(s.version for s in self.steps)


SPEC = EmbeddingSpec(
    steps=(
        EmbeddingStep(
            name="scene_text",
            asset_key="scene_text_embeddings",
            version="2026-01-06",
            model_id="text-embedding-3-small",
            dimension=1536,
            enabled=True,
            description="Scene text vectors: ASR transcript; visual description + tags; optional summary.",
            channels=(
                TextChannel("transcript", True, "Pure ASR transcript"),
                TextChannel("visual", True, "Visual description + tags"),
                TextChannel("summary", False, "Optional scene summary (disabled)"),
            ),
        ),
        EmbeddingStep(
            name="scene_clip",
            asset_key="scene_clip_embeddings",
            version="2026-01-06",
            model_id="open_clip:ViT-B-32/openai",
            dimension=512,
            enabled=True,
            description="CLIP image vector of each scene thumbnail, L2-normalised.",
        ),
        EmbeddingStep(
            name="scene_person",
            asset_key="scene_person_embeddings",
            version="2026-01-06",
            model_id="open_clip:ViT-B-32/openai",
            dimension=512,
            enabled=True,
            description="CLIP vector of each person detected in a scene thumbnail, with box and score.",
        ),
        EmbeddingStep(
            name="person_photo",
            asset_key="person_photo_embeddings",
            version="2026-01-06",
            model_id="open_clip:ViT-B-32/openai",
            dimension=512,
            enabled=True,
            description="CLIP vector of each person reference photo; photo READY or FAILED with a reason.",
        ),
        EmbeddingStep(
            name="person_query",
            asset_key="person_query_embeddings",
            version="2026-01-06",
            model_id="open_clip:ViT-B-32/openai",
            dimension=512,
            enabled=True,
            description="Per person: L2-normalised mean of its READY reference photo vectors.",
        ),
        EmbeddingStep(
            name="scene_search",
            asset_key="scene_search_index",
            version="2026-01-06",
            model_id="bm25",
            dimension=0,
            enabled=True,
            description="One BM25 search document per scene.",
        ),
    )
)

LATEST_EMBEDDING_SPEC_VERSION: str = SPEC.version
