"""The WebUI in a real browser (Playwright + Debian's chromium) against the in-process ingress.

The app (the embedded world model, no Ray) is served by uvicorn in a thread; the page is loaded from it, a
session is run with every transport, the canvas is read back, a key is pressed, stats and the log
are checked. The MessagePack codec is unit-tested inside the same browser against msgspec's bytes.
Skips cleanly when /usr/bin/chromium or the playwright package is missing.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import pathlib
import urllib.error
import urllib.request

import msgspec
import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
uvicorn = pytest.importorskip("uvicorn")

from lingbot_ray.protocol import ACTIONS  # noqa: E402
from lingbot_ray.serve.local import serve_locally  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The README's screenshot is refreshed only on request (LINGBOT_UPDATE_SCREENSHOT=1 python -m pytest
# tests/webui), so that a test run never dirties the checkout.
SCREENSHOT = ROOT / "docs" / "webui.png" if os.environ.get("LINGBOT_UPDATE_SCREENSHOT") else None
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
KEY = "webui-test-key"


@pytest.fixture(scope="module")
def checkpoint():
    return "embedded:lingbot-world-tiny"  # the default: the screenshot shows the trained world model


@pytest.fixture(scope="module")
def server(checkpoint):
    with serve_locally({"model": {"path": str(checkpoint), "torch_threads": 1}, "dit": {"sessions_per_group": 2}}) as srv:
        yield f"http://{srv.address}"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 960})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.page_errors = errors
    yield page
    context.close()


def open_ui(page, url):
    page.goto(url + "/")
    # model list filled from /v1/models, key bindings from /v1/actions, first sample selected
    page.wait_for_function(
        "document.getElementById('model').options.length > 1 && window.lingbot.state.actions.length"
        " && window.lingbot.state.firstFrameBytes"
    )


def canvas_digest(page) -> list[int]:
    """A coarse fingerprint of the canvas pixels (sum per 8 horizontal bands)."""
    return page.evaluate(
        """() => {
        const c = document.getElementById('screen');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const bands = new Array(8).fill(0);
        const rowBytes = c.width * 4;
        for (let i = 0; i < d.length; i += 4) {
            const band = Math.min(7, Math.floor((i / rowBytes) * 8 / c.height));
            bands[band] += d[i] + d[i + 1] + d[i + 2];
        }
        return bands;
    }"""
    )


def stat(page, name):
    return page.evaluate(f"window.lingbot.state.stats.{name}")


def log_text(page) -> str:
    return page.inner_text("#log")


@pytest.mark.parametrize("transport", ["webp", "jpeg", "delta", "raw"])
def test_session_streams_and_reacts(page, server, transport):
    open_ui(page, server)
    page.select_option("#transport", transport)
    page.fill("#fps", "24")
    page.click("#start")
    page.wait_for_function("window.lingbot.state.stats.chunks >= 1", timeout=30000)
    page.wait_for_function("window.lingbot.state.framesDrawn >= 2", timeout=10000)
    first = canvas_digest(page)
    assert sum(first) > 0, "canvas is black"
    assert page.evaluate("document.getElementById('screen').width") == stat(page, "width") > 0
    # frames change over time
    page.wait_for_function(
        f"window.lingbot.state.framesDrawn >= {page.evaluate('window.lingbot.state.framesDrawn') + 4}", timeout=20000
    )
    assert canvas_digest(page) != first, "canvas did not change"

    # a key press is sent as a state transition and becomes visible: event latency appears
    assert stat(page, "eventLatencyMs") is None and page.evaluate("window.lingbot.state.eventId") == 0
    page.keyboard.down("w")
    page.wait_for_function("window.lingbot.state.stats.lastEventId >= 1", timeout=30000)
    page.keyboard.up("w")
    assert stat(page, "eventLatencyMs") > 0
    assert page.inner_text("#st-event-ms").endswith("(#1)")
    assert "camera state [w]" in log_text(page)

    # stats filled
    page.wait_for_function("window.lingbot.state.stats.chunks >= 3", timeout=30000)
    for name in ["generatedFps", "chunkMs", "bytesPerChunk", "decodeMs"]:
        assert stat(page, name) is not None, name
    for cell in ["st-gen-fps", "st-chunk-ms", "st-event-ms", "st-bytes", "st-decode-ms"]:
        assert page.inner_text(f"#{cell}") != "—", cell
    assert page.evaluate("window.lingbot.state.plot.length") >= 3

    if transport == "webp":
        page.evaluate("window.scrollTo(0, 0)")
        shot = page.screenshot(path=str(SCREENSHOT) if SCREENSHOT else None)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"

    page.click("#stop")
    page.wait_for_function("window.lingbot.state.stats.closeCode !== null", timeout=10000)
    assert "closed: code 1000" in log_text(page)
    assert not page.page_errors, page.page_errors


def test_controls_prompt_drops_and_generation_complete(page, server):
    open_ui(page, server)
    page.select_option("#transport", "webp")
    page.uncheck("#continuous")
    page.fill("#max-chunks", "4")
    page.fill("#fps", "2")  # slow playback and a tiny queue: frames must be dropped, oldest first
    page.fill("#queue-size", "3")
    sent = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
    page.click("#start")
    page.wait_for_function("window.lingbot.state.live")
    page.keyboard.down("ArrowLeft")  # look left: j
    pad = page.locator('.key[data-action="d"]')  # on-screen pad, by pointer
    pad.hover()
    page.mouse.down()
    page.wait_for_function("window.lingbot.state.held.has('d')")
    page.mouse.up()
    page.fill("#live-prompt", "a snowy street")
    page.click("#send-prompt")
    page.evaluate("window.dispatchEvent(new Event('blur'))")  # every key released on blur
    page.wait_for_function("window.lingbot.state.stats.closeCode !== null", timeout=60000)
    assert 'closed: code 1000 reason "generation complete"' in log_text(page)
    assert stat(page, "chunks") == 4
    assert page.evaluate("window.lingbot.state.dropped") > 0
    assert page.evaluate("window.lingbot.state.queue.length") <= 3
    decoded = [msgspec.msgpack.decode(p) for p in sent if isinstance(p, bytes)]
    init = decoded[0]
    assert init["type"] == "init" and init["max_chunks"] == 4 and init["realtime_output_format"] == "webp"
    assert init["fps"] == 2 and init["output_compression"] == 90 and "size" not in init
    assert isinstance(init["first_frame"], bytes) and init["first_frame"][:4] == b"\x89PNG"
    events = [m for m in decoded[1:] if m["type"] == "event"]
    cameras = [e for e in events if e["kind"] == "camera_actions"]
    assert [e["payload"]["transitions"][0]["actions"] for e in cameras] == [["j"], ["d", "j"], ["j"], []]
    assert all(e["payload"]["mode"] == "state" and len(e["payload"]["transitions"]) == 1 for e in cameras)
    assert all(isinstance(e["payload"]["transitions"][0]["client_ts_ms"], int) for e in cameras)
    prompts = [e for e in events if e["kind"] == "prompt"]
    assert [p["payload"] for p in prompts] == ["a snowy street"]
    assert [e["event_id"] for e in events] == [1, 2, 3, 4, 5]
    assert not page.page_errors, page.page_errors


def bindings(page) -> dict[str, str]:
    return page.evaluate("Object.fromEntries(window.lingbot.state.keyActions)")


def pad_keys(page) -> dict[str, list[str]]:
    """token -> [pad id, slot class] of every on-screen key."""
    return page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.key')].map((k) => "
        "[k.dataset.action, [k.parentElement.id, k.classList[1]]]))"
    )


def test_key_bindings_and_pads_come_from_the_servers_action_table(page, server):
    with urllib.request.urlopen(f"{server}/v1/actions") as response:
        table = json.loads(response.read())
    assert table == ACTIONS.describe()
    open_ui(page, server)
    assert bindings(page) == {key: m["token"] for m in table["actions"] for key in [m["token"], *m["keys"]]}
    assert pad_keys(page) == {
        "w": ["move-pad", "up"], "s": ["move-pad", "down"], "a": ["move-pad", "left"], "d": ["move-pad", "right"],
        "i": ["look-pad", "up"], "k": ["look-pad", "down"], "j": ["look-pad", "left"], "l": ["look-pad", "right"],
    }
    assert page.inner_text("#move-pad .pad-title") == "move (W A S D)"
    assert page.inner_text("#look-pad .pad-title") == "look (arrows / I J K L)"

    # another table, another keyboard: "w" gives way to "u" (also on PageUp)
    changed = [{**m, "token": "u", "keys": ["pageup"]} if m["token"] == "w" else m for m in table["actions"]]
    page.route("**/v1/actions*", lambda route: route.fulfill(json={"actions": changed}))
    open_ui(page, server)
    assert bindings(page)["u"] == bindings(page)["pageup"] == "u" and "w" not in bindings(page)
    assert pad_keys(page)["u"] == ["move-pad", "up"] and "w" not in pad_keys(page)
    page.keyboard.down("w")
    page.keyboard.down("PageUp")
    page.keyboard.down("ArrowLeft")
    assert page.evaluate("[...window.lingbot.state.held]") == ["u", "j"]
    assert not page.page_errors, page.page_errors


def test_no_action_table_no_controls_and_the_status_says_so(page, server):
    page.route("**/v1/actions*", lambda route: route.fulfill(status=503, body="down"))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('status').textContent === 'no camera controls'")
    assert "no camera controls: could not read" in log_text(page) and "HTTP 503" in log_text(page)
    assert pad_keys(page) == {} and bindings(page) == {}
    page.keyboard.down("w")
    assert page.evaluate("window.lingbot.state.held.size") == 0


def test_uploaded_first_frame_and_rejected_init(page, server, tmp_path):
    from PIL import Image

    upload = tmp_path / "upload.png"
    Image.new("RGB", (64, 40), (200, 40, 40)).save(upload)
    open_ui(page, server)
    page.set_input_files("#first-frame", str(upload))
    page.wait_for_function("window.lingbot.state.firstFrameName === 'upload.png'")
    page.check("#interpolate")  # this server has no interpolation model: the init is refused
    sent = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
    page.click("#start")
    page.wait_for_function("window.lingbot.state.stats.closeCode !== null", timeout=20000)
    assert "server error: invalid generate request (enable_frame_interpolation" in log_text(page)
    init = msgspec.msgpack.decode(sent[0])
    assert init["first_frame"] == upload.read_bytes() and init["enable_frame_interpolation"] is True
    page.uncheck("#interpolate")  # fixed: the same upload now streams
    page.select_option("#transport", "raw")
    page.fill("#size", "64x48")
    page.click("#start")
    page.wait_for_function("window.lingbot.state.framesDrawn >= 1", timeout=30000)
    assert page.evaluate("[document.getElementById('screen').width, document.getElementById('screen').height]") == [64, 48]
    page.click("#stop")
    assert not page.page_errors, page.page_errors


def test_record_saves_webm(page, server):
    open_ui(page, server)
    page.select_option("#transport", "jpeg")
    page.click("#start")
    page.wait_for_function("window.lingbot.state.framesDrawn >= 2", timeout=30000)
    page.click("#record")
    page.wait_for_function("window.lingbot.state.framesDrawn >= 14", timeout=30000)
    with page.expect_download() as info:
        page.click("#record")
    path = info.value.path()
    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b"\x1a\x45\xdf\xa3" and len(data) > 1000  # an EBML (WebM) file
    assert info.value.suggested_filename.endswith(".webm")
    page.click("#stop")


def test_worker_decodes_python_encoded_batches_exactly(page, server):
    """raw and delta-gzip batches from the server's own encoders, decoded by the worker, bit-exact."""
    import numpy as np

    from lingbot_ray.transport import make_encoder

    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (5, 24, 32, 3), dtype=np.uint8) for _ in range(3)]
    chunks[1][:, :12] = chunks[0][-1, :12]  # partly static, like video
    page.goto(server + "/")
    page.wait_for_function("window.MsgPack")
    for fmt in (None, "raw"):
        # a small message cap splits each chunk into several batches (delta_reference across them)
        encoder = make_encoder(fmt, max_message_bytes=6000)  # 2 frames of 32x24 per batch
        event_ids = [None, None, 3]  # the event change forces a key frame in chunk 2
        messages, batches = [], []
        for index, (frames, event_id) in enumerate(zip(chunks, event_ids)):
            for batch in encoder.encode_chunk(frames, request_id="r", chunk_index=index, event_id=event_id):
                batches.append(batch)
                messages.append(list(msgspec.msgpack.encode(batch)))
        assert [b.num_frames for b in batches] == [2, 2, 1] * 3
        if fmt is None:
            assert [b.delta_reference for b in batches] == [None, "previous-frame", "previous-frame"] + [
                "previous-frame"] * 3 + [None, "previous-frame", "previous-frame"]
        result = page.evaluate(
            """async (messages) => {
            const worker = new Worker('decoder-worker.js');
            const out = [];
            let id = 0;
            for (const bytes of messages) {
                const m = MsgPack.decode(new Uint8Array(bytes));
                const payload = m.payload.slice().buffer;
                const reply = await new Promise((resolve) => {
                    worker.onmessage = (e) => resolve(e.data);
                    worker.postMessage({op: 'decode', id: ++id, encoding: m.encoding, payload, num_frames: m.num_frames,
                        width: m.width, height: m.height, bytes_per_frame: m.bytes_per_frame,
                        delta_reference: m.delta_reference}, [payload]);
                });
                if (!reply.ok) return {error: reply.error};
                for (const f of reply.frames) {
                    const rgba = new Uint8Array(f);
                    const rgb = [];
                    for (let i = 0; i < rgba.length; i += 4) rgb.push(rgba[i], rgba[i + 1], rgba[i + 2], rgba[i + 3]);
                    out.push(rgb);
                }
            }
            worker.terminate();
            return {frames: out};
        }""",
            messages,
        )
        assert "error" not in result, result
        got = np.array(result["frames"], np.uint8).reshape(-1, 24, 32, 4)
        want = np.concatenate(chunks)
        assert (got[..., 3] == 255).all()
        np.testing.assert_array_equal(got[..., :3], want, err_msg=f"format {fmt or 'delta-gzip'}")


