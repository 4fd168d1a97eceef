"""Frame transport: chunks of RGB frames ⇄ ``frame_batch`` messages (docs/PROTOCOL.md, "Server messages").

``make_encoder(fmt)`` gives a per-session :class:`ChunkEncoder` for ``raw``, ``webp``, ``jpeg`` or
the default lossless ``delta-gzip`` (fmt None); ``encode_chunk`` splits a chunk into batches within
the message and list limits. :class:`FrameDecoder` is the client-side inverse.
Imports numpy, Pillow and isal only: neither torch nor ray.
"""

from .batching import DEFAULT_MAX_MESSAGE_BYTES, HEADER_ROOM_BYTES, MAX_FRAMES_PER_BATCH
from .decoder import FrameDecoder
from .delta import DeltaGzipEncoder
from .encoder import ChunkEncoder, check_frames, shared_executor
from .formats import OUTPUT_FORMATS, make_encoder
from .raw import RawEncoder
from .stills import JpegEncoder, StillEncoder, WebPEncoder, preview_size

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HEADER_ROOM_BYTES",
    "MAX_FRAMES_PER_BATCH",
    "OUTPUT_FORMATS",
    "ChunkEncoder",
    "DeltaGzipEncoder",
    "FrameDecoder",
    "JpegEncoder",
    "RawEncoder",
    "StillEncoder",
    "WebPEncoder",
    "check_frames",
    "make_encoder",
    "preview_size",
    "shared_executor",
]
