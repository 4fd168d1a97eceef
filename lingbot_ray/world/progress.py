"""Progress bars of the world tools: tqdm on stderr, the one thing here that needs the ``[train]`` extra
(``pip install 'lingbot_ray[train]'``), imported only when a bar is made."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress_bar(iterable: Iterable | None = None, *, desc: str, enabled: bool | None, **options: Any) -> Any:
    """A tqdm bar on stderr; ``enabled=None`` lets tqdm decide (shown on a terminal only)."""
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError("lingbot_ray.world's tools need tqdm: pip install 'lingbot_ray[train]'") from None
    return tqdm(iterable, desc=desc, disable=None if enabled is None else not enabled, file=sys.stderr, **options)
