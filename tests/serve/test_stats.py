import numpy as np
import pytest

from lingbot_ray.serve.stats import QuantileSketch


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_quantiles_within_one_percent_in_fixed_memory(q):
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=6.0, sigma=0.8, size=20_000)  # ~400 ms chunks, long tail
    sketch = QuantileSketch()
    size = sketch._counts.nbytes
    for value in values:
        sketch.add(value)
    exact = np.quantile(values, q, method="inverted_cdf")
    assert sketch.quantile(q) == pytest.approx(exact, rel=0.01)
    assert sketch._counts.nbytes == size and sketch.count == len(values)
    assert sketch.total == pytest.approx(values.sum())


def test_empty_small_and_huge_values():
    sketch = QuantileSketch()
    assert sketch.quantile(0.5) == 0.0
    sketch.add(0)
    sketch.add(-3)  # clamped to 0
    assert sketch.quantile(0.5) == 1.0  # the floor bucket
    sketch.add(1e30)
    assert sketch.quantile(1.0) > 1e6


def test_no_log_line_of_the_serving_code_carries_a_huge_value():
    import logging

    from lingbot_ray.serve import MAX_LOG_LINE_CHARS  # importing the package installs the filter

    class Keep(logging.Handler):  # on the logger itself: Ray may stop it propagating to the root
        records: list = []

        def emit(self, record):
            self.records.append(record)

    logger, keep = logging.getLogger("ray.serve"), Keep()
    logger.addHandler(keep)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        logger.info("invalid init: %s", "x" * 4_000_000)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    message = keep.records[-1].getMessage()
    assert len(message) <= MAX_LOG_LINE_CHARS and "<4000014 chars>" in message
