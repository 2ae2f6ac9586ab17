"""Domain → proto pieces both servers answer with."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from inkling.v1 import resources_pb2


def degradation(reasons: Iterable[int], detail: Iterable[str]) -> resources_pb2.Degradation:
    unique: Any = list(dict.fromkeys(reasons))  # each reason once, in the order it happened
    return resources_pb2.Degradation(
        degraded=bool(unique), reasons=unique, detail="; ".join(detail)
    )


def filter_counts(removed: Mapping[str, int]) -> list[resources_pb2.FilterCount]:
    return [resources_pb2.FilterCount(filter=k, removed=v) for k, v in removed.items()]


def timings(stages: Iterable[tuple[str, int]]) -> list[resources_pb2.StageTiming]:
    return [resources_pb2.StageTiming(stage=s, micros=m) for s, m in stages]


def render(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(render(v) for v in value) + "]"
    return str(value)


def row_features(
    entity: str, row: Mapping[str, Any] | None, names: Iterable[str]
) -> list[resources_pb2.FeatureValue]:
    return [
        resources_pb2.FeatureValue(
            entity=entity,
            feature=name,
            value=render((row or {}).get(name)),
            defaulted=row is None or (row.get(name) is None),
        )
        for name in names
    ]
