import numpy as np
import pytest
from PIL import Image

from heimdex_assets.demo import build_corpus
from heimdex_assets.resources.person_detector import (
    Detection,
    OpenCvPersonDetector,
    PersonDetector,
    crop,
    same_person,
)

# Where the face is in each demo photograph's 320x320 thumbnail (annotated by hand).
FACE_CENTRES = {"astronaut": (141, 72), "cameraman": (135, 85)}


@pytest.fixture(scope="module")
def detector() -> OpenCvPersonDetector:
    return OpenCvPersonDetector()


@pytest.fixture(scope="module")
def person_scenes(tmp_path_factory):
    corpus = build_corpus(
        tmp_path_factory.mktemp("media"),
        owners=1,
        videos_per_owner=1,
        scenes_per_video=10,
        processing_videos=0,
        real_photo_every=2,
    )
    return corpus.scenes


@pytest.fixture(scope="module")
def scenes_without_people(tmp_path_factory):
    """15 videos: one per topic, so every bundled photograph without people (coffee, cat, horse, rocket) is in."""
    corpus = build_corpus(
        tmp_path_factory.mktemp("media"),
        owners=1,
        videos_per_owner=15,
        scenes_per_video=2,
        processing_videos=0,
        real_photo_every=0,
    )
    return corpus.scenes


def inside(d: Detection, image: Image.Image) -> bool:
    return d.x >= 0 and d.y >= 0 and d.w > 0 and d.h > 0 and d.x + d.w <= image.width and d.y + d.h <= image.height


def test_the_opencv_detector_is_a_person_detector(detector):
    assert isinstance(detector, PersonDetector)
    assert detector.name.startswith("opencv-")


def test_finds_the_person_in_each_demo_photograph(detector, person_scenes):
    photographed = [s for s in person_scenes if s.shows_person]
    assert {s.shows_person for s in photographed} == {"astronaut", "cameraman"}
    for scene in photographed:
        image = Image.open(scene.thumbnail_uri)
        found = detector.detect(image)
        assert len(found) == 1, (scene.shows_person, found)
        best = found[0]
        assert inside(best, image)
        assert 0.5 < best.score < 1
        assert best.detector.startswith("opencv-")
        cx, cy = FACE_CENTRES[scene.shows_person]
        assert best.x <= cx <= best.x + best.w and best.y <= cy <= best.y + best.h
        # A head-and-shoulders box: the face with room around it, not the face alone.
        assert best.w >= 0.25 * image.width and best.h >= 0.25 * image.height


def test_finds_nobody_in_rendered_thumbnails_of_the_same_corpus(detector, person_scenes):
    rendered = [s for s in person_scenes if not s.shows_person]
    assert len(rendered) == 5
    assert {s.id: detector.detect(Image.open(s.thumbnail_uri)) for s in rendered} == {s.id: [] for s in rendered}


def test_finds_nobody_in_any_demo_picture_without_people(detector, scenes_without_people):
    found = {s.thumbnail_uri: detector.detect(Image.open(s.thumbnail_uri)) for s in scenes_without_people}
    photographs = [s for s in scenes_without_people if Image.open(s.thumbnail_uri).size != (320, 180)]
    assert len(photographs) == 4  # coffee, cat, horse, rocket; the rest are rendered title cards
    assert {uri: d for uri, d in found.items() if d} == {}


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (320, 180), (128, 128, 128)),
        Image.fromarray(np.tile(np.linspace(0, 255, 320).astype(np.uint8), (180, 1))),
        Image.new("RGB", (1, 1)),
        Image.new("RGB", (640, 5)),  # smaller than the HOG window, which crashes OpenCV unguarded
        Image.new("L", (1600, 2400), 200),
    ],
    ids=["blank", "gradient", "one-pixel", "sliver", "large-grey"],
)
def test_finds_nobody_in_plain_images(detector, image):
    assert detector.detect(image) == []


def two_people(scenes) -> Image.Image:
    """The astronaut's and the cameraman's thumbnails side by side, each at 640x640."""
    pictures = [next(s for s in scenes if s.shows_person == p) for p in ("astronaut", "cameraman")]
    both = Image.new("RGB", (1280, 640))
    for i, scene in enumerate(pictures):
        both.paste(
            Image.open(scene.thumbnail_uri).convert("RGB").resize((640, 640), Image.Resampling.LANCZOS), (640 * i, 0)
        )
    return both


def test_two_people_are_two_detections_best_first(detector, person_scenes):
    image = two_people(person_scenes)
    found = detector.detect(image)
    assert len(found) == 2
    assert found[0].score > found[1].score  # the frontal face gathers more evidence than the profile
    for d, (cx, cy), left in zip(found, (FACE_CENTRES["astronaut"], FACE_CENTRES["cameraman"]), (0, 640), strict=True):
        assert inside(d, image)
        assert d.x <= left + 2 * cx <= d.x + d.w and d.y <= 2 * cy <= d.y + d.h


def test_detection_is_deterministic_and_boxes_follow_the_image_size(detector, person_scenes):
    scene = next(s for s in person_scenes if s.shows_person == "astronaut")
    image = Image.open(scene.thumbnail_uri).convert("RGB")
    first = detector.detect(image)
    assert detector.detect(image) == first
    bigger = image.resize((800, 800), Image.Resampling.LANCZOS)  # detected at its own size, not rescaled
    (large,) = detector.detect(bigger)
    (small,) = first
    scale = 800 / 320
    for a, b in ((large.x, small.x), (large.y, small.y), (large.w, small.w), (large.h, small.h)):
        assert abs(a - b * scale) <= 0.1 * 800


def test_crops_are_the_boxes_and_embed_to_unit_vectors(detector, person_scenes, clip):
    crops = []
    for scene in (s for s in person_scenes if s.shows_person):
        image = Image.open(scene.thumbnail_uri).convert("RGB")
        for d in detector.detect(image):
            piece = crop(image, d)
            assert piece.size == (d.w, d.h)
            assert piece.tobytes() == image.crop((d.x, d.y, d.x + d.w, d.y + d.h)).tobytes()
            crops.append(piece)
    vectors = clip.embed_images(crops)
    assert vectors.shape == (len(crops), clip.dimension) and len(crops) == 5
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def box(x: int, y: int, w: int, h: int) -> Detection:
    return Detection(x, y, w, h, 0.5, "test")


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (box(0, 0, 100, 100), box(10, 10, 100, 100), True),  # heavy overlap
        (box(0, 0, 100, 100), box(20, 20, 40, 40), True),  # a face box inside a head-and-shoulders box
        (box(0, 0, 100, 100), box(60, 0, 100, 100), False),  # neighbours, shoulders touching
        (box(0, 0, 100, 100), box(100, 0, 100, 100), False),  # side by side
        (box(0, 0, 100, 100), box(10, 10, 90, 90), True),  # nearly the same box
    ],
)
def test_same_person_merges_overlapping_and_nested_boxes_only(a, b, same):
    assert same_person(a, b, 0.3) is same
    assert same_person(b, a, 0.3) is same
