"""Reading a histogram back from the processes' `/metrics`, as Prometheus would.

A benchmark scrapes every process of one role before and after its window, subtracts,
and reads quantiles the way PromQL's `histogram_quantile` does: linear within the
bucket that holds the rank, so a quantile is only as fine as the buckets around it.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts by upper bound (the last bound is +Inf)."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]

    @property
    def count(self) -> float:
        return self.cumulative[-1] if self.cumulative else 0.0

    def __sub__(self, earlier: Histogram) -> Histogram:
        if not earlier.bounds:
            return self
        if earlier.bounds != self.bounds:
            raise ValueError("the histograms have different buckets")
        return Histogram(
            self.bounds,
            tuple(a - b for a, b in zip(self.cumulative, earlier.cumulative, strict=True)),
        )

    def quantile(self, q: float) -> float:
        """`histogram_quantile(q)`: NaN when empty; the largest finite bound when the rank
        falls in the +Inf bucket."""
        if not self.count:
            return math.nan
        rank = q * self.count
        lower, below = 0.0, 0.0
        for bound, cumulative in zip(self.bounds, self.cumulative, strict=True):
            if cumulative >= rank:
                if math.isinf(bound):
                    return lower
                inside = cumulative - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cumulative
        return lower


def metric_families(address: str, timeout_s: float = 10.0) -> list[Metric]:
    """One scrape of `http://<address>/metrics`, parsed."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as reply:
        return list(text_string_to_metric_families(reply.read().decode()))


def scrape_samples(
    addresses: Sequence[str], *names: str
) -> list[tuple[str, dict[str, str], float]]:
    """Every sample with one of `names` (e.g. `..._seconds_sum`) of every address, as
    (name, labels, value); one scrape per address."""
    wanted = set(names)
    return [
        (s.name, dict(s.labels), s.value)
        for address in addresses
        for family in metric_families(address)
        for s in family.samples
        if s.name in wanted
    ]


def scrape_histogram(addresses: Sequence[str], name: str) -> Histogram:
    """Histogram `name` (without `_bucket`) summed over every series of every address."""
    totals: dict[float, float] = {}
    for _, labels, value in scrape_samples(addresses, f"{name}_bucket"):
        bound = float(labels["le"])
        totals[bound] = totals.get(bound, 0.0) + value
    bounds = tuple(sorted(totals))
    return Histogram(bounds, tuple(totals[b] for b in bounds))


def mean_by(addresses: Sequence[str], histogram: str, label: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of histogram `histogram` per value of `label`, summed over addresses:
    scrape before and after a window and subtract to get the window's mean."""
    out: dict[str, list[float]] = {}
    total, count = f"{histogram}_sum", f"{histogram}_count"
    for name, labels, value in scrape_samples(addresses, total, count):
        out.setdefault(labels.get(label, ""), [0.0, 0.0])[name == count] += value
    return {k: (v[0], v[1]) for k, v in out.items()}
