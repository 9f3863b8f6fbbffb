"""Reading the broker's /metrics page (the Prometheus text format) in the benchmarks:
samples and histogram buckets by label, and quantiles from buckets as Prometheus'
histogram_quantile computes them."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_SCRAPE_TIMEOUT_S = 5.0


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT_S) as response:
        exposition: str = response.read().decode()
    return exposition


def samples_by_label(exposition: str, sample: str, label: str) -> dict[str, float]:
    """The values of the samples named `sample`, by the value of `label`, summed over
    their other labels."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for found in family.samples:
            if found.name == sample:
                key = found.labels.get(label, "")
                values[key] = values.get(key, 0.0) + found.value
    return values


def buckets_by_label(exposition: str, histogram: str, label: str) -> dict[str, dict[float, float]]:
    """The cumulative buckets of `histogram` by the value of `label`, summed over its
    other labels (the mailbox wait: over message types)."""
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != histogram:
            continue
        for found in family.samples:
            if found.name == f"{histogram}_bucket":
                by_bound = buckets.setdefault(found.labels[label], {})
                bound = float(found.labels["le"])
                by_bound[bound] = by_bound.get(bound, 0.0) + found.value
    return buckets


def histogram_buckets(exposition: str, name: str) -> dict[float, float] | None:
    """The cumulative bucket counts of histogram `name` summed over its label sets, by upper
    bound; None when the exposition has no such histogram."""
    for family in text_string_to_metric_families(exposition):
        if family.name == name and family.type == "histogram":
            buckets: dict[float, float] = {}
            for sample in family.samples:
                if sample.name == f"{name}_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
            return buckets
    return None


def bucket_quantile(quantile: float, buckets: Mapping[float, float]) -> float | None:
    """The quantile estimated from cumulative buckets as Prometheus' histogram_quantile does:
    linear within the bucket that holds the rank, the highest finite bound past the last
    one. None without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = quantile * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def observed_between(
    before: Mapping[float, float] | None, after: Mapping[float, float] | None
) -> dict[str, Any]:
    """The broker histogram's observations made between two scrapes: count, p50 and p99 in
    ms; `{"absent": True}` when the broker does not export it."""
    if after is None:
        return {"absent": True}
    delta = {bound: count - (before or {}).get(bound, 0.0) for bound, count in after.items()}
    result: dict[str, Any] = {"absent": False, "count": int(delta.get(float("inf"), 0.0))}
    for key, quantile in (("p50_ms", 0.50), ("p99_ms", 0.99)):
        seconds = bucket_quantile(quantile, delta)
        result[key] = None if seconds is None else round(seconds * 1000, 2)
    return result
