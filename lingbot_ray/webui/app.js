/* lingbot_ray realtime WebUI: init form, camera controls, playback, stats, log, recording.
 * Protocol: docs/PROTOCOL.md of this repository (every message is a binary MessagePack map). Frames
 * come as WebSocket messages drawn on the canvas, or (transport "webrtc") as a WebRTC video track
 * shown by a <video> element, with the same events and chunk_stats on a data channel.
 */
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const WS_PATH = "/v1/realtime_video/generate";
  const WEBRTC_PATH = "/v1/realtime_video/webrtc";
  const ICE_GATHERING_WAIT_MS = 2000;
  // The camera pads: which pad a motion kind goes on, and where a motion sits on it, by axis and
  // sign ([+1 slot, -1 slot]). The tokens, labels and keys come from the server (GET /v1/actions).
  const PADS = { translate: { id: "move-pad", title: "move" }, rotate: { id: "look-pad", title: "look" } };
  const PAD_SLOTS = {
    "translate z": ["up", "down"], "translate x": ["right", "left"],
    "rotate x": ["up", "down"], "rotate y": ["right", "left"],
  };
  const SLOT_ORDER = ["up", "left", "down", "right"];
  const GLYPHS = { up: "▲", left: "◀", down: "▼", right: "▶" };
  const SAMPLES = [
    { file: "samples/world-plaza.png", label: "plaza" },
    { file: "samples/world-pillars.png", label: "pillars" },
    { file: "samples/world-bricks.png", label: "bricks" },
    { file: "samples/world-dusk.png", label: "dusk" },
  ];
  const PLOT_POINTS = 60;
  const asset = (path) => path + (window.LINGBOT_ASSET_QUERY || "");

  const ui = {
    serverUrl: $("server-url"), apiKeyRow: $("api-key-row"), apiKey: $("api-key"), model: $("model"),
    prompt: $("prompt"), firstFrame: $("first-frame"), preview: $("first-frame-preview"), samples: $("samples"),
    size: $("size"), fps: $("fps"), numFrames: $("num-frames"), seed: $("seed"), steps: $("steps"),
    guidance: $("guidance"), sink: $("sink"), window: $("window"), transport: $("transport"),
    compression: $("compression"), vaeQuality: $("vae-quality"), queueSize: $("queue-size"),
    upscale: $("upscale"), upscaleScale: $("upscale-scale"), interpolate: $("interpolate"),
    continuous: $("continuous"), maxChunks: $("max-chunks"), start: $("start"), stop: $("stop"),
    record: $("record"), download: $("download"), status: $("status"), screen: $("screen"), plot: $("plot"),
    log: $("log"), livePrompt: $("live-prompt"), sendPrompt: $("send-prompt"), held: $("held"),
    video: $("video"), videoCodec: $("video-codec"), videoKbps: $("video-kbps"),
  };
  const ctx = ui.screen.getContext("2d");

  // ------------------------------------------------------------------------------ state

  const state = {
    ws: null,
    live: false,
    firstFrameBytes: null,
    firstFrameName: "",
    held: new Set(),
    actions: [], // the server's action table: [{token, kind, axis, sign, label, keys, bit}]
    keyActions: new Map(), // KeyboardEvent.key (lower case) -> token
    eventId: 0,
    sessionT0: 0,
    pendingEvents: [], // [{id, t, kind}]: sent, no message has echoed them yet
    unshown: [], // [{id, t}]: sent, no frame generated with them has been on screen yet
    rtc: null, // the WebRTC session: {pc, channel, statsTimer}
    rtcFramesBefore: 0, // frames of the video's earlier chunks: where the next chunk starts
    rtcShownAt: new Map(), // presented frame number (1, 2, ...) -> when
    rtcAwaiting: [], // [{frame, eventId}]: chunks whose first frame has not been presented yet
    glassSamples: [], // [{id, ms}]: event sent -> the first frame of its chunk on screen
    queue: [], // [{image, chunk, eventId}]
    dropped: 0,
    fps: 16,
    nextDue: 0,
    drawTimes: [],
    framesDrawn: 0,
    stats: null,
    plot: [],
    decodeChain: Promise.resolve(),
    worker: null,
    workerJobs: new Map(),
    workerSeq: 0,
    recorder: null,
    recordChunks: [],
    lastStatsRender: 0,
    generation: 0, // bumps per session so late decodes of an old session are ignored
  };

  function freshStats() {
    return {
      chunks: 0, framesReceived: 0, renderFps: 0, generatedFps: null, chunkMs: null, forwardMs: null,
      eventLatencyMs: null, lastEventId: null, glassMs: null, glassEventId: null,
      bytesThisChunk: 0, bytesPerChunk: null, wsPayloadBytes: null,
      decodeMs: null, decodeMsSum: 0, decodeBatches: 0, lastStatsAt: null, width: 0, height: 0, errors: 0,
      closeCode: null, closeReason: "", lastError: null,
    };
  }
  state.stats = freshStats();

  // ------------------------------------------------------------------------------ log

  function log(text, kind = "info") {
    const li = document.createElement("li");
    const t = new Date().toISOString().slice(11, 23);
    li.textContent = `${t} ${text}`;
    li.className = kind;
    ui.log.prepend(li);
    while (ui.log.children.length > 300) ui.log.lastChild.remove();
  }

  function setStatus(text, cls) {
    ui.status.textContent = text;
    ui.status.className = `status ${cls}`;
  }

  // ------------------------------------------------------------------------------ server / auth

  function defaultServer() {
    const origin = window.location.origin;
    return origin && origin.startsWith("http") ? origin : "http://127.0.0.1:8000";
  }

  function httpBase() {
    let url = ui.serverUrl.value.trim() || defaultServer();
    url = url.replace(/^ws(s?):\/\//i, "http$1://").replace(/\/+$/, "");
    if (url.endsWith(WS_PATH)) url = url.slice(0, -WS_PATH.length);
    return url;
  }

  function keyQuery() {
    const key = ui.apiKey.value.trim();
    return key ? `?api_key=${encodeURIComponent(key)}` : "";
  }

  function wsUrl() {
    return httpBase().replace(/^http(s?):\/\//i, "ws$1://") + WS_PATH + keyQuery();
  }

  function showKeyField(reason) {
    if (ui.apiKeyRow.hidden) {
      ui.apiKeyRow.hidden = false;
      log(`server asks for an API key (${reason}); enter it above`, "error");
    }
    ui.apiKey.focus();
  }

  async function loadModels() {
    const url = `${httpBase()}/v1/models${keyQuery()}`;
    try {
      const response = await fetch(url, { cache: "no-store" });
      if (response.status === 401) {
        showKeyField("401 on /v1/models");
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      const ids = (body.data || []).map((card) => card.id).filter(Boolean);
      const previous = ui.model.value;
      ui.model.innerHTML = "";
      for (const id of ids) ui.model.add(new Option(id, id));
      ui.model.add(new Option("(served model)", ""));
      ui.model.value = ids.includes(previous) ? previous : ids[0] || "";
      log(`models: ${ids.join(", ") || "(none)"}`);
    } catch (err) {
      log(`could not read ${httpBase()}/v1/models: ${err.message}`, "error");
      // Cross-origin, a 401 carries no CORS header and shows up as a network error: offer the key.
      let crossOrigin = false;
      try { crossOrigin = new URL(httpBase()).origin !== window.location.origin; } catch (_) { /* bad URL: logged above */ }
      if (!ui.apiKey.value.trim() && crossOrigin) showKeyField("unreadable /v1/models");
    }
  }

  // ------------------------------------------------------------------------------ camera actions

  async function loadActions() {
    const url = `${httpBase()}/v1/actions${keyQuery()}`;
    try {
      const response = await fetch(url, { cache: "no-store" });
      if (response.status === 401) showKeyField("401 on /v1/actions");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      setActions((await response.json()).actions);
      if (ui.status.textContent === "no camera controls") setStatus("idle", "idle");
      log(`camera actions: ${state.actions.map((m) => `${m.token} ${m.label}`).join(", ")}`);
    } catch (err) {
      setActions([]);
      setStatus("no camera controls", "error");
      log(`no camera controls: could not read ${httpBase()}/v1/actions: ${err.message}`, "error");
    }
  }

  function setActions(actions) {
    state.actions = actions;
    state.keyActions = new Map();
    for (const motion of actions) {
      for (const key of [motion.token, ...motion.keys]) state.keyActions.set(key, motion.token);
    }
    state.held.clear();
    for (const [kind, pad] of Object.entries(PADS)) buildPad($(pad.id), pad.title, actions.filter((m) => m.kind === kind));
    paintPads();
  }

  function buildPad(element, title, motions) {
    const placed = motions
      .map((motion) => ({ motion, slot: PAD_SLOTS[`${motion.kind} ${motion.axis}`][motion.sign > 0 ? 0 : 1] }))
      .sort((a, b) => SLOT_ORDER.indexOf(a.slot) - SLOT_ORDER.indexOf(b.slot));
    const heading = document.createElement("span");
    heading.className = "pad-title";
    const arrows = motions.some((m) => m.keys.some((k) => k.startsWith("arrow"))) ? "arrows / " : "";
    heading.textContent = `${title} (${arrows}${placed.map((p) => p.motion.token.toUpperCase()).join(" ")})`;
    element.replaceChildren(heading);
    for (const { motion, slot } of placed) {
      const key = document.createElement("button");
      key.type = "button";
      key.className = `key ${slot}`;
      key.dataset.action = motion.token;
      key.title = motion.label;
      key.textContent = motion.kind === "rotate" ? GLYPHS[slot] : motion.token.toUpperCase();
      bindPadKey(key, motion.token);
      element.append(key);
    }
  }

  // ------------------------------------------------------------------------------ first frame

  async function selectSample(sample, img) {
    for (const other of ui.samples.querySelectorAll("img")) other.classList.toggle("selected", other === img);
    const response = await fetch(asset(sample.file));
    state.firstFrameBytes = new Uint8Array(await response.arrayBuffer());
    state.firstFrameName = sample.label;
    ui.preview.src = asset(sample.file);
  }

  function buildSamples() {
    SAMPLES.forEach((sample, index) => {
      const img = document.createElement("img");
      img.src = asset(sample.file);
      img.alt = img.title = sample.label;
      img.addEventListener("click", () => selectSample(sample, img));
      ui.samples.append(img);
      if (index === 0) selectSample(sample, img).catch((err) => log(`sample: ${err.message}`, "error"));
    });
  }

  ui.firstFrame.addEventListener("change", async () => {
    const file = ui.firstFrame.files[0];
    if (!file) return;
    state.firstFrameBytes = new Uint8Array(await file.arrayBuffer());
    state.firstFrameName = file.name;
    for (const img of ui.samples.querySelectorAll("img")) img.classList.remove("selected");
    ui.preview.src = URL.createObjectURL(file);
    log(`first frame: ${file.name} (${file.size} bytes)`);
  });

  // ------------------------------------------------------------------------------ init message

  // an input's number (undefined when empty); anything else than an integer (or a finite number) throws
  function numberField(input, integer) {
    const text = input.value.trim();
    if (text === "") return undefined;
    const value = Number(text);
    if (!(integer ? Number.isInteger(value) : Number.isFinite(value))) {
      throw new Error(`${input.id} must be ${integer ? "an integer" : "a number"}`);
    }
    return value;
  }
  const intField = (input) => numberField(input, true);
  const numField = (input) => numberField(input, false);

  function buildInit() {
    const transport = ui.transport.value;
    const msg = {
      type: "init",
      prompt: ui.prompt.value,
      model: ui.model.value || undefined,
      first_frame: state.firstFrameBytes || undefined,
      size: ui.size.value.trim() || undefined,
      fps: numField(ui.fps),
      num_frames: intField(ui.numFrames),
      seed: intField(ui.seed),
      num_inference_steps: intField(ui.steps),
      guidance_scale: numField(ui.guidance),
      realtime_causal_sink_size: intField(ui.sink),
      realtime_causal_kv_cache_num_frames: intField(ui.window),
      quality: ui.vaeQuality.value,
    };
    if (transport === "webp" || transport === "jpeg") {
      msg.realtime_output_format = transport;
      msg.output_compression = intField(ui.compression);
    } else if (transport === "raw") {
      msg.realtime_output_format = "raw";
    } // lossless delta-gzip: field absent
    if (ui.upscale.checked) {
      msg.enable_upscaling = true;
      msg.upscaling_scale = intField(ui.upscaleScale);
    }
    if (ui.interpolate.checked) {
      msg.enable_frame_interpolation = true;
      msg.frame_interpolation_exp = 1;
    }
    if (!ui.continuous.checked) msg.max_chunks = intField(ui.maxChunks);
    return msg;
  }

  ui.continuous.addEventListener("change", () => { ui.maxChunks.disabled = ui.continuous.checked; });
  ui.transport.addEventListener("change", () => {
    const still = ui.transport.value === "webp" || ui.transport.value === "jpeg";
    ui.compression.disabled = !still;
    if (still) ui.compression.value = ui.transport.value === "jpeg" ? 95 : 90;
    ui.videoCodec.disabled = ui.videoKbps.disabled = ui.transport.value !== "webrtc";
  });

  // ------------------------------------------------------------------------------ session

  function send(message) {
    if (state.rtc) {
      if (state.rtc.channel.readyState !== "open") return false;
      state.rtc.channel.send(MsgPack.encode(message));
      return true;
    }
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
    state.ws.send(MsgPack.encode(message));
    return true;
  }

  function ensureWorker() {
    if (state.worker) return state.worker;
    const worker = new Worker(asset("decoder-worker.js"));
    worker.onmessage = (event) => {
      const job = state.workerJobs.get(event.data.id);
      if (!job) return;
      state.workerJobs.delete(event.data.id);
      if (event.data.ok) job.resolve(event.data);
      else job.reject(new Error(event.data.error));
    };
    worker.onerror = (event) => log(`decoder worker: ${event.message}`, "error");
    state.worker = worker;
    return worker;
  }

  function startSession(event) {
    if (event) event.preventDefault();
    if (state.ws || state.rtc) return;
    let init;
    try {
      init = buildInit();
    } catch (err) {
      log(`invalid field: ${err.message}`, "error");
      return;
    }
    state.generation += 1;
    state.stats = freshStats();
    state.plot = [];
    state.queue = [];
    state.dropped = 0;
    state.eventId = 0;
    state.pendingEvents = [];
    state.unshown = [];
    state.glassSamples = [];
    state.framesDrawn = 0;
    state.drawTimes = [];
    state.fps = init.fps || 16;
    state.decodeChain = Promise.resolve();
    ensureWorker().postMessage({ op: "reset" });
    const webrtc = ui.transport.value === "webrtc";
    ui.screen.hidden = webrtc;
    ui.video.hidden = !webrtc;
    if (webrtc) {
      startWebRTC(init);
      return;
    }
    const url = wsUrl();
    log(`connecting ${url.replace(/api_key=[^&]*/, "api_key=…")}`);
    setStatus("connecting", "connecting");
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    const generation = state.generation;
    ws.onopen = () => {
      state.sessionT0 = performance.now();
      ws.send(MsgPack.encode(init));
      state.live = true;
      setStatus("live", "live");
      const described = { ...init, first_frame: init.first_frame ? `<${init.first_frame.length} bytes ${state.firstFrameName}>` : undefined };
      log(`init sent: ${JSON.stringify(described)}`, "event");
      setButtons();
      if (state.held.size) sendHeld(); // keys already held when the session starts
    };
    ws.onmessage = (message) => {
      if (generation !== state.generation) return;
      handleMessage(message.data);
    };
    ws.onerror = () => log("websocket error", "error");
    ws.onclose = (close) => {
      state.stats.closeCode = close.code;
      state.stats.closeReason = close.reason;
      log(`closed: code ${close.code}${close.reason ? ` reason "${close.reason}"` : ""}`, "close");
      if (close.code === 1008) showKeyField("websocket closed 1008");
      if (state.ws === ws) {
        state.ws = null;
        state.live = false;
      }
      const clean = close.code === 1000 || close.code === 1005;
      if (!(clean && ui.status.textContent === "init rejected")) setStatus(`closed ${close.code}`, clean ? "idle" : "error");
      setButtons();
    };
    setButtons();
  }

  function stopSession() {
    if (state.rtc) {
      log("closing session (client stop)");
      endWebRTC(state.rtc, "client stop");
    }
    if (state.ws) {
      log("closing session (client stop)");
      state.ws.close(1000, "client stop");
    }
  }

  // ------------------------------------------------------------------------------ WebRTC

  // The offer goes out with the init (POST /v1/realtime_video/webrtc) and the answer comes back once
  // the server holds the session; frames then arrive as a video track, messages on the data channel.
  async function startWebRTC(init) {
    const pc = new RTCPeerConnection();
    const channel = pc.createDataChannel("lingbot");
    channel.binaryType = "arraybuffer";
    const rtc = { pc, channel, statsTimer: null, ended: false };
    state.rtc = rtc;
    state.rtcFramesBefore = 0;
    state.rtcShownAt = new Map();
    state.rtcAwaiting = [];
    const generation = state.generation;
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.ontrack = (event) => {
      ui.video.srcObject = event.streams[0] || new MediaStream([event.track]);
      watchVideo(rtc);
    };
    channel.onopen = () => {
      state.sessionT0 = performance.now();
      state.live = true;
      setStatus("live", "live");
      setButtons();
      if (state.held.size) sendHeld(); // keys already held when the session starts
    };
    channel.onmessage = (message) => {
      if (generation === state.generation) handleMessage(message.data);
    };
    channel.onclose = () => endWebRTC(rtc, "data channel closed");
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed" || pc.connectionState === "closed") endWebRTC(rtc, `peer connection ${pc.connectionState}`);
    };
    setStatus("connecting", "connecting");
    setButtons();
    try {
      const video = videoOptions();
      await pc.setLocalDescription(await pc.createOffer());
      await iceGathered(pc);
      const fields = { ...init }; // the init's fields; the offer has its own type
      delete fields.type;
      const url = httpBase() + WEBRTC_PATH + keyQuery();
      log(`offering ${url.replace(/api_key=[^&]*/, "api_key=…")} (${video.codec})`);
      const offer = { type: "offer", sdp: pc.localDescription.sdp, init: fields, video };
      const response = await fetch(url, { method: "POST", headers: { "content-type": "application/msgpack" }, body: MsgPack.encode(offer) });
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) {
        const error = answer.error || {};
        state.stats.errors += 1;
        log(`server error: HTTP ${response.status} ${error.message || ""}${error.detail ? ` (${error.detail})` : ""}`, "error");
        if (response.status === 401) showKeyField("401 on the offer");
        endWebRTC(rtc, `offer refused (HTTP ${response.status})`, response.status);
        if (response.status === 400) setStatus("init rejected", "error");
        return;
      }
      if (rtc.ended) return;
      const v = answer.video;
      log(`answer: session ${answer.session_id}, ${v.codec} ${Math.round(v.bitrate / 1000)} kbps, keyframe every ${v.keyframe_interval_s} s`, "event");
      await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
      rtc.statsTimer = setInterval(() => readRtcStats(rtc), 1000);
    } catch (err) {
      log(`webrtc: ${err.message}`, "error");
      endWebRTC(rtc, err.message, 0);
    }
  }

  function videoOptions() {
    const kbps = numField(ui.videoKbps);
    return { codec: ui.videoCodec.value, bitrate: kbps === undefined ? undefined : Math.round(kbps * 1000) };
  }

  // The offer carries the browser's candidates when gathering ends in time; if not, the server
  // still learns the browser's address from its connectivity checks.
  function iceGathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      pc.addEventListener("icegatheringstatechange", () => { if (pc.iceGatheringState === "complete") resolve(); });
      setTimeout(resolve, ICE_GATHERING_WAIT_MS);
    });
  }

  function endWebRTC(rtc, why, code) {
    if (rtc.ended) return;
    rtc.ended = true;
    clearInterval(rtc.statsTimer);
    rtc.channel.close();
    rtc.pc.close();
    if (state.rtc === rtc) {
      state.rtc = null;
      state.live = false;
    }
    // A data channel has no close code: a refused offer reports its HTTP status, a session that
    // ends after a server error 1011, any other end 1000.
    state.stats.closeCode = code !== undefined ? code : state.stats.lastError ? 1011 : 1000;
    state.stats.closeReason = why;
    log(`closed: ${why}`, "close");
    setStatus(`closed (${why})`, state.stats.closeCode === 1000 ? "idle" : "error");
    setButtons();
  }

  // Every frame the <video> presents: the render rate, the size, and when each frame number was
  // presented, which tells when a chunk's first frame reached the screen.
  function watchVideo(rtc) {
    const video = ui.video;
    if (!video.requestVideoFrameCallback) return;
    let last = 0;
    const onFrame = (now, meta) => {
      if (state.rtc !== rtc) return;
      for (let n = last + 1; n <= meta.presentedFrames; n += 1) state.rtcShownAt.set(n, meta.presentationTime);
      state.framesDrawn += Math.max(0, meta.presentedFrames - last);
      last = Math.max(last, meta.presentedFrames);
      state.drawTimes.push(now);
      state.stats.width = meta.width;
      state.stats.height = meta.height;
      settleShown();
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }

  function settleShown() {
    while (state.rtcAwaiting.length && state.rtcShownAt.has(state.rtcAwaiting[0].frame)) {
      const { frame, eventId } = state.rtcAwaiting.shift();
      if (eventId != null) onEventShown(eventId, state.rtcShownAt.get(frame));
    }
    const keep = state.rtcAwaiting.length ? state.rtcAwaiting[0].frame : state.rtcFramesBefore + 1;
    for (const n of state.rtcShownAt.keys()) {
      if (n >= keep) break;
      state.rtcShownAt.delete(n);
    }
  }

  async function readRtcStats(rtc) {
    if (rtc.ended) return;
    const report = await rtc.pc.getStats();
    report.forEach((entry) => {
      if (entry.type !== "inbound-rtp" || entry.kind !== "video" || !entry.framesDecoded) return;
      const s = state.stats;
      s.decodeMsSum = 1000 * entry.totalDecodeTime;
      s.decodeBatches = entry.framesDecoded;
      s.decodeMs = s.decodeMsSum / s.decodeBatches;
    });
  }

  function setButtons() {
    const open = !!(state.ws || state.rtc);
    ui.start.disabled = open;
    ui.stop.disabled = !open;
    ui.sendPrompt.disabled = !state.live;
    ui.record.disabled = !open && !state.recorder;
  }

  // ------------------------------------------------------------------------------ messages

  function handleMessage(data) {
    let msg;
    try {
      msg = MsgPack.decode(new Uint8Array(data));
    } catch (err) {
      log(`undecodable message: ${err.message}`, "error");
      return;
    }
    if (msg.type === "frame_batch") return onFrameBatch(msg, data.byteLength);
    if (msg.type === "chunk_stats") return onChunkStats(msg);
    if (msg.type === "error") {
      state.stats.errors += 1;
      state.stats.lastError = msg.content;
      log(`server error: ${msg.content}${msg.detail ? ` (${msg.detail})` : ""}`, "error");
      if (/api key/i.test(msg.content || "")) showKeyField("server error");
      if (msg.content === "invalid generate request" && !state.stats.chunks && !state.stats.framesReceived && state.ws) {
        // the server keeps waiting for a valid init; end this attempt so the fields can be fixed
        setStatus("init rejected", "error");
        state.ws.close(1000, "init rejected");
      }
      return;
    }
    log(`unknown message type ${msg.type}`, "error");
  }

  function onFrameBatch(msg, wireBytes) {
    const stats = state.stats;
    stats.bytesThisChunk += wireBytes;
    stats.framesReceived += msg.num_frames;
    if (msg.fps) state.fps = msg.fps;
    if (msg.event_id != null) onEventVisible(msg.event_id);
    const generation = state.generation;
    const decode = decodeBatch(msg);
    // keep frames in arrival order whatever each decode takes
    state.decodeChain = state.decodeChain.then(() => decode).then(
      ({ frames, ms, width, height }) => {
        if (generation !== state.generation) return;
        stats.decodeMs = ms;
        stats.decodeMsSum += ms;
        stats.decodeBatches += 1;
        stats.width = width;
        stats.height = height;
        for (const image of frames) enqueue({ image, chunk: msg.chunk_index, eventId: msg.event_id });
      },
      (err) => log(`decode failed (chunk ${msg.chunk_index}, ${msg.encoding}): ${err.message}`, "error"),
    );
  }

  function decodeBatch(msg) {
    const t0 = performance.now();
    if (msg.encoding === "webp" || msg.encoding === "jpeg") {
      const lengths = msg.payload_lengths || [];
      let offset = 0;
      const jobs = lengths.map((length) => {
        const part = msg.payload.subarray(offset, offset + length);
        offset += length;
        return createImageBitmap(new Blob([part], { type: msg.content_type }));
      });
      if (offset !== msg.payload.length) return Promise.reject(new Error("payload_lengths do not add up"));
      return Promise.all(jobs).then((frames) => ({
        frames, ms: performance.now() - t0,
        width: msg.preview_width || frames[0].width, height: msg.preview_height || frames[0].height,
      }));
    }
    if (msg.encoding === "raw" || msg.encoding === "delta-gzip") {
      const id = ++state.workerSeq;
      // the payload is a view into the received message: hand the whole buffer over, no copy
      const payload = msg.payload.buffer;
      const promise = new Promise((resolve, reject) => state.workerJobs.set(id, { resolve, reject }));
      ensureWorker().postMessage({
        op: "decode", id, encoding: msg.encoding, payload, offset: msg.payload.byteOffset, length: msg.payload.byteLength,
        num_frames: msg.num_frames, width: msg.width, height: msg.height, bytes_per_frame: msg.bytes_per_frame,
        delta_reference: msg.delta_reference,
      }, [payload]);
      return promise.then((result) => ({
        frames: result.frames.map((buffer) => new ImageData(new Uint8ClampedArray(buffer), result.width, result.height)),
        ms: performance.now() - t0, width: result.width, height: result.height,
      }));
    }
    return Promise.reject(new Error(`unknown encoding ${msg.encoding}`));
  }

  function onChunkStats(msg) {
    const stats = state.stats;
    const now = performance.now();
    stats.chunks += 1;
    stats.chunkMs = msg.chunk_total_ms;
    stats.forwardMs = msg.scheduler_forward_ms;
    stats.wsPayloadBytes = msg.ws_payload_bytes;
    stats.bytesPerChunk = stats.bytesThisChunk;
    stats.bytesThisChunk = 0;
    const interval = stats.lastStatsAt == null ? msg.chunk_total_ms : now - stats.lastStatsAt;
    if (interval > 0) stats.generatedFps = (msg.num_frames * 1000) / interval;
    stats.lastStatsAt = now;
    stats.lastError = null;
    if (msg.fps) state.fps = msg.fps;
    if (state.rtc) {
      // the frames went as video: the chunk's size is the server's count; its first frame is the
      // one presented after every frame of the earlier chunks
      stats.bytesPerChunk = msg.ws_payload_bytes;
      stats.framesReceived += msg.num_frames;
      state.rtcAwaiting.push({ frame: state.rtcFramesBefore + 1, eventId: msg.event_id });
      state.rtcFramesBefore += msg.num_frames;
      settleShown();
    }
    state.plot.push(msg.chunk_total_ms);
    if (state.plot.length > PLOT_POINTS) state.plot.shift();
    drawPlot();
    if (msg.event_id != null) onEventVisible(msg.event_id);
  }

  // Remove the events up to ``eventId`` from ``state[key]``; the latest of them, or null
  function takeUpTo(key, eventId) {
    const taken = state[key].filter((e) => e.id <= eventId);
    state[key] = state[key].filter((e) => e.id > eventId);
    return taken.length ? taken[taken.length - 1] : null;
  }

  function onEventVisible(eventId) {
    const now = performance.now();
    const latest = takeUpTo("pendingEvents", eventId);
    if (!latest) return;
    state.stats.eventLatencyMs = now - latest.t;
    state.stats.lastEventId = latest.id;
    log(`event ${latest.id} (${latest.kind}) visible after ${Math.round(now - latest.t)} ms`, "event");
  }

  // ``t``: when the first frame generated with ``eventId`` (or a later event) was put on screen
  function onEventShown(eventId, t) {
    const latest = takeUpTo("unshown", eventId);
    if (!latest) return;
    state.stats.glassMs = t - latest.t;
    state.stats.glassEventId = latest.id;
    state.glassSamples.push({ id: latest.id, ms: t - latest.t });
  }

  // ------------------------------------------------------------------------------ playback

  function capacity() {
    const n = Number(ui.queueSize.value);
    return Number.isInteger(n) && n > 0 ? n : 24;
  }

  function release(frame) {
    if (frame.image && typeof frame.image.close === "function") frame.image.close();
  }

  function enqueue(frame) {
    const cap = capacity();
    while (state.queue.length >= cap) {
      release(state.queue.shift());
      state.dropped += 1;
    }
    state.queue.push(frame);
  }

  function drawFrame(frame) {
    const image = frame.image;
    const width = image.width;
    const height = image.height;
    if (ui.screen.width !== width || ui.screen.height !== height) {
      ui.screen.width = width;
      ui.screen.height = height;
    }
    if (image instanceof ImageData) ctx.putImageData(image, 0, 0);
    else ctx.drawImage(image, 0, 0);
    release(frame);
    if (frame.eventId != null) onEventShown(frame.eventId, performance.now());
    state.framesDrawn += 1;
    state.drawTimes.push(performance.now());
  }

  function tick(now) {
    const interval = 1000 / Math.max(1, state.fps);
    if (state.queue.length) {
      if (now >= state.nextDue) {
        drawFrame(state.queue.shift());
        state.nextDue = now - state.nextDue > interval ? now + interval : state.nextDue + interval;
      }
    } else if (now > state.nextDue) {
      state.nextDue = now; // an empty queue must not bank time for a burst later
    }
    while (state.drawTimes.length && state.drawTimes[0] < now - 1000) state.drawTimes.shift();
    state.stats.renderFps = state.drawTimes.length;
    if (now - state.lastStatsRender > 200) {
      state.lastStatsRender = now;
      renderStats();
    }
    requestAnimationFrame(tick);
  }

  function fmt(value, digits = 0, unit = "") {
    return value == null || Number.isNaN(value) ? "—" : `${value.toFixed(digits)}${unit}`;
  }

  function bytes(n) {
    if (n == null) return "—";
    if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(2)} MiB`;
    if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${n} B`;
  }

  function renderStats() {
    const s = state.stats;
    $("st-render-fps").textContent = `${s.renderFps} / ${fmt(state.fps, 0)}`;
    $("st-gen-fps").textContent = fmt(s.generatedFps, 1);
    $("st-chunk-ms").textContent = fmt(s.chunkMs, 0, " ms");
    $("st-forward-ms").textContent = fmt(s.forwardMs, 0, " ms");
    $("st-event-ms").textContent = s.eventLatencyMs == null ? "—" : `${Math.round(s.eventLatencyMs)} ms (#${s.lastEventId})`;
    $("st-glass-ms").textContent = s.glassMs == null ? "—" : `${Math.round(s.glassMs)} ms (#${s.glassEventId})`;
    $("st-queue").textContent = `${state.queue.length}/${capacity()} · ${state.dropped} dropped`;
    $("st-bytes").textContent = bytes(s.bytesPerChunk);
    $("st-bytes").title = `messages on the wire; payload ${bytes(s.wsPayloadBytes)} (server's ws_payload_bytes)`;
    $("st-decode-ms").textContent = s.decodeBatches ? `${s.decodeMs.toFixed(1)} (avg ${(s.decodeMsSum / s.decodeBatches).toFixed(1)})` : "—";
    $("st-chunks").textContent = `${s.chunks} / ${s.framesReceived} (drawn ${state.framesDrawn})`;
    $("st-size").textContent = s.width ? `${s.width}×${s.height}` : "—";
    const held = [...state.held].join(" ");
    ui.held.textContent = `held: ${held || "—"}`;
  }

  function drawPlot() {
    const c = ui.plot;
    const g = c.getContext("2d");
    const w = c.width;
    const h = c.height;
    g.clearRect(0, 0, w, h);
    const points = state.plot;
    if (!points.length) return;
    const max = Math.max(...points) * 1.15 || 1;
    g.strokeStyle = "#2c3340";
    g.fillStyle = "#8a94a6";
    g.font = "10px sans-serif";
    g.beginPath();
    g.moveTo(0, h / 2);
    g.lineTo(w, h / 2);
    g.stroke();
    g.fillText(`${Math.round(max)} ms`, 4, 11);
    g.fillText(`${Math.round(max / 2)} ms`, 4, h / 2 - 2);
    g.fillText("chunk latency", w - 70, 11);
    g.strokeStyle = "#4fa3ff";
    g.lineWidth = 1.5;
    g.beginPath();
    points.forEach((v, i) => {
      const x = (i / (Math.max(points.length, 20) - 1)) * w;
      const y = h - (v / max) * h;
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    });
    g.stroke();
  }

  // ------------------------------------------------------------------------------ controls

  function actionsNow() {
    const order = state.actions.map((m) => m.token);
    return [...state.held].sort((a, b) => order.indexOf(a) - order.indexOf(b));
  }

  function sendHeld() {
    if (!state.live) return;
    const id = ++state.eventId;
    const actions = actionsNow();
    const ok = send({
      type: "event",
      kind: "camera_actions",
      event_id: id,
      payload: { mode: "state", transitions: [{ actions, client_ts_ms: Math.max(0, Math.round(performance.now() - state.sessionT0)) }] },
    });
    if (ok) {
      const t = performance.now();
      state.pendingEvents.push({ id, t, kind: `camera [${actions.join("")}]` });
      state.unshown.push({ id, t });
      log(`event ${id}: camera state [${actions.join(",")}]`, "event");
    }
  }

  function press(action) {
    if (state.held.has(action)) return;
    state.held.add(action);
    paintPads();
    sendHeld();
  }

  function releaseAction(action) {
    if (!state.held.has(action)) return;
    state.held.delete(action);
    paintPads();
    sendHeld();
  }

  function releaseAll() {
    if (!state.held.size) return;
    state.held.clear();
    paintPads();
    sendHeld();
  }

  function paintPads() {
    for (const key of document.querySelectorAll(".key")) key.classList.toggle("held", state.held.has(key.dataset.action));
    renderStats();
  }

  function typing(target) {
    return target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT" || target.isContentEditable);
  }

  window.addEventListener("keydown", (event) => {
    const action = state.keyActions.get(event.key.toLowerCase());
    if (!action || typing(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;
    event.preventDefault();
    if (!event.repeat) press(action);
  });
  window.addEventListener("keyup", (event) => {
    const action = state.keyActions.get(event.key.toLowerCase());
    if (!action) return;
    releaseAction(action);
  });
  window.addEventListener("blur", releaseAll);
  document.addEventListener("visibilitychange", () => { if (document.hidden) releaseAll(); });

  function bindPadKey(key, action) {
    key.addEventListener("pointerdown", (event) => {
      event.preventDefault();
      key.setPointerCapture(event.pointerId);
      press(action);
    });
    const up = () => releaseAction(action);
    key.addEventListener("pointerup", up);
    key.addEventListener("pointercancel", up);
    key.addEventListener("lostpointercapture", up);
    key.addEventListener("contextmenu", (event) => event.preventDefault());
  }

  $("prompt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.livePrompt.value.trim();
    if (!text || !state.live) return;
    const id = ++state.eventId;
    if (send({ type: "event", kind: "prompt", payload: text, event_id: id })) {
      const t = performance.now();
      state.pendingEvents.push({ id, t, kind: "prompt" });
      state.unshown.push({ id, t });
      log(`event ${id}: prompt "${text}"`, "event");
    }
  });

  // ------------------------------------------------------------------------------ recording

  function toggleRecord() {
    if (state.recorder) {
      state.recorder.stop();
      return;
    }
    const stream = state.rtc && ui.video.srcObject ? ui.video.srcObject : ui.screen.captureStream(Math.max(1, Math.round(state.fps)));
    const type = ["video/webm;codecs=vp9", "video/webm;codecs=vp8", "video/webm"].find((t) => MediaRecorder.isTypeSupported(t));
    const recorder = new MediaRecorder(stream, type ? { mimeType: type } : undefined);
    state.recordChunks = [];
    recorder.ondataavailable = (event) => { if (event.data.size) state.recordChunks.push(event.data); };
    recorder.onstop = () => {
      const blob = new Blob(state.recordChunks, { type: "video/webm" });
      const name = `lingbot-${new Date().toISOString().replace(/[:.]/g, "-")}.webm`;
      ui.download.href = URL.createObjectURL(blob);
      ui.download.download = name;
      ui.download.textContent = `${name} (${bytes(blob.size)})`;
      ui.download.hidden = false;
      ui.download.click();
      log(`recording saved: ${name}, ${bytes(blob.size)}`);
      state.recorder = null;
      ui.record.textContent = "Record";
      ui.record.classList.remove("recording");
      setButtons();
    };
    recorder.start(1000);
    state.recorder = recorder;
    ui.record.textContent = "Stop recording";
    ui.record.classList.add("recording");
    log(`recording (${recorder.mimeType || "video/webm"})`);
  }

  // ------------------------------------------------------------------------------ wiring

  $("init-form").addEventListener("submit", startSession);
  ui.stop.addEventListener("click", stopSession);
  ui.record.addEventListener("click", toggleRecord);
  const loadServer = () => { loadModels(); loadActions(); };
  ui.serverUrl.addEventListener("change", loadServer);
  ui.apiKey.addEventListener("change", loadServer);

  const params = new URLSearchParams(window.location.search);
  ui.serverUrl.value = params.get("server") || defaultServer();
  if (params.get("api_key")) {
    ui.apiKey.value = params.get("api_key");
    ui.apiKeyRow.hidden = false;
  }
  ui.compression.disabled = false;
  buildSamples();
  loadServer();
  setButtons();
  renderStats();
  requestAnimationFrame(tick);

  // a handle for tests and the console
  window.lingbot = { state, ui, buildInit, startSession, stopSession, send, log };
})();
