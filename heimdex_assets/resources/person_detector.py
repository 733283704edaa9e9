"""Finds people in scene thumbnails: a small detector interface and its OpenCV implementation.

An asset only sees ``detect(image) -> list[Detection]`` and ``crop``, so a stronger detector (a
neural face or person model) can replace the OpenCV one behind the same interface.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import dagster as dg
import numpy as np
from PIL import Image
from pydantic import Field

FRONTAL_FACE = "opencv-haar/frontalface_alt2"
PROFILE_FACE = "opencv-haar/profileface"
HOG_PERSON = "opencv-hog/people"

# Head-and-shoulders box around a face box, in face widths/heights: hair above, shoulders below.
_HEAD_SIDE, _HEAD_ABOVE, _HEAD_BELOW = 0.6, 0.35, 1.0


@dataclass(frozen=True)
class Detection:
    """A person found in an image: box in the image's pixels, confidence in [0, 1), which detector."""

    x: int
    y: int
    w: int
    h: int
    score: float
    detector: str


@runtime_checkable
class PersonDetector(Protocol):
    """What an asset needs from a person detector."""

    @property
    def name(self) -> str:
        """The detector and its version, for metadata."""
        ...

    def detect(self, image: Image.Image) -> list[Detection]:
        """The people in ``image``, best first, in a stable order."""
        ...


def crop(image: Image.Image, detection: Detection) -> Image.Image:
    """The part of ``image`` inside ``detection``'s box."""
    return image.crop((detection.x, detection.y, detection.x + detection.w, detection.y + detection.h))


def neighbours_score(neighbours: int) -> float:
    """Cascade confidence from the number of raw windows grouped into a detection: n / (n + 5).

    Haar levelWeights are not comparable between cascades; agreeing windows are, and a real face
    gathers many (the demo astronaut 38, the cameraman's profile 8) where texture that merely resembles
    one gathers a few (at most 3 in the demo corpus's pictures without people).
    """
    return round(neighbours / (neighbours + 5.0), 4)


def hog_score(margin: float) -> float:
    """HOG confidence from the SVM margin: m / (m + 2), so 0.5 at the default threshold of 2."""
    return round(max(margin, 0.0) / (max(margin, 0.0) + 2.0), 4)


def same_person(a: Detection, b: Detection, iou: float) -> bool:
    """Boxes that overlap (IoU >= ``iou``), or a small box mostly inside one at least twice its size
    (a second face box inside a head-and-shoulders box, a head inside a body)."""
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    if inter == 0:
        return False
    small, large = sorted((a.w * a.h, b.w * b.h))
    return inter / (small + large - inter) >= iou or (inter >= 0.8 * small and 2 * small <= large)


def _to_box(x: float, y: float, w: float, h: float, score: float, detector: str, width: int, height: int) -> Detection:
    """A detection in whole pixels, clipped to the image; a face grows to a head-and-shoulders box first."""
    x0, y0, x1, y1 = x, y, x + w, y + h
    if detector != HOG_PERSON:
        x0, x1 = x0 - _HEAD_SIDE * w, x1 + _HEAD_SIDE * w
        y0, y1 = y0 - _HEAD_ABOVE * h, y1 + _HEAD_BELOW * h
    left, top = max(0, round(x0)), max(0, round(y0))
    right, bottom = min(width, round(x1)), min(height, round(y1))
    return Detection(left, top, right - left, bottom - top, score, detector)


# Cascade classifiers are not safe to share between threads: each thread loads its own (once).
_THREAD_MODELS = threading.local()


def _models() -> tuple[cv2.CascadeClassifier, cv2.CascadeClassifier, cv2.HOGDescriptor]:
    """This thread's frontal and profile face cascades and HOG people detector."""
    if not hasattr(_THREAD_MODELS, "models"):
        frontal = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml")
        profile = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_profileface.xml")
        if frontal.empty() or profile.empty():
            raise RuntimeError(f"OpenCV face cascades missing from {cv2.data.haarcascades}")
        hog = cv2.HOGDescriptor()
        hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
        _THREAD_MODELS.models = (frontal, profile, hog)
    return _THREAD_MODELS.models


def _order(d: Detection) -> tuple:
    return (-d.score, d.y, d.x, d.w, d.h, d.detector)


