"""A byte-level walker for the MessagePack subset the reference WebUI's decoder reads.

docs/PROTOCOL.md: nil, bool, float64, non-negative ints below 2**32 (positive fixint, uint8/16/32), str up
to 65535 bytes (fixstr/str8/str16), bin8/16/32, arrays of at most 15 elements (fixarray), maps up to
65535 keys (fixmap/map16). Anything else raises ``AssertionError`` naming the byte and offset.
"""

from __future__ import annotations

import struct


class SubsetViolation(AssertionError):
    pass


def walk(data: bytes) -> object:
    """Decode ``data`` (exactly one value) while checking the subset; returns the Python value."""
    value, end = _value(memoryview(data), 0)
    if end != len(data):
        raise SubsetViolation(f"{len(data) - end} trailing bytes after offset {end}")
    return value


def _take(buf: memoryview, pos: int, n: int) -> bytes:
    if pos + n > len(buf):
        raise SubsetViolation(f"truncated at offset {pos}")
    return bytes(buf[pos : pos + n])


def _value(buf: memoryview, pos: int):
    tag = _take(buf, pos, 1)[0]
    pos += 1
    if tag <= 0x7F:
        return tag, pos
    if 0x80 <= tag <= 0x8F:
        return _map(buf, pos, tag & 0x0F)
    if 0x90 <= tag <= 0x9F:
        return _array(buf, pos, tag & 0x0F)
    if 0xA0 <= tag <= 0xBF:
        n = tag & 0x1F
        return _take(buf, pos, n).decode("utf-8"), pos + n
    if tag == 0xC0:
        return None, pos
    if tag in (0xC2, 0xC3):
        return tag == 0xC3, pos
    if tag in (0xC4, 0xC5, 0xC6):
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4}[tag]
        n = int.from_bytes(_take(buf, pos, width), "big")
        pos += width
        return _take(buf, pos, n), pos + n
    if tag == 0xCB:
        return struct.unpack(">d", _take(buf, pos, 8))[0], pos + 8
    if tag in (0xCC, 0xCD, 0xCE):
        width = {0xCC: 1, 0xCD: 2, 0xCE: 4}[tag]
        return int.from_bytes(_take(buf, pos, width), "big"), pos + width
    if tag in (0xD9, 0xDA):
        width = 1 if tag == 0xD9 else 2
        n = int.from_bytes(_take(buf, pos, width), "big")
        pos += width
        return _take(buf, pos, n).decode("utf-8"), pos + n
    if tag == 0xDE:
        n = int.from_bytes(_take(buf, pos, 2), "big")
        return _map(buf, pos + 2, n)
    raise SubsetViolation(f"type byte 0x{tag:02x} at offset {pos - 1} is outside the reference subset")


def _array(buf: memoryview, pos: int, n: int):
    items = []
    for _ in range(n):
        item, pos = _value(buf, pos)
        items.append(item)
    return items, pos


def _map(buf: memoryview, pos: int, n: int):
    out = {}
    for _ in range(n):
        key, pos = _value(buf, pos)
        value, pos = _value(buf, pos)
        out[key] = value
    return out, pos
