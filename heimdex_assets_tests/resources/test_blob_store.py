import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from heimdex_assets.demo.run import media_dir
from heimdex_assets.resources import BlobStore
from heimdex_assets.resources.blob_store import BlobError
from heimdex_assets.settings import blob_store_from_env

Handle = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "root" / "a b.png"
    path.parent.mkdir()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(path)
    return path


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, Handle]], tuple[str, list[str]]]]:
    """Starts HTTP servers on 127.0.0.1, each on its own port (so its own ``host:port``), answering
    ``routes`` (path without query -> handler; others 404); each records the paths it was asked for."""
    servers = []

    def start(routes: dict[str, Handle]) -> tuple[str, list[str]]:
        asked: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked bodies need it

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                asked.append(self.path)
                routes.get(self.path.split("?")[0], lambda h: reply(h, 404))(self)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_port}", asked

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def reply(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    handler.send_response(status)
    headers = {"Content-Length": str(len(body))} | {k.replace("_", "-"): v for k, v in headers.items()}
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def test_reads_paths_file_uris_and_http_inside_what_is_allowed(png, serve):
    host, _ = serve({"/ok.png": lambda h: reply(h, 200, png.read_bytes())})
    blobs = BlobStore(allowed_roots=[str(png.parent)], allowed_hosts=[host])
    expected = png.read_bytes()
    assert blobs.read(str(png)) == expected
    assert blobs.read(png.as_uri()) == expected
    assert blobs.read(f"http://{host}/ok.png?sig=abc") == expected
    image, _ = blobs.read_image(str(png))
    assert image.size == (8, 6) and image.mode == "RGB"


def test_errors_are_one_line_and_hide_query_strings(tmp_path, png, serve):
    host, _ = serve({})
    blobs = BlobStore(allowed_roots=[str(tmp_path)], allowed_hosts=[host])
    with pytest.raises(BlobError, match=f"file not found: {tmp_path}/missing.png"):
        blobs.read(str(tmp_path / "missing.png"))
    with pytest.raises(BlobError) as err:
        blobs.read(f"http://{host}/gone.png?token=SECRET")
    assert str(err.value) == f"cannot fetch http://{host}/gone.png: HTTP 404"
    with pytest.raises(BlobError, match="unsupported URI scheme 's3'"):
        blobs.read("s3://bucket/key.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(BlobError, match="not a readable image"):
        blobs.read_image(str(tmp_path / "bad.png"))


def test_a_store_with_no_roots_and_no_hosts_reads_nothing(png, serve):
    host, asked = serve({"/ok.png": lambda h: reply(h, 200, png.read_bytes())})
    blobs = BlobStore()
    with pytest.raises(BlobError, match="is outside the allowed roots"):
        blobs.read(str(png))
    with pytest.raises(BlobError, match=f"host {host} is not allowed"):
        blobs.read(f"http://{host}/ok.png")
    assert asked == []  # refused before any request


def test_paths_outside_the_roots_are_refused_however_they_are_spelt(tmp_path, png):
    root = png.parent
    outside = tmp_path / "outside" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(png.read_bytes())
    (root / "link.png").symlink_to(outside)
    (root / "linked-dir").symlink_to(outside.parent, target_is_directory=True)
    (tmp_path / "root-alias").symlink_to(root, target_is_directory=True)
    blobs = BlobStore(allowed_roots=[str(root)])

    refused = {
        str(outside): f"{outside} is outside the allowed roots",
        outside.as_uri(): f"{outside} is outside the allowed roots",
        str(root / "link.png"): f"{root}/link.png (which resolves to {outside}) is outside the allowed roots",
        str(root / "linked-dir" / "secret.png"): f"(which resolves to {outside}) is outside the allowed roots",
        f"{root}/../outside/secret.png": f"(which resolves to {outside}) is outside the allowed roots",
        # A missing file outside the roots gets the same answer: no telling what exists there.
        str(tmp_path / "outside" / "nothing.png"): "nothing.png is outside the allowed roots",
    }
    for uri, reason in refused.items():
        with pytest.raises(BlobError) as err:
            blobs.read(uri)
        assert str(err.value).endswith(reason) and "\n" not in str(err.value), uri

    # Inside the root, through a link to it or a `..` that stays inside, a path reads.
    assert blobs.read(str(tmp_path / "root-alias" / png.name)) == png.read_bytes()
    assert blobs.read(f"{root}/../root/{png.name}") == png.read_bytes()
    assert BlobStore(allowed_roots=[str(tmp_path / "root-alias")]).read(str(png)) == png.read_bytes()


def test_redirects_are_followed_only_to_allowed_hosts(png, serve):
    target, target_asked = serve({"/ok.png": lambda h: reply(h, 200, png.read_bytes())})
    origin, _ = serve(
        {
            "/away.png": lambda h: reply(h, 302, Location=f"http://{target}/ok.png?sig=SECRET"),
            "/loop.png": lambda h: reply(h, 301, Location="/loop.png"),
            "/file.png": lambda h: reply(h, 302, Location=png.as_uri()),
        }
    )

    only_origin = BlobStore(allowed_roots=[str(png.parent)], allowed_hosts=[origin])
    with pytest.raises(BlobError) as err:
        only_origin.read(f"http://{origin}/away.png?token=SECRET")
    assert str(err.value) == (
        f"cannot fetch http://{origin}/away.png, redirected to http://{target}/ok.png: host {target} is not allowed"
    )
    assert target_asked == []  # the other host was never contacted
    with pytest.raises(BlobError, match=r"redirected to file://.*: scheme 'file' is not allowed"):
        only_origin.read(f"http://{origin}/file.png")
    with pytest.raises(BlobError, match=f"cannot fetch http://{origin}/loop.png: more than 3 redirects"):
        only_origin.read(f"http://{origin}/loop.png")

    both = BlobStore(allowed_hosts=[origin, target])
    assert both.read(f"http://{origin}/away.png") == png.read_bytes()
    # A bare host name allows its scheme's default port only, not every port of that host.
    with pytest.raises(BlobError, match=f"host {origin} is not allowed"):
        BlobStore(allowed_hosts=["127.0.0.1"]).read(f"http://{origin}/away.png")


def test_an_oversized_body_is_refused_while_streaming(serve):
    total, chunk = 64 * 1024 * 1024, b"x" * 65536
    sent, finished = [0], threading.Event()

    def chunked(h: BaseHTTPRequestHandler) -> None:  # no Content-Length: only counting tells the size
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            while sent[0] < total:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent[0] += len(chunk)
            h.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up
            pass
        finally:
            finished.set()

    host, _ = serve({"/big.png": chunked, "/declared.png": lambda h: reply(h, 200, b"tiny", Content_Length=str(total))})
    blobs = BlobStore(allowed_hosts=[host], max_bytes=100_000)
    with pytest.raises(BlobError) as err:
        blobs.read(f"http://{host}/big.png?sig=SECRET")
    assert str(err.value) == f"http://{host}/big.png is larger than 100000 bytes"
    assert finished.wait(10)
    assert sent[0] < total // 4  # the client stopped reading long before the end
    with pytest.raises(BlobError, match=f"http://{host}/declared.png is larger than 100000 bytes"):
        blobs.read(f"http://{host}/declared.png")


def test_settings_allow_the_demo_media_and_no_host_unless_configured(monkeypatch, tmp_path):
    monkeypatch.delenv("HEIMDEX_BLOB_ROOTS", raising=False)
    monkeypatch.delenv("HEIMDEX_BLOB_HOSTS", raising=False)
    monkeypatch.setenv("HEIMDEX_HOME", str(tmp_path / "home"))
    default = blob_store_from_env()
    assert (default.allowed_roots, default.allowed_hosts) == ([str(media_dir())], [])
    assert media_dir() == tmp_path / "home" / "demo" / "media"

    monkeypatch.setenv("HEIMDEX_BLOB_ROOTS", f"/srv/thumbs:{tmp_path}/photos:")
    monkeypatch.setenv("HEIMDEX_BLOB_HOSTS", "cdn.example.com, media.example.com:8443,")
    configured = blob_store_from_env()
    assert configured.allowed_roots == ["/srv/thumbs", f"{tmp_path}/photos"]
    assert configured.allowed_hosts == ["cdn.example.com", "media.example.com:8443"]
