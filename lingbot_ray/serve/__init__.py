"""The Ray Serve deployment graph (deployments, router, app builder) and its in-process twin."""

import logging

from lingbot_ray.protocol.errors import clip

MAX_LOG_LINE_CHARS = 2000


class _ClipLongLines(logging.Filter):
    """A log line never carries a client's value at full length, whatever code path logs it (a
    4 MB field once made a 4 MB line in three log files)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > MAX_LOG_LINE_CHARS:
            record.msg, record.args = clip(message, MAX_LOG_LINE_CHARS), None
        return True


# the serving code logs through Ray Serve's logger (its replicas' log files), the rest through ours
for _name in ("ray.serve", "lingbot_ray"):
    if not any(isinstance(f, _ClipLongLines) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(_ClipLongLines())
