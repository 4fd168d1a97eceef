/* MessagePack encoder/decoder: the whole format (https://github.com/msgpack/msgpack/blob/master/spec.md).
 *
 * Types: nil, bool, positive/negative fixint, (u)int 8/16/32/64, float 32/64, fixstr/str8/16/32,
 * bin8/16/32, fixarray/array16/32, fixmap/map16/32, fixext1/2/4/8/16, ext8/16/32 and the timestamp
 * extension (type -1, 32/64/96-bit forms).
 *
 * JS mapping:
 *   decode: 64-bit ints -> Number when safe (|v| <= 2^53-1), else BigInt; bin -> Uint8Array (a view of
 *   the input unless {copyBinary:true}); map -> plain object when every key is a string, else Map;
 *   timestamp -> Date when exact at millisecond precision, else MsgPack.Timestamp; other ext ->
 *   MsgPack.Ext.
 *   encode: integral Numbers -> the smallest int form; other Numbers -> float64 ({float32:true} for
 *   float32); BigInt -> smallest int form (64-bit when needed); Uint8Array/ArrayBuffer/DataView/other
 *   typed arrays -> bin; Array -> array; Map/object -> map (object entries whose value is undefined are
 *   skipped); Date/Timestamp -> timestamp ext; Ext -> ext; MsgPack.Float32(x) -> float32.
 * Works in pages and workers (plain script, no modules): exposes self.MsgPack.
 */
