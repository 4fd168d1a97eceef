/* Frame decoder worker: raw RGB24 and delta-gzip (gzip + XOR chain) -> RGBA frames for ImageData.
 *
 * Messages in:  {op:"reset"}  |  {op:"decode", id, encoding, payload:ArrayBuffer, offset?, length?,
 *               num_frames, width, height, bytes_per_frame, delta_reference}  (payload bytes are
 *               payload[offset : offset+length], so a whole received message can be transferred)
 * Messages out: {id, ok:true, frames:[ArrayBuffer RGBA...], width, height, decode_ms}
 *               | {id, ok:false, error}
 * The delta reference (the last decoded RGB frame) lives here, so batches must arrive in order.
 */
"use strict";

let reference = null; // Uint8Array, RGB of the last frame of the previous batch

async function gunzip(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function rgbToRgba(rgb, offset, pixels) {
  const out = new Uint8ClampedArray(pixels * 4);
  const out32 = new Uint32Array(out.buffer);
  // little-endian ABGR words: alpha 255 in the top byte
  for (let p = 0, s = offset; p < pixels; p++, s += 3) {
    out32[p] = 0xff000000 | (rgb[s + 2] << 16) | (rgb[s + 1] << 8) | rgb[s];
  }
  return out.buffer;
}

function xorInPlace(target, targetOffset, source, sourceOffset, length) {
  // 4 bytes at a time where aligned, then the tail
  let i = 0;
  if ((target.byteOffset + targetOffset) % 4 === 0 && (source.byteOffset + sourceOffset) % 4 === 0) {
    const words = length >> 2;
    const t32 = new Uint32Array(target.buffer, target.byteOffset + targetOffset, words);
    const s32 = new Uint32Array(source.buffer, source.byteOffset + sourceOffset, words);
    for (let w = 0; w < words; w++) t32[w] ^= s32[w];
    i = words << 2;
  }
  for (; i < length; i++) target[targetOffset + i] ^= source[sourceOffset + i];
}

async function decode(msg) {
  const { encoding, num_frames: n, width, height } = msg;
  const frameBytes = width * height * 3;
  if (msg.bytes_per_frame != null && msg.bytes_per_frame !== frameBytes) {
    throw new Error(`bytes_per_frame=${msg.bytes_per_frame} but ${width}x${height}x3=${frameBytes}`);
  }
  let data = new Uint8Array(msg.payload, msg.offset || 0, msg.length == null ? undefined : msg.length);
  if (encoding === "delta-gzip") {
    data = await gunzip(data);
    if (data.length !== frameBytes * n) {
      throw new Error(`delta-gzip inflates to ${data.length} bytes, expected ${frameBytes} x ${n}`);
    }
    if (msg.delta_reference != null) {
      if (msg.delta_reference !== "previous-frame") throw new Error(`unknown delta_reference ${msg.delta_reference}`);
      if (!reference || reference.length !== frameBytes) throw new Error("delta batch without a previous frame");
      xorInPlace(data, 0, reference, 0, frameBytes);
    }
    for (let f = 1; f < n; f++) xorInPlace(data, f * frameBytes, data, (f - 1) * frameBytes, frameBytes);
    reference = data.slice((n - 1) * frameBytes, n * frameBytes);
  } else if (encoding === "raw") {
    if (data.length !== frameBytes * n) throw new Error(`raw payload has ${data.length} bytes, expected ${frameBytes * n}`);
  } else {
    throw new Error(`worker cannot decode encoding ${encoding}`);
  }
  const frames = [];
  for (let f = 0; f < n; f++) frames.push(rgbToRgba(data, f * frameBytes, width * height));
  return frames;
}

async function handle(msg) {
  if (msg.op === "reset") {
    reference = null;
    return;
  }
  const t0 = performance.now();
  try {
    const frames = await decode(msg);
    self.postMessage(
      { id: msg.id, ok: true, frames, width: msg.width, height: msg.height, decode_ms: performance.now() - t0 },
      frames,
    );
  } catch (err) {
    if (msg.encoding === "delta-gzip") reference = null;
    self.postMessage({ id: msg.id, ok: false, error: String(err && err.message ? err.message : err) });
  }
}

// Handled one at a time, in arrival order: each delta batch needs the one before it decoded.
let chain = Promise.resolve();
self.onmessage = (event) => {
  chain = chain.then(() => handle(event.data));
};
