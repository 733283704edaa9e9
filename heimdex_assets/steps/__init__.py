"""The steps, each declared once (items, input identity, rows), in the order of the asset graph."""

from heimdex_assets.steps.base import Item, Step
from heimdex_assets.steps.person_photo import STEP as PERSON_PHOTO
from heimdex_assets.steps.person_query import STEP as PERSON_QUERY
from heimdex_assets.steps.scene_clip import STEP as SCENE_CLIP
from heimdex_assets.steps.scene_person import STEP as SCENE_PERSON
from heimdex_assets.steps.scene_search import STEP as SCENE_SEARCH
from heimdex_assets.steps.scene_text import STEP as SCENE_TEXT

# Upstream before downstream: a plan runs them in this order.
STEPS: tuple[Step, ...] = (SCENE_TEXT, SCENE_CLIP, SCENE_PERSON, SCENE_SEARCH, PERSON_PHOTO, PERSON_QUERY)
_BY_NAME = {s.name: s for s in STEPS}
_BY_ASSET = {s.asset_key: s for s in STEPS}


def step(name: str) -> Step:
    """The step called ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown step {name!r}; known: {', '.join(_BY_NAME)}") from None


def step_for_asset(asset_key: str) -> Step:
    """The step whose output is the asset ``asset_key``."""
    try:
        return _BY_ASSET[asset_key]
    except KeyError:
        raise KeyError(f"no step produces asset {asset_key!r}") from None


def downstream(name: str) -> list[Step]:
    """Steps that read ``name``'s rows, directly or not, in graph order."""
    found: set[str] = {name}
    for s in STEPS:
        if any(u in found for u in s.upstream):
            found.add(s.name)
    return [s for s in STEPS if s.name in found and s.name != name]


__all__ = [
    "PERSON_PHOTO",
    "PERSON_QUERY",
    "SCENE_CLIP",
    "SCENE_PERSON",
    "SCENE_SEARCH",
    "SCENE_TEXT",
    "STEPS",
    "Item",
    "Step",
    "downstream",
    "step",
    "step_for_asset",
]
