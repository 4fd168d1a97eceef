"""Client-side tools: an instrumented session, the consistency check, ``bench`` and ``record``.

They speak only the wire protocol (WebSocket + MessagePack) and import neither torch nor ray, so
they run wherever the server can be reached.
"""