def test_api_key_field_appears_on_401_and_is_used(browser, checkpoint):
    config = {"model": {"path": str(checkpoint), "torch_threads": 1}, "ingress": {"api_key": KEY}}
    with serve_locally(config) as srv:
        url = f"http://{srv.address}"
        context = browser.new_context()
        page = context.new_page()
        # the page is public; its /v1/models call gets a 401, so it asks for the key
        page.goto(f"{url}/")
        page.wait_for_function("!document.getElementById('api-key-row').hidden")
        assert "401" in log_text(page)
        # the action table is an API endpoint like /v1/models: behind the key
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{url}/v1/actions")
        keyed = urllib.request.Request(f"{url}/v1/actions", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(keyed) as response:
            assert json.loads(response.read()) == ACTIONS.describe()
        page.wait_for_function("document.getElementById('status').textContent === 'no camera controls'")
        page.click("#start")  # no key: the socket is refused with 1008
        page.wait_for_function("window.lingbot.state.stats.closeCode === 1008", timeout=15000)
        page.fill("#api-key", KEY)
        page.uncheck("#continuous")
        page.fill("#max-chunks", "1")
        page.click("#start")
        page.wait_for_function("window.lingbot.state.stats.closeCode === 1000", timeout=30000)
        assert stat(page, "chunks") == 1
        context.close()


# ---------------------------------------------------------------------------------------------- codec

ROUND_TRIP_JS = """() => {
  const M = MsgPack;
  const out = [];
  const same = (a, b) => {
    if (a instanceof Date && b instanceof Date) return a.getTime() === b.getTime();
    if (a instanceof M.Timestamp && b instanceof M.Timestamp) return String(a.sec) === String(b.sec) && a.nsec === b.nsec;
    if (a instanceof M.Ext && b instanceof M.Ext) return a.type === b.type && same(a.data, b.data);
    if (a instanceof Uint8Array && b instanceof Uint8Array) return a.length === b.length && a.every((v, i) => v === b[i]);
    if (a instanceof Map && b instanceof Map) return a.size === b.size && [...a].every(([k, v], i) => same(k, [...b][i][0]) && same(v, [...b][i][1]));
    if (Array.isArray(a) && Array.isArray(b)) return a.length === b.length && a.every((v, i) => same(v, b[i]));
    if (a && b && typeof a === 'object' && typeof b === 'object') {
      const ka = Object.keys(a), kb = Object.keys(b);
      return ka.length === kb.length && ka.every((k, i) => k === kb[i] && same(a[k], b[k]));
    }
    return Object.is(a, b) || (typeof a === 'number' && Number.isNaN(a) && Number.isNaN(b));
  };
  const big = (n) => new Uint8Array(n).map((_, i) => i * 7);
  const arr = (n) => Array.from({length: n}, (_, i) => i);
  const obj = (n) => Object.fromEntries(Array.from({length: n}, (_, i) => ['k' + i, i]));
  const cases = {
    nil: null, t: true, f: false,
    ints: [0, 1, 127, 128, 255, 256, 65535, 65536, 4294967295, 4294967296, Number.MAX_SAFE_INTEGER,
           -1, -32, -33, -128, -129, -32768, -32769, -2147483648, -2147483649, Number.MIN_SAFE_INTEGER],
    bigints: [2n ** 63n, 2n ** 64n - 1n, -(2n ** 63n), 2n ** 53n + 1n, -(2n ** 53n) - 1n],
    floats: [0.5, -1.25, 3.141592653589793, 1e300, -0.0, Infinity, -Infinity, NaN, 5e-324],
    f32: [1.5, -2.25],
    strs: ['', 'a', 'x'.repeat(31), 'x'.repeat(32), 'y'.repeat(255), 'z'.repeat(256), 'w'.repeat(65536), 'héllo ✓ 日本 🎥'],
    bins: [new Uint8Array(0), big(255), big(256), big(65536)],
    arrays: [[], arr(15), arr(16), arr(65536)],
    maps: [{}, obj(15), obj(16), obj(65536)],
    nonStringKeys: new Map([[1, 'a'], [-2, 'b'], [null, [1, 2]]]),
    exts: [1, 2, 4, 8, 16, 3, 255, 256, 70000].map((n, i) => new M.Ext(i - 5 === -1 ? 9 : i - 5, big(n))),
    stamps: [new Date(0), new Date(1700000000000), new Date(1700000000123), new Date(-1500),
             new Date(2 ** 34 * 1000 + 5000), new M.Timestamp(1, 1), new M.Timestamp(2n ** 40n * 100000n, 5)],
    nested: {a: [1, {b: [true, null, {c: new Uint8Array([1, 2])}]}]},
  };
  for (const [name, value] of Object.entries(cases)) {
    const bytes = M.encode(value);
    const back = M.decode(bytes);
    let expected = value;
    if (name === 'f32') { const b2 = M.decode(M.encode(value.map((v) => new M.Float32(v)))); out.push([name, same(b2, value), bytes.length]); continue; }
    out.push([name, same(back, expected), bytes.length]);
  }
  // float32 forced via options
  out.push(['float32opt', M.encode(1.5, {float32: true}).length === 5 && M.decode(M.encode(1.5, {float32: true})) === 1.5, 5]);
  // 64-bit decode as BigInt when asked
  out.push(['bigintopt', M.decode(M.encode(5n ** 20n), {bigint: true}) === 5n ** 20n, 9]);
  // malformed input is refused
  const throws = (f) => { try { f(); return false; } catch (e) { return true; } };
  out.push(['truncated', throws(() => M.decode(new Uint8Array([0xcd, 1]))), 0]);
  out.push(['c1', throws(() => M.decode(new Uint8Array([0xc1]))), 0]);
  out.push(['trailing', throws(() => M.decode(new Uint8Array([1, 2]))), 0]);
  return out;
}"""

# Values that msgspec and the JS encoder must turn into identical bytes.
VECTORS = [
    None, True, False, 0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**53) + 1,
    0.5, -1.25, 1e300, "", "a", "x" * 31, "x" * 32, "y" * 255, "z" * 256, "w" * 65536, "héllo ✓ 🎥",
    b"", b"\x00\x01\xff", bytes(256), bytes(65536), [], list(range(15)), list(range(16)),
    {}, {"type": "event", "kind": "camera_actions", "event_id": 7,
         "payload": {"mode": "state", "transitions": [{"actions": ["w", "j"], "client_ts_ms": 123456}]}},
    {f"k{i}": i for i in range(16)},
    {"nested": [1, [2, [3, {"x": None}]]], "f": 3.141592653589793},
]
BIG_INTS = [2**63, 2**64 - 1, -(2**63), 2**53 + 1]  # BigInt on the JS side
STAMPS = [  # (seconds, nanoseconds) -> msgspec encodes datetimes with the timestamp ext
    (0, 0), (1700000000, 0), (1700000000, 123000000), (2**34 + 5, 0), (-2, 500000000),
]


