"""Reads thumbnails and photos by URI: a local path, ``file://`` or ``http(s)://``."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

import dagster as dg
from PIL import Image, UnidentifiedImageError


class BlobError(RuntimeError):
    """A blob could not be read or decoded; the message is fit to store as a failure reason."""


def decode_image(data: bytes, uri: str, at_least: tuple[int, int] | None = None) -> Image.Image:
    """The RGB image in ``data``; BlobError naming ``uri`` if it is not a readable image.

    ``at_least`` (width, height): a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``, done in
    the DCT, several times faster) as long as both sides stay at least this large; other formats decode
    at full size. For a model that resizes to 224 px, ask for twice that, as ``Image.thumbnail`` does."""
    try:
        image = Image.open(io.BytesIO(data))
        if at_least is not None and image.format == "JPEG":
            image.draft("RGB", at_least)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BlobError(f"not a readable image: {uri} ({type(exc).__name__})") from None
    return image if image.mode == "RGB" else image.convert("RGB")


class BlobStore(dg.ConfigurableResource):
    """Fetches bytes by URI, with a timeout and a size cap for remote blobs."""

    timeout_s: float = 20.0
    max_bytes: int = 50 * 1024 * 1024

    def read(self, uri: str) -> bytes:
        """The bytes at ``uri``; BlobError with a one-line reason otherwise."""
        if not uri:
            raise BlobError("no URI")
        parsed = urlparse(uri)
        if parsed.scheme in ("http", "https"):
            import httpx  # only here: it pulls in a CLI toolkit that local paths never need

            try:
                response = httpx.get(uri, timeout=self.timeout_s, follow_redirects=True)
            except httpx.HTTPError as exc:
                raise BlobError(f"cannot fetch {_safe(uri)}: {type(exc).__name__}") from None
            if response.status_code != 200:
                raise BlobError(f"cannot fetch {_safe(uri)}: HTTP {response.status_code}")
            if len(response.content) > self.max_bytes:
                raise BlobError(f"{_safe(uri)} is larger than {self.max_bytes} bytes")
            return response.content
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
        elif parsed.scheme in ("",) or (len(parsed.scheme) == 1 and uri[1:3] == ":\\"):
            path = Path(uri)
        else:
            raise BlobError(f"unsupported URI scheme {parsed.scheme!r}: {_safe(uri)}")
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise BlobError(f"file not found: {path}") from None
        except OSError as exc:
            raise BlobError(f"cannot read {path}: {exc.strerror}") from None

    def read_image(self, uri: str, at_least: tuple[int, int] | None = None) -> tuple[Image.Image, bytes]:
        """The decoded RGB image at ``uri`` and its raw bytes (for hashing); ``at_least``: see ``decode_image``."""
        data = self.read(uri)
        return decode_image(data, uri, at_least), data

    def read_declared_image(
        self, uri: str, declared_sha256: str | None, at_least: tuple[int, int] | None = None
    ) -> Image.Image:
        """The decoded image at ``uri``, whose bytes must have ``declared_sha256`` when one is declared:
        the declared hash is the input's identity, so other bytes must not pass under it. ``at_least``:
        the smallest size the caller needs (see ``decode_image``)."""
        data = self.read(uri)
        if declared_sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != declared_sha256.lower():
                shown = _safe(uri) if urlparse(uri).scheme in ("http", "https") else uri
                raise BlobError(
                    f"bytes at {shown} have sha256 {actual[:12]}…, not the declared {declared_sha256[:12]}…"
                )
        return decode_image(data, uri, at_least)


def _safe(uri: str) -> str:
    """The URI without credentials or query string (signed URLs carry secrets there)."""
    parsed = urlparse(uri)
    host = parsed.hostname or ""
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{host}{port}{parsed.path}"
