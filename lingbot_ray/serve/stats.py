"""Per-session figures in fixed memory: a session may stream for hours, so nothing it keeps may
grow with the number of chunks."""

from __future__ import annotations

import math

import numpy as np


class QuantileSketch:
    """Quantiles of a stream of non-negative values (milliseconds) in fixed memory.

    Values fall into log-spaced buckets ``relative_error`` wide on each side (2 % wide by default,
    so a quantile is off by at most 1 % of its value); values below ``floor`` share the first bucket
    and values above ``floor · γ^buckets`` the last.
    """

    def __init__(self, *, relative_error: float = 0.01, floor: float = 1.0, buckets: int = 1024):
        self._gamma = (1 + relative_error) / (1 - relative_error)
        self._log_gamma = math.log(self._gamma)
        self._floor = floor
        self._counts = np.zeros(buckets, dtype=np.int64)
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        value = max(0.0, float(value))
        index = 0 if value <= self._floor else math.ceil(math.log(value / self._floor) / self._log_gamma)
        self._counts[min(index, len(self._counts) - 1)] += 1
        self.count += 1
        self.total += value

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (nearest rank), 0 for an empty sketch."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        index = int(np.searchsorted(np.cumsum(self._counts), rank))
        if index == 0:
            return self._floor
        # the bucket (floor·γ^(i-1), floor·γ^i]: its midpoint in log space
        return self._floor * self._gamma ** (index - 0.5)