def _js_literal(value):
    """The value as a JS expression (bytes → Uint8Array from base64)."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    if isinstance(value, bytes):
        return f"b64('{base64.b64encode(value).decode()}')"
    if isinstance(value, list):
        return "[" + ",".join(_js_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{msgspec.json.encode(k).decode()}:{_js_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def test_msgpack_codec_in_browser(page, server):
    page.goto(server + "/")
    page.wait_for_function("window.MsgPack")
    results = page.evaluate(ROUND_TRIP_JS)
    failed = [name for name, ok, _ in results if not ok]
    assert not failed, f"round trip failed for {failed}"

    exprs = [_js_literal(v) for v in VECTORS] + [f"{v}n" for v in BIG_INTS]
    exprs += [f"new Date({s * 1000 + ns // 1_000_000})" for s, ns in STAMPS]
    expected = [msgspec.msgpack.encode(v) for v in VECTORS + BIG_INTS]
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    expected += [msgspec.msgpack.encode(epoch + datetime.timedelta(seconds=s, microseconds=ns // 1000)) for s, ns in STAMPS]
    script = (
        "() => { const b64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));"
        "const hex = (u) => Array.from(u, (x) => x.toString(16).padStart(2, '0')).join('');"
        f"return [{','.join(exprs)}].map((v) => hex(MsgPack.encode(v))); }}"
    )
    got = page.evaluate(script)
    for expr, want, have in zip(exprs, expected, got):
        assert have == want.hex(), f"{expr[:60]}: JS {have[:80]} != msgspec {want.hex()[:80]}"

    # and the decoder reads msgspec's bytes back to the same values (compared through JSON)
    hexes = [e.hex() for e in expected[: len(VECTORS)]]
    decoded = page.evaluate(
        """(hexes) => hexes.map((h) => {
            const u = new Uint8Array(h.match(/../g) || []).map((_, i) => parseInt(h.substr(i * 2, 2), 16));
            const v = MsgPack.decode(u);
            return JSON.stringify(v, (k, x) => x instanceof Uint8Array ? {bin: Array.from(x).slice(0, 4), n: x.length} : x);
        })""",
        hexes,
    )
    for value, text in zip(VECTORS, decoded):
        def plain(v):
            if isinstance(v, bytes):
                return {"bin": list(v[:4]), "n": len(v)}
            if isinstance(v, list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        assert msgspec.json.decode(text) == plain(value)
    # 64-bit and timestamps decoded from msgspec's bytes
    assert page.evaluate(f"String(MsgPack.decode(new Uint8Array({list(expected[len(VECTORS)])})))") == str(2**63)
    stamp = expected[len(VECTORS) + len(BIG_INTS) + 2]
    assert page.evaluate(f"MsgPack.decode(new Uint8Array({list(stamp)})).getTime()") == 1700000000123
