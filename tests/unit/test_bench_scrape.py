"""Quantiles read back from a scraped histogram, as PromQL's histogram_quantile reads them."""

from __future__ import annotations

import math

import pytest

from bench.harness.scrape import Histogram

INF = math.inf


def test_quantiles_interpolate_within_the_bucket_that_holds_the_rank():
    h = Histogram((0.001, 0.002, 0.005, INF), (10, 20, 20, 20))
    assert h.count == 20
    assert h.quantile(0.5) == pytest.approx(0.001)
    assert h.quantile(0.75) == pytest.approx(0.0015)
    assert h.quantile(0.25) == pytest.approx(0.0005)  # the first bucket starts at 0
    assert h.quantile(1.0) == pytest.approx(0.002)


def test_a_rank_in_the_open_bucket_is_the_largest_finite_bound():
    h = Histogram((0.01, 0.1, INF), (5, 9, 10))
    assert h.quantile(0.99) == pytest.approx(0.1)


def test_differences_are_per_bucket_and_must_share_buckets():
    later = Histogram((0.01, INF), (30, 40))
    earlier = Histogram((0.01, INF), (10, 10))
    assert (later - earlier) == Histogram((0.01, INF), (20, 30))
    assert (later - Histogram((), ())) == later  # nothing scraped before: all of it
    with pytest.raises(ValueError, match="different buckets"):
        later - Histogram((0.02, INF), (1, 1))
    assert math.isnan(Histogram((0.01, INF), (0, 0)).quantile(0.5))
