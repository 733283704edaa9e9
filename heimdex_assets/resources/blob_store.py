"""Reads thumbnails and photos by URI: a local path or ``file://`` under an allowed directory, or
``http(s)://`` from an allowed host. Nothing else: a URI is data from the database, not a licence."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlparse

import dagster as dg
from PIL import Image, UnidentifiedImageError
from pydantic import Field

if TYPE_CHECKING:
    import httpx

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


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
    """Fetches bytes by URI, only from ``allowed_roots`` (local directories; symlinks and ``..`` resolved
    first) and ``allowed_hosts`` (``host`` for its scheme's default port, ``host:port`` for that port),
    with a timeout and a size cap for remote blobs. With neither, it reads nothing."""

    allowed_roots: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    timeout_s: float = 20.0
    max_bytes: int = 50 * 1024 * 1024
    max_redirects: int = 3

    def read(self, uri: str) -> bytes:
        """The bytes at ``uri``; BlobError with a one-line reason otherwise."""
        if not uri:
            raise BlobError("no URI")
        parsed = urlparse(uri)
        if parsed.scheme in ("http", "https"):
            return self._fetch(uri)
        if parsed.scheme == "file":
            return self._read_file(Path(unquote(parsed.path)))
        if parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] == ":\\"):
            return self._read_file(Path(uri))
        raise BlobError(f"unsupported URI scheme {parsed.scheme!r}: {_safe(uri)}")

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

    def _read_file(self, path: Path) -> bytes:
        """The bytes of ``path`` if its real path lies under an allowed root (checked before anything is
        read, so that an error never tells whether a file outside the roots exists)."""
        try:
            real = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
            raise BlobError(f"cannot resolve {path}") from None
        roots = [Path(r).expanduser().resolve() for r in self.allowed_roots if r.strip()]  # "" would be the cwd
        if not any(real.is_relative_to(root) for root in roots):
            shown = f"{path} (which resolves to {real})" if real != path.absolute() else str(path)
            raise BlobError(f"{shown} is outside the allowed roots")
        try:
            return real.read_bytes()  # the checked path: a link swapped in since is not followed at its end
        except FileNotFoundError:
            raise BlobError(f"file not found: {path}") from None
        except OSError as exc:
            raise BlobError(f"cannot read {path}: {exc.strerror}") from None

    def _fetch(self, uri: str) -> bytes:
        """The body at ``uri``, following at most ``max_redirects`` redirects, each to an allowed host, and
        streamed so that an oversized body is dropped at ``max_bytes`` instead of held whole."""
        import httpx  # only here: it pulls in a CLI toolkit that local paths never need

        url = uri
        for _ in range(self.max_redirects + 1):
            self._check_host(uri, url)
            try:
                with httpx.stream("GET", url, timeout=self.timeout_s, follow_redirects=False) as response:
                    if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise BlobError(f"cannot fetch {_safe(uri)}: HTTP {response.status_code}")
                    return self._body(uri, response)
            except httpx.HTTPError as exc:
                raise BlobError(f"cannot fetch {_safe(uri)}: {type(exc).__name__}") from None
        raise BlobError(f"cannot fetch {_safe(uri)}: more than {self.max_redirects} redirects")

    def _check_host(self, uri: str, url: str) -> None:
        """BlobError unless ``url`` (``uri`` itself or where it redirected) is http(s) on an allowed host."""
        parsed = urlparse(url)
        redirected = f", redirected to {_safe(url)}" if url != uri else ""
        if parsed.scheme not in DEFAULT_PORTS:
            raise BlobError(f"cannot fetch {_safe(uri)}{redirected}: scheme {parsed.scheme!r} is not allowed")
        try:
            port = parsed.port or DEFAULT_PORTS[parsed.scheme]
        except ValueError:
            raise BlobError(f"cannot fetch {_safe(uri)}{redirected}: malformed port") from None
        host = (parsed.hostname or "").lower()
        allowed = set()
        for entry in self.allowed_hosts:
            entry_url = urlparse(f"//{entry.strip()}")
            allowed.add(((entry_url.hostname or "").lower(), entry_url.port or DEFAULT_PORTS[parsed.scheme]))
        if (host, port) not in allowed:
            shown = f"{host}:{parsed.port}" if parsed.port else host
            raise BlobError(f"cannot fetch {_safe(uri)}{redirected}: host {shown} is not allowed")

    def _body(self, uri: str, response: httpx.Response) -> bytes:
        """The streamed body of ``response``, at most ``max_bytes`` (a declared larger length is refused unread)."""
        too_large = f"{_safe(uri)} is larger than {self.max_bytes} bytes"
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise BlobError(too_large)
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise BlobError(too_large)
            chunks.append(chunk)
        return b"".join(chunks)


def _safe(uri: str) -> str:
    """The URI without credentials or query string (signed URLs carry secrets there)."""
    parsed = urlparse(uri)
    host = parsed.hostname or ""
    try:
        port = f":{parsed.port}" if parsed.port else ""
    except ValueError:  # a malformed port is no secret, but must not turn a refusal into a crash
        port = ""
    return f"{parsed.scheme}://{host}{port}{parsed.path}"
