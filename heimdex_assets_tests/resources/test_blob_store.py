import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from heimdex_assets.resources import BlobStore
from heimdex_assets.resources.blob_store import BlobError


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "a b.png"
    Image.new("RGB", (8, 6), (10, 200, 30)).save(path)
    return path


@pytest.fixture
def http_server(png):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.startswith("/ok.png"):
                data = png.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self.send_response(404)
                self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_reads_paths_file_uris_and_http(png, http_server):
    blobs = BlobStore()
    expected = png.read_bytes()
    assert blobs.read(str(png)) == expected
    assert blobs.read(png.as_uri()) == expected
    assert blobs.read(f"{http_server}/ok.png?sig=abc") == expected
    image, _ = blobs.read_image(str(png))
    assert image.size == (8, 6) and image.mode == "RGB"


def test_errors_are_one_line_and_hide_query_strings(tmp_path, http_server):
    blobs = BlobStore()
    with pytest.raises(BlobError, match=f"file not found: {tmp_path}/missing.png"):
        blobs.read(str(tmp_path / "missing.png"))
    with pytest.raises(BlobError) as err:
        blobs.read(f"{http_server}/gone.png?token=SECRET")
    assert str(err.value) == f"cannot fetch {http_server}/gone.png: HTTP 404"
    with pytest.raises(BlobError, match="unsupported URI scheme 's3'"):
        blobs.read("s3://bucket/key.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(BlobError, match="not a readable image"):
        blobs.read_image(str(tmp_path / "bad.png"))