(function (root) {
  "use strict";

  class Ext {
    constructor(type, data) {
      if (!Number.isInteger(type) || type < -128 || type > 127) throw new RangeError("ext type must be in -128..127");
      this.type = type;
      this.data = data instanceof Uint8Array ? data : new Uint8Array(data);
    }
  }

  /** A timestamp with nanosecond precision; sec may be a Number or a BigInt. */
  class Timestamp {
    constructor(sec, nsec) {
      if (!Number.isInteger(nsec) || nsec < 0 || nsec > 999999999) throw new RangeError("nsec must be in 0..999999999");
      this.sec = sec;
      this.nsec = nsec;
    }
    toDate() {
      return new Date(Number(this.sec) * 1000 + Math.floor(this.nsec / 1e6));
    }
    static fromDate(date) {
      const ms = date.getTime();
      if (Number.isNaN(ms)) throw new RangeError("invalid Date");
      const sec = Math.floor(ms / 1000);
      return new Timestamp(sec, (ms - sec * 1000) * 1e6);
    }
  }

  /** Wrapper forcing float32 encoding of one number. */
  class Float32 {
    constructor(value) {
      this.value = value;
    }
  }

  const TIMESTAMP_TYPE = -1;
  const utf8Encoder = new TextEncoder();
  const utf8Decoder = new TextDecoder("utf-8", { fatal: true });
  const TWO_32 = 4294967296;

  // -------------------------------------------------------------------------------- encoder

  class Encoder {
    constructor(options = {}) {
      this.float32 = !!options.float32;
      this.maxDepth = options.maxDepth || 512;
      this.buf = new Uint8Array(options.initialSize || 256);
      this.view = new DataView(this.buf.buffer);
      this.pos = 0;
    }

    encode(value) {
      this.pos = 0;
      this._write(value, 0);
      return this.buf.slice(0, this.pos);
    }

    _ensure(n) {
      const need = this.pos + n;
      if (need <= this.buf.length) return;
      let size = this.buf.length * 2;
      while (size < need) size *= 2;
      const next = new Uint8Array(size);
      next.set(this.buf.subarray(0, this.pos));
      this.buf = next;
      this.view = new DataView(next.buffer);
    }
    _u8(v) { this._ensure(1); this.buf[this.pos++] = v; }
    _u8u8(a, b) { this._ensure(2); this.buf[this.pos++] = a; this.buf[this.pos++] = b; }
    _u8u16(a, b) { this._ensure(3); this.buf[this.pos++] = a; this.view.setUint16(this.pos, b); this.pos += 2; }
    _u8u32(a, b) { this._ensure(5); this.buf[this.pos++] = a; this.view.setUint32(this.pos, b); this.pos += 4; }
    _bytes(bytes) { this._ensure(bytes.length); this.buf.set(bytes, this.pos); this.pos += bytes.length; }

    _write(value, depth) {
      if (depth > this.maxDepth) throw new RangeError("msgpack: nesting too deep");
      if (value === null || value === undefined) return this._u8(0xc0);
      switch (typeof value) {
        case "boolean": return this._u8(value ? 0xc3 : 0xc2);
        case "number": return this._number(value);
        case "bigint": return this._bigint(value);
        case "string": return this._string(value);
        case "object": break;
        default: throw new TypeError(`msgpack: cannot encode ${typeof value}`);
      }
      if (value instanceof Float32) return this._float32(value.value);
      if (value instanceof Uint8Array) return this._bin(value);
      if (value instanceof ArrayBuffer) return this._bin(new Uint8Array(value));
      if (ArrayBuffer.isView(value)) return this._bin(new Uint8Array(value.buffer, value.byteOffset, value.byteLength));
      if (Array.isArray(value)) {
        this._header(value.length, 0x90, 0xdc, 0xdd);
        for (const item of value) this._write(item, depth + 1);
        return;
      }
      if (value instanceof Date) return this._timestamp(Timestamp.fromDate(value));
      if (value instanceof Timestamp) return this._timestamp(value);
      if (value instanceof Ext) return this._ext(value.type, value.data);
      if (value instanceof Map) {
        this._header(value.size, 0x80, 0xde, 0xdf);
        for (const [k, v] of value) { this._write(k, depth + 1); this._write(v, depth + 1); }
        return;
      }
      const keys = Object.keys(value).filter((k) => value[k] !== undefined);
      this._header(keys.length, 0x80, 0xde, 0xdf);
      for (const k of keys) { this._string(k); this._write(value[k], depth + 1); }
    }

    _header(n, fix, c16, c32) {
      if (n < 16) this._u8(fix | n);
      else if (n < 0x10000) this._u8u16(c16, n);
      else if (n < TWO_32) this._u8u32(c32, n);
      else throw new RangeError("msgpack: container too large");
    }

    _number(v) {
      if (Number.isSafeInteger(v) && !Object.is(v, -0)) {
        if (v >= 0) {
          if (v < 128) return this._u8(v);
          if (v < 0x100) return this._u8u8(0xcc, v);
          if (v < 0x10000) return this._u8u16(0xcd, v);
          if (v < TWO_32) return this._u8u32(0xce, v);
          return this._bigint(BigInt(v));
        }
        if (v >= -32) return this._u8(v & 0xff);
        if (v >= -128) return this._u8u8(0xd0, v & 0xff);
        if (v >= -32768) { this._ensure(3); this.buf[this.pos++] = 0xd1; this.view.setInt16(this.pos, v); this.pos += 2; return; }
        if (v >= -2147483648) { this._ensure(5); this.buf[this.pos++] = 0xd2; this.view.setInt32(this.pos, v); this.pos += 4; return; }
        return this._bigint(BigInt(v));
      }
      if (this.float32) return this._float32(v);
      this._ensure(9);
      this.buf[this.pos++] = 0xcb;
      this.view.setFloat64(this.pos, v);
      this.pos += 8;
    }

    _float32(v) {
      this._ensure(5);
      this.buf[this.pos++] = 0xca;
      this.view.setFloat32(this.pos, v);
      this.pos += 4;
    }

    _bigint(v) {
      if (v >= 0n) {
        if (v < 0x100000000n) return this._number(Number(v));
        if (v > 0xffffffffffffffffn) throw new RangeError("msgpack: integer above 2^64-1");
        this._ensure(9); this.buf[this.pos++] = 0xcf; this.view.setBigUint64(this.pos, v); this.pos += 8;
        return;
      }
      if (v >= -0x80000000n) return this._number(Number(v));
      if (v < -0x8000000000000000n) throw new RangeError("msgpack: integer below -2^63");
      this._ensure(9); this.buf[this.pos++] = 0xd3; this.view.setBigInt64(this.pos, v); this.pos += 8;
    }

    _string(s) {
      const bytes = utf8Encoder.encode(s);
      const n = bytes.length;
      if (n < 32) this._u8(0xa0 | n);
      else if (n < 0x100) this._u8u8(0xd9, n);
      else if (n < 0x10000) this._u8u16(0xda, n);
      else if (n < TWO_32) this._u8u32(0xdb, n);
      else throw new RangeError("msgpack: string too long");
      this._bytes(bytes);
    }

    _bin(bytes) {
      const n = bytes.length;
      if (n < 0x100) this._u8u8(0xc4, n);
      else if (n < 0x10000) this._u8u16(0xc5, n);
      else if (n < TWO_32) this._u8u32(0xc6, n);
      else throw new RangeError("msgpack: binary too long");
      this._bytes(bytes);
    }

    _ext(type, data) {
      const n = data.length;
      const t = type & 0xff;
      const fixed = { 1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8 }[n];
      if (fixed) this._u8u8(fixed, t);
      else if (n < 0x100) { this._u8u8(0xc7, n); this._u8(t); }
      else if (n < 0x10000) { this._u8u16(0xc8, n); this._u8(t); }
      else if (n < TWO_32) { this._u8u32(0xc9, n); this._u8(t); }
      else throw new RangeError("msgpack: ext too long");
      this._bytes(data);
    }

    _timestamp(ts) {
      const sec = BigInt(ts.sec);
      const nsec = ts.nsec;
      let data;
      if (sec >= 0n && sec < 0x400000000n) {
        if (nsec === 0 && sec < 0x100000000n) {
          data = new Uint8Array(4);
          new DataView(data.buffer).setUint32(0, Number(sec));
        } else {
          data = new Uint8Array(8);
          new DataView(data.buffer).setBigUint64(0, (BigInt(nsec) << 34n) | sec);
        }
      } else {
        data = new Uint8Array(12);
        const dv = new DataView(data.buffer);
        dv.setUint32(0, nsec);
        dv.setBigInt64(4, sec);
      }
      this._ext(TIMESTAMP_TYPE, data);
    }
  }

  // -------------------------------------------------------------------------------- decoder

  class Decoder {
    constructor(options = {}) {
      this.copyBinary = !!options.copyBinary;
      this.bigintAlways = !!options.bigint; // 64-bit ints always as BigInt
      this.maxDepth = options.maxDepth || 512;
    }

    decode(input) {
      let bytes;
      if (input instanceof Uint8Array) bytes = input;
      else if (input instanceof ArrayBuffer) bytes = new Uint8Array(input);
      else if (ArrayBuffer.isView(input)) bytes = new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
      else throw new TypeError("msgpack: decode needs bytes");
      this.bytes = bytes;
      this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      this.pos = 0;
      const value = this._read(0);
      if (this.pos !== bytes.length) throw new RangeError(`msgpack: ${bytes.length - this.pos} trailing bytes`);
      this.bytes = this.view = null;
      return value;
    }

    _need(n) {
      if (this.pos + n > this.bytes.length) throw new RangeError("msgpack: unexpected end of input");
    }
    _u8() { this._need(1); return this.bytes[this.pos++]; }
    _u16() { this._need(2); const v = this.view.getUint16(this.pos); this.pos += 2; return v; }
    _u32() { this._need(4); const v = this.view.getUint32(this.pos); this.pos += 4; return v; }

    _int64(signed) {
      this._need(8);
      const v = signed ? this.view.getBigInt64(this.pos) : this.view.getBigUint64(this.pos);
      this.pos += 8;
      if (this.bigintAlways) return v;
      return v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= BigInt(Number.MIN_SAFE_INTEGER) ? Number(v) : v;
    }

    _take(n) {
      this._need(n);
      const out = this.bytes.subarray(this.pos, this.pos + n);
      this.pos += n;
      return out;
    }

    _str(n) {
      return utf8Decoder.decode(this._take(n));
    }

    _bin(n) {
      const view = this._take(n);
      return this.copyBinary ? view.slice() : view;
    }

    _array(n, depth) {
      const out = new Array(n);
      for (let i = 0; i < n; i++) out[i] = this._read(depth + 1);
      return out;
    }

    _map(n, depth) {
      const keys = new Array(n);
      const values = new Array(n);
      let allStrings = true;
      for (let i = 0; i < n; i++) {
        keys[i] = this._read(depth + 1);
        values[i] = this._read(depth + 1);
        if (typeof keys[i] !== "string") allStrings = false;
      }
      if (!allStrings) {
        const m = new Map();
        for (let i = 0; i < n; i++) m.set(keys[i], values[i]);
        return m;
      }
      const obj = {};
      for (let i = 0; i < n; i++) {
        Object.defineProperty(obj, keys[i], { value: values[i], enumerable: true, writable: true, configurable: true });
      }
      return obj;
    }

    _ext(n) {
      this._need(1);
      const type = this.view.getInt8(this.pos++);
      const data = this._take(n);
      if (type === TIMESTAMP_TYPE) return this._timestamp(data);
      return new Ext(type, data.slice());
    }

    _timestamp(data) {
      const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
      let sec, nsec;
      if (data.length === 4) { sec = dv.getUint32(0); nsec = 0; }
      else if (data.length === 8) {
        const v = dv.getBigUint64(0);
        nsec = Number(v >> 34n);
        sec = Number(v & 0x3ffffffffn);
      } else if (data.length === 12) {
        nsec = dv.getUint32(0);
        const s = dv.getBigInt64(4);
        sec = s <= BigInt(Number.MAX_SAFE_INTEGER) && s >= BigInt(Number.MIN_SAFE_INTEGER) ? Number(s) : s;
      } else throw new RangeError(`msgpack: timestamp of ${data.length} bytes`);
      if (nsec > 999999999) throw new RangeError("msgpack: timestamp nanoseconds out of range");
      const ts = new Timestamp(sec, nsec);
      // a Date when nothing is lost (ms precision, within Date's range of +-8.64e15 ms)
      if (typeof sec === "number" && nsec % 1e6 === 0 && Math.abs(sec) <= 8.64e12) return ts.toDate();
      return ts;
    }

    _read(depth) {
      if (depth > this.maxDepth) throw new RangeError("msgpack: nesting too deep");
      const b = this._u8();
      if (b < 0x80) return b;
      if (b < 0x90) return this._map(b & 0x0f, depth);
      if (b < 0xa0) return this._array(b & 0x0f, depth);
      if (b < 0xc0) return this._str(b & 0x1f);
      if (b >= 0xe0) return b - 0x100;
      switch (b) {
        case 0xc0: return null;
        case 0xc1: throw new RangeError("msgpack: 0xc1 is never used");
        case 0xc2: return false;
        case 0xc3: return true;
        case 0xc4: return this._bin(this._u8());
        case 0xc5: return this._bin(this._u16());
        case 0xc6: return this._bin(this._u32());
        case 0xc7: return this._ext(this._u8());
        case 0xc8: return this._ext(this._u16());
        case 0xc9: return this._ext(this._u32());
        case 0xca: { this._need(4); const v = this.view.getFloat32(this.pos); this.pos += 4; return v; }
        case 0xcb: { this._need(8); const v = this.view.getFloat64(this.pos); this.pos += 8; return v; }
        case 0xcc: return this._u8();
        case 0xcd: return this._u16();
        case 0xce: return this._u32();
        case 0xcf: return this._int64(false);
        case 0xd0: { this._need(1); return this.view.getInt8(this.pos++); }
        case 0xd1: { this._need(2); const v = this.view.getInt16(this.pos); this.pos += 2; return v; }
        case 0xd2: { this._need(4); const v = this.view.getInt32(this.pos); this.pos += 4; return v; }
        case 0xd3: return this._int64(true);
        case 0xd4: return this._ext(1);
        case 0xd5: return this._ext(2);
        case 0xd6: return this._ext(4);
        case 0xd7: return this._ext(8);
        case 0xd8: return this._ext(16);
        case 0xd9: return this._str(this._u8());
        case 0xda: return this._str(this._u16());
        case 0xdb: return this._str(this._u32());
        case 0xdc: return this._array(this._u16(), depth);
        case 0xdd: return this._array(this._u32(), depth);
        case 0xde: return this._map(this._u16(), depth);
        case 0xdf: return this._map(this._u32(), depth);
      }
      throw new RangeError(`msgpack: bad byte 0x${b.toString(16)}`);
    }
  }

  const sharedEncoder = new Encoder();
  const sharedDecoder = new Decoder();

  root.MsgPack = {
    Encoder,
    Decoder,
    Ext,
    Timestamp,
    Float32,
    encode: (value, options) => (options ? new Encoder(options).encode(value) : sharedEncoder.encode(value)),
    decode: (bytes, options) => (options ? new Decoder(options).decode(bytes) : sharedDecoder.decode(bytes)),
  };
})(typeof self !== "undefined" ? self : globalThis);
