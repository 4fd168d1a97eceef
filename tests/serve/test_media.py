import base64
import http.server
import io
import os
import threading

import numpy as np
import pytest
from PIL import Image

from lingbot_ray.protocol import InvalidInit
from lingbot_ray.serve import media
from lingbot_ray.serve.media import MediaPolicy, is_public_address, load_first_frame


def png_bytes(width=40, height=24, color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bytes_are_decoded_and_resized_exactly():
    frame = load_first_frame(png_bytes(), 64, 32, MediaPolicy())
    assert frame.shape == (32, 64, 3) and frame.dtype == np.uint8
    assert tuple(frame[16, 32]) == (200, 30, 60)


def test_data_uri():
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    assert load_first_frame(uri, 32, 32, MediaPolicy()).shape == (32, 32, 3)
    with pytest.raises(InvalidInit, match="base64"):
        load_first_frame("data:image/png;base64,@@@", 32, 32, MediaPolicy())
    with pytest.raises(InvalidInit, match="data URIs"):
        load_first_frame("data:text/plain,hello", 32, 32, MediaPolicy())


def test_undecodable_and_oversized_images():
    with pytest.raises(InvalidInit, match="first_frame"):
        load_first_frame(b"not an image", 32, 32, MediaPolicy())
    with pytest.raises(InvalidInit, match="larger than"):
        load_first_frame(png_bytes(), 32, 32, MediaPolicy(max_bytes=10))
    with pytest.raises(InvalidInit, match="pixels"):
        load_first_frame(png_bytes(400, 400), 32, 32, MediaPolicy(max_pixels=1000))


def test_paths_only_inside_allowed_dirs(tmp_path):
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png_bytes())
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    os.symlink(secret, allowed / "escape.png")
    policy = MediaPolicy(allowed_dirs=(str(allowed),))
    assert load_first_frame(str(allowed / "a.png"), 32, 32, policy).shape == (32, 32, 3)
    for outside in (str(secret), str(allowed / ".." / "secret.png"), str(allowed / "escape.png"), "/etc/passwd"):
        with pytest.raises(InvalidInit, match="outside the allowed"):
            load_first_frame(outside, 32, 32, policy)
    with pytest.raises(InvalidInit, match="disabled"):
        load_first_frame(str(allowed / "a.png"), 32, 32, MediaPolicy())
    with pytest.raises(InvalidInit, match="cannot read"):
        load_first_frame(str(allowed / "missing.png"), 32, 32, policy)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
    ],
)
def test_public_address_rule(address, public):
    assert is_public_address(address) is public


def test_url_fetch_is_off_by_default_and_never_private():
    with pytest.raises(InvalidInit, match="disabled"):
        load_first_frame("http://example.com/a.png", 32, 32, MediaPolicy())
    policy = MediaPolicy(allow_url_fetch=True)
    for url in ("http://127.0.0.1:1/a.png", "http://localhost/a.png", "http://[::1]/a.png", "http://169.254.169.254/"):
        with pytest.raises(InvalidInit, match="private, loopback or link-local"):
            load_first_frame(url, 32, 32, policy)
    with pytest.raises(InvalidInit, match="URLs"):
        load_first_frame("ftp://example.com/a.png", 32, 32, policy)


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1/secret")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(monkeypatch):
    # The fetch code path is exercised against loopback by relaxing only the address rule.
    monkeypatch.setattr(media, "is_public_address", lambda address: True)
    _Handler.body = png_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_fetch_reads_with_caps_and_no_redirects(local_server):
    policy = MediaPolicy(allow_url_fetch=True)
    assert load_first_frame(local_server + "/a.png", 16, 16, policy).shape == (16, 16, 3)
    with pytest.raises(InvalidInit, match="redirects"):
        load_first_frame(local_server + "/redirect", 16, 16, policy)
    with pytest.raises(InvalidInit, match="Content-Length"):
        load_first_frame(local_server + "/a.png", 16, 16, MediaPolicy(allow_url_fetch=True, max_bytes=20))


def test_fifos_devices_and_folders_are_refused_at_once_and_nul_bytes_name_the_field(tmp_path):
    """A FIFO inside an allowed folder has no writer: reading it would block; it is refused on open."""
    import time

    policy = MediaPolicy(allowed_dirs=(str(tmp_path),))
    fifo = tmp_path / "frame.png"
    os.mkfifo(fifo)
    (tmp_path / "zero").symlink_to("/dev/zero")  # a device reached through the allowed folder
    policy_with_dev = MediaPolicy(allowed_dirs=(str(tmp_path), "/dev"))
    started = time.monotonic()
    with pytest.raises(InvalidInit, match="not a regular file") as refused:
        load_first_frame(str(fifo), 32, 32, policy)
    assert time.monotonic() - started < 1.0 and refused.value.field == "first_frame"
    with pytest.raises(InvalidInit, match="not a regular file"):
        load_first_frame(str(tmp_path / "zero"), 32, 32, policy_with_dev)
    with pytest.raises(InvalidInit, match="not a regular file"):
        load_first_frame(str(tmp_path), 32, 32, policy)
    with pytest.raises(InvalidInit, match="NUL byte") as nul:
        load_first_frame(str(tmp_path / "a\x00b.png"), 32, 32, policy)
    assert nul.value.field == "first_frame"


def test_decoded_pixels_are_capped_by_the_session_size():
    """A small file that decodes to a huge frame is refused before decoding (PNG), or decoded at a
    reduced scale (JPEG); the cap follows the session's size."""
    big_png = png_bytes(3000, 3000)  # 9 MP of flat colour: a few KB of file
    assert len(big_png) < 100_000
    with pytest.raises(InvalidInit, match="more than 4194304 pixels") as refused:
        load_first_frame(big_png, 160, 96, MediaPolicy())
    assert refused.value.field == "first_frame"
    assert load_first_frame(big_png, 1600, 1600, MediaPolicy()).shape == (1600, 1600, 3)  # 4× its area
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 3000), (10, 200, 30)).save(buffer, format="JPEG")
    frame = load_first_frame(buffer.getvalue(), 160, 96, MediaPolicy())  # drafted to 375x375 while reading
    assert frame.shape == (96, 160, 3) and abs(int(frame[40, 80, 1]) - 200) < 6