class OpenCvPersonDetector(dg.ConfigurableResource):
    """People in an image from OpenCV's bundled models: Haar face cascades and the HOG people detector.

    Frontal faces (``frontalface_alt2``) and profiles (``profileface``, run on the image and its
    mirror, since the cascade knows one side only) become head-and-shoulders boxes; HOG gives
    whole-body boxes. Boxes of one person are merged, keeping the best score. Small images
    (thumbnails are ~320x180) are scaled up to ``min_detect_side`` on their long side first, large
    ones down to ``max_detect_side``; boxes are mapped back to the image's own pixels.

    The thresholds are tuned on the demo corpus: both people in its photographs are found, and
    nothing in its rendered title cards or its photographs without people. HOG margins reach ~1.75
    on flat rendered shapes, so HOG boxes need a margin of ``hog_threshold`` (2.0). Changing a
    setting changes the step's output: bump the ``scene_person`` step version with it.
    """

    min_detect_side: int = Field(default=640, description="Smaller images are scaled up to this long side.")
    max_detect_side: int = Field(default=1280, description="Larger images are scaled down to this long side.")
    scale_factor: float = Field(default=1.1, description="Cascade scale step between window sizes.")
    min_face_neighbours: int = Field(default=5, description="A face needs more agreeing cascade windows than this.")
    min_face_size: int = Field(default=64, description="Smallest face searched, in pixels of the scaled image.")
    use_profile: bool = Field(default=True, description="Also look for faces in profile, both ways.")
    use_hog: bool = Field(default=True, description="Also look for whole bodies with the HOG people detector.")
    hog_threshold: float = Field(default=2.0, description="Least HOG SVM margin of a kept body box.")
    nms_iou: float = Field(default=0.3, description="Boxes overlapping this much (IoU) are one person.")
    max_detections: int = Field(default=10, description="At most this many people per image, best first.")

    @property
    def name(self) -> str:
        """The detector family and version, for metadata (each Detection names the model that found it)."""
        return f"opencv-{cv2.__version__}"

    @property
    def identity(self) -> str:
        """The detector and every setting that changes its boxes: part of the model identity of the
        steps that crop people, so a changed setting makes their rows stale without a version bump."""
        settings = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return f"{self.name}#{hashlib.sha256(settings.encode()).hexdigest()[:12]}"

    def _scale(self, width: int, height: int) -> float:
        long_side = max(width, height)
        if long_side < self.min_detect_side:
            return self.min_detect_side / long_side
        if long_side > self.max_detect_side:
            return self.max_detect_side / long_side
        return 1.0

    def _faces(
        self, cascade: cv2.CascadeClassifier, gray: np.ndarray, detector: str, mirrored: bool
    ) -> list[tuple[float, float, float, float, float, str]]:
        image = cv2.flip(gray, 1) if mirrored else gray
        boxes, neighbours = cascade.detectMultiScale2(
            image,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_face_neighbours,
            minSize=(self.min_face_size, self.min_face_size),
        )
        found = []
        # OpenCV keeps only groups of more than min_face_neighbours windows.
        for (x, y, w, h), n in zip(boxes, neighbours, strict=True):
            if mirrored:
                x = gray.shape[1] - x - w
            found.append((float(x), float(y), float(w), float(h), neighbours_score(int(n)), detector))
        return found

    def detect(self, image: Image.Image) -> list[Detection]:
        """People in ``image``: best score first, then top-to-bottom, left-to-right (a stable order)."""
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        if width < 2 or height < 2:
            return []
        f = self._scale(width, height)
        if f != 1.0:
            interpolation = cv2.INTER_CUBIC if f > 1 else cv2.INTER_AREA
            rgb = cv2.resize(rgb, (round(width * f), round(height * f)), interpolation=interpolation)
        frontal, profile, hog = _models()
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))

        raw = self._faces(frontal, gray, FRONTAL_FACE, mirrored=False)
        if self.use_profile:
            raw += self._faces(profile, gray, PROFILE_FACE, mirrored=False)
            raw += self._faces(profile, gray, PROFILE_FACE, mirrored=True)
        # OpenCV's HOG crashes (SIGSEGV, 4.14) on an image smaller than its 64x128 window.
        if self.use_hog and gray.shape[0] >= 128 and gray.shape[1] >= 64:
            bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            people, margins = hog.detectMultiScale(bgr, winStride=(8, 8), padding=(8, 8), scale=1.05)
            for (x, y, w, h), margin in zip(people, np.ravel(margins), strict=True):
                if margin >= self.hog_threshold:
                    raw.append((float(x), float(y), float(w), float(h), hog_score(float(margin)), HOG_PERSON))

        boxes = [_to_box(x / f, y / f, w / f, h / f, s, d, width, height) for x, y, w, h, s, d in raw]
        kept: list[Detection] = []
        for box in sorted((b for b in boxes if b.w > 0 and b.h > 0), key=_order):
            # Non-maximum suppression on the final boxes: the best box of each person stays.
            if not any(same_person(box, k, self.nms_iou) for k in kept):
                kept.append(box)
        return kept[: self.max_detections]
