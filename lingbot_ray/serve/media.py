"""Turning an init's ``first_frame`` into an RGB array, safely.

``first_frame`` is bytes (an image file) or a string: a ``data:image/...;base64,`` URI, an
``http(s)://`` URL, or a server path. Paths are read only inside configured directories; URLs are
fetched only when enabled, never from private, loopback, link-local or otherwise non-global
addresses (checked on the resolved address that is actually connected to, so DNS rebinding cannot
slip through), without redirects, with a size cap and a timeout. Every refusal is an
:class:`InvalidInit` naming ``first_frame`` and the value.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import socket
import ssl
import stat
import time
import urllib.parse
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from lingbot_ray.protocol import InvalidInit

FIELD = "first_frame"


@dataclass(frozen=True)
class MediaPolicy:
    """Where a ``first_frame`` may come from (serve config ``media``)."""

    allowed_dirs: tuple[str, ...] = ()
    allow_url_fetch: bool = False
    max_bytes: int = 12 * 2**20
    fetch_timeout_s: float = 5.0
    # Decoded pixels allowed: this, or 4× the session's frame when that is larger. A small file can
    # decode to a huge frame (a 154 KB PNG of 6300×6300 once took 300 MB of the ingress).
    max_pixels: int = 2048 * 2048
    allowed_schemes: tuple[str, ...] = field(default=("http", "https"))


def load_first_frame(value: bytes | str, width: int, height: int, policy: MediaPolicy) -> np.ndarray:
    """Resolve, decode and resize (bicubic, exactly ``width``×``height``) to ``uint8[H, W, 3]``."""
    data = read_image_bytes(value, policy)
    return decode_image(data, width, height, policy)


def read_image_bytes(value: bytes | str, policy: MediaPolicy) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif value.startswith("data:"):
        data = _from_data_uri(value)
    elif "://" in value:
        data = _fetch_url(value, policy)
    else:
        data = _read_path(value, policy)
    if len(data) > policy.max_bytes:
        raise InvalidInit(FIELD, f"<{len(data)} bytes>", f"image larger than {policy.max_bytes} bytes")
    return data


def decode_image(data: bytes, width: int, height: int, policy: MediaPolicy) -> np.ndarray:
    limit = max(policy.max_pixels, 4 * width * height)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > limit:
                # JPEG decodes at 1/2, 1/4 or 1/8 scale while reading, still covering the target;
                # only when too big, so that other frames decode exactly as the reference's do
                image.draft("RGB", (width, height))
            if image.width * image.height > limit:
                raise InvalidInit(FIELD, f"{image.width}x{image.height}", f"more than {limit} pixels to decode for a {width}x{height} session")
            rgb = image.convert("RGB")
    except InvalidInit:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInit(FIELD, data[:16], f"not a decodable image: {exc}") from None
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8).copy()


def _from_data_uri(value: str) -> bytes:
    header, sep, payload = value.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise InvalidInit(FIELD, value, "data URIs must look like data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInit(FIELD, value, f"bad base64: {exc}") from None


def _read_path(value: str, policy: MediaPolicy) -> bytes:
    if not policy.allowed_dirs:
        raise InvalidInit(FIELD, value, "server paths are disabled (no media.allowed_dirs configured)")
    if "\x00" in value:
        raise InvalidInit(FIELD, value, "a path cannot contain a NUL byte")
    real = os.path.realpath(value)
    for root in policy.allowed_dirs:
        root_real = os.path.realpath(root)
        if os.path.commonpath([real, root_real]) == root_real:
            break
    else:
        raise InvalidInit(FIELD, value, "path is outside the allowed directories")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidInit(FIELD, value, f"cannot read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)  # of what was opened, not of what the path named a moment before
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInit(FIELD, value, "not a regular file (a FIFO, device, socket or folder)")
        if info.st_size > policy.max_bytes:
            raise InvalidInit(FIELD, value, f"file larger than {policy.max_bytes} bytes")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(policy.max_bytes + 1)
    except OSError as exc:
        raise InvalidInit(FIELD, value, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback)


def _vetted_address(host: str, port: int, url: str) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidInit(FIELD, url, f"cannot resolve host: {exc}") from None
    addresses = [info[4][0] for info in infos]
    # Every address must be public: a name that resolves to both kinds is refused outright.
    if not addresses or not all(is_public_address(a) for a in addresses):
        raise InvalidInit(FIELD, url, "URL resolves to a private, loopback or link-local address")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def _read_with_deadline(response: http.client.HTTPResponse, policy: MediaPolicy, url: str) -> bytes:
    # The socket timeout bounds each read, not the whole body: a slow drip needs a total deadline.
    deadline = time.monotonic() + policy.fetch_timeout_s
    chunks: list[bytes] = []
    received = 0
    while received <= policy.max_bytes:
        if time.monotonic() > deadline:
            raise InvalidInit(FIELD, url, f"fetch took longer than {policy.fetch_timeout_s} s")
        chunk = response.read1(65536)
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def _fetch_url(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_url_fetch:
        raise InvalidInit(FIELD, url, "URL fetch is disabled (media.allow_url_fetch: false)")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in policy.allowed_schemes or not parts.hostname:
        raise InvalidInit(FIELD, url, f"only {', '.join(policy.allowed_schemes)} URLs with a host are fetched")
    port = parts.port or (443 if scheme == "https" else 80)
    address = _vetted_address(parts.hostname, port, url)
    connection_type = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    connection = connection_type(parts.hostname, address, port, policy.fetch_timeout_s)
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    try:
        connection.request("GET", path, headers={"User-Agent": "lingbot_ray", "Accept": "image/*"})
        response = connection.getresponse()
        if response.status != 200:
            raise InvalidInit(FIELD, url, f"HTTP {response.status} (redirects are not followed)")
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
            raise InvalidInit(FIELD, url, f"Content-Length {declared} above {policy.max_bytes}")
        data = _read_with_deadline(response, policy, url)
    except (OSError, http.client.HTTPException) as exc:
        raise InvalidInit(FIELD, url, f"fetch failed: {exc}") from None
    finally:
        connection.close()
    if len(data) > policy.max_bytes:
        raise InvalidInit(FIELD, url, f"response larger than {policy.max_bytes} bytes")
    return data
