"""Drift between a reference window and the recent window: per feature and for scores.

For every feature of a served feature service, the offline feature table's rows
(`<features_dir>/<view>`, stamped by `event_timestamp`) in the reference window (what
the model in service was trained on) are compared with the rows of the recent window:

- numeric features (ints, floats, timestamps as seconds; booleans as 0/1): the
  population stability index over 10 quantile bins of the reference, the two-sample
  Kolmogorov-Smirnov statistic with its asymptotic p-value, and the 1-Wasserstein
  distance in units of the reference's standard deviation;
- strings (e.g. `session_intent_category`): PSI over the reference's 20 most common
  values plus "other";
- lists (`user_top_categories`, ...): their length, as a number;
- timestamps (`user_last_event_timestamp`, ...) are measured as seconds but never count
  as drifted: they move with the windows by construction.

PSI = sum over bins of (recent - reference) x ln(recent / reference), each share floored
at 1e-4. By the usual reading, under 0.1 is stable, 0.1-0.25 a moderate shift, above
0.25 a major one; a feature counts as drifted above `psi_threshold` (0.2 by default).
The same measures compare the model's scores in the serve log (the scores it served in
each window). A drifted feature blocks automatic promotion unless it is explained
(`inkling retrain --explain feature="why"`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from inkling.feature_store.columns import ServiceColumns

DEFAULT_PSI_THRESHOLD = 0.2
_FLOOR = 1e-4
_TOP_VALUES = 20


def psi(reference: np.ndarray, recent: np.ndarray, bins: int = 10) -> float:
    """Population stability index of numbers, over quantile bins of `reference`."""
    reference, recent = _finite(reference), _finite(recent)
    if len(reference) == 0 or len(recent) == 0:
        return math.nan
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    new = np.bincount(np.searchsorted(edges, recent, side="right"), minlength=len(edges) + 1)
    return _psi_of_counts(ref, new)


def psi_categorical(reference: Sequence[object], recent: Sequence[object]) -> float:
    """Population stability index of values, over the reference's most common ones."""
    if not reference or not recent:
        return math.nan
    values, counts = np.unique(np.asarray([str(v) for v in reference]), return_counts=True)
    top = set(values[np.argsort(-counts)[:_TOP_VALUES]].tolist())

    def shares(seq: Sequence[object]) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in seq:
            key = str(v) if str(v) in top else "\0other"
            out[key] = out.get(key, 0) + 1
        return out

    ref, new = shares(reference), shares(recent)
    keys = sorted(set(ref) | set(new))
    return _psi_of_counts(
        np.array([ref.get(k, 0) for k in keys]), np.array([new.get(k, 0) for k in keys])
    )


def _psi_of_counts(reference: np.ndarray, recent: np.ndarray) -> float:
    p = np.maximum(reference / reference.sum(), _FLOOR)
    q = np.maximum(recent / recent.sum(), _FLOOR)
    return float(((q - p) * np.log(q / p)).sum())


def ks(reference: np.ndarray, recent: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value."""
    a, b = np.sort(_finite(reference)), np.sort(_finite(recent))
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan
    grid = np.concatenate([a, b])
    d = float(
        np.max(
            np.abs(
                np.searchsorted(a, grid, "right") / len(a)
                - np.searchsorted(b, grid, "right") / len(b)
            )
        )
    )
    n = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 1e-3:
        return d, 1.0
    p = 2 * sum((-1) ** (j - 1) * math.exp(-2 * (j * lam) ** 2) for j in range(1, 101))
    return d, float(min(1.0, max(0.0, p)))


def wasserstein(reference: np.ndarray, recent: np.ndarray) -> float:
    """1-Wasserstein distance between the two samples, over the reference's standard
    deviation (0 when the reference is constant and the recent sample equals it)."""
    a, b = _finite(reference), _finite(recent)
    if len(a) == 0 or len(b) == 0:
        return math.nan
    q = np.linspace(0, 1, 201)
    distance = float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))
    scale = float(np.std(a))
    if scale == 0:
        return 0.0 if distance == 0 else math.inf
    return distance / scale


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    """`view:feature`, or `score:<model version>`."""
    kind: str
    """numeric, categorical, list length."""
    reference_rows: int
    recent_rows: int
    psi: float
    ks: float
    ks_p: float
    wasserstein: float
    drifted: bool
    explained: str = ""


@dataclass
class DriftReport:
    reference: tuple[str, str]
    recent: tuple[str, str]
    psi_threshold: float
    features: list[FeatureDrift] = field(default_factory=list)
    scores: list[FeatureDrift] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def unexplained(self) -> list[FeatureDrift]:
        """Drifted features nobody explained: what blocks automatic promotion."""
        return [f for f in self.features if f.drifted and not f.explained]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def markdown(self) -> str:
        lines = [
            f"Drift: reference {self.reference[0]} .. {self.reference[1]} vs recent "
            f"{self.recent[0]} .. {self.recent[1]}; drifted = PSI > {self.psi_threshold}.",
            "",
            "| feature | kind | rows (ref / recent) | PSI | KS | KS p | W1 / sd | drifted |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for f in [*self.features, *self.scores]:
            flag = (
                ("yes, explained: " + f.explained) if f.explained else ("yes" if f.drifted else "")
            )
            lines.append(
                f"| {f.name} | {f.kind} | {f.reference_rows:,} / {f.recent_rows:,} | {f.psi:.3f} "
                f"| {f.ks:.3f} | {f.ks_p:.2g} | {f.wasserstein:.3f} | {flag} |"
            )
        lines += [f"\n{n}" for n in self.notes]
        return "\n".join(lines)


def measure(
    name: str,
    reference: pa.Array | pa.ChunkedArray,
    recent: pa.Array | pa.ChunkedArray,
    psi_threshold: float,
    explained: str = "",
) -> FeatureDrift:
    """The drift of one column between the windows."""
    kind, ref, new = _comparable(reference), _values(reference), _values(recent)
    if kind == "categorical":
        value = psi_categorical(ref, new)
        d, p, w = math.nan, math.nan, math.nan
    else:
        value = psi(np.asarray(ref, np.float64), np.asarray(new, np.float64))
        d, p = ks(np.asarray(ref, np.float64), np.asarray(new, np.float64))
        w = wasserstein(np.asarray(ref, np.float64), np.asarray(new, np.float64))
    # A timestamp's distribution moves with the windows by construction: reported, not gated.
    gated = not pa.types.is_timestamp(reference.type)
    drifted = bool(value > psi_threshold) if math.isfinite(value) and gated else False
    if not gated:
        kind = "timestamp (not gated)"
    return FeatureDrift(
        name, kind, len(ref), len(new), value, d, p, w, drifted, explained if drifted else ""
    )


def _comparable(column: pa.Array | pa.ChunkedArray) -> str:
    t = column.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "list length"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "categorical"
    return "numeric"


def _values(column: pa.Array | pa.ChunkedArray) -> list[object]:
    column = column.drop_null()
    t = column.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pc.list_value_length(column).to_pylist()
    if pa.types.is_timestamp(t):
        return (pc.cast(column, pa.int64()).to_numpy() / 1e6).tolist()
    if pa.types.is_boolean(t):
        return pc.cast(column, pa.int8()).to_pylist()
    return column.to_pylist()


def _window(table: pa.Table, column: str, start: datetime, end: datetime) -> pa.Table:
    stamps = table.column(column)
    mask = pc.and_(
        pc.greater_equal(stamps, pa.scalar(start, stamps.type)),
        pc.less(stamps, pa.scalar(end, stamps.type)),
    )
    return table.filter(mask)


def drift_report(
    features_dir: Path,
    columns: ServiceColumns,
    reference: tuple[datetime, datetime],
    recent: tuple[datetime, datetime],
    *,
    psi_threshold: float = DEFAULT_PSI_THRESHOLD,
    explained: Mapping[str, str] | None = None,
    serves: pa.Table | None = None,
    model_version: str = "",
) -> DriftReport:
    """Every feature of `columns` (and the served scores of `model_version` in `serves`,
    the serve log) between the two windows; `explained`: feature (or view:feature) ->
    why its drift is expected."""
    explained = dict(explained or {})
    report = DriftReport(
        (reference[0].isoformat(), reference[1].isoformat()),
        (recent[0].isoformat(), recent[1].isoformat()),
        psi_threshold,
    )
    for view in columns.views:
        path = Path(features_dir) / view.name
        if not path.exists():
            report.notes.append(f"{view.name}: no offline table at {path}; not measured")
            continue
        table = ds.dataset(str(path)).to_table(columns=[*view.feature_names, "event_timestamp"])
        ref, new = (_window(table, "event_timestamp", *w) for w in (reference, recent))
        if ref.num_rows == 0 or new.num_rows == 0:
            report.notes.append(
                f"{view.name}: {ref.num_rows} reference and {new.num_rows} recent rows; not measured"
            )
            continue
        for feature in view.feature_names:
            why = explained.get(f"{view.name}:{feature}", explained.get(feature, ""))
            name = f"{view.name}:{feature}"
            report.features.append(
                measure(name, ref.column(feature), new.column(feature), psi_threshold, why)
            )
    if serves is None or serves.num_rows == 0 or not model_version:
        report.notes.append("score drift: no serve log of the model in service; not measured")
        return report
    mine = serves.filter(pc.equal(serves.column("model_version"), model_version))
    windows = [_window(mine, "served_at", *w) for w in (reference, recent)]
    scores = [pc.list_flatten(w.column("scores")) for w in windows]
    if min(len(s) for s in scores) == 0:
        report.notes.append(
            f"score drift: {len(scores[0])} reference and {len(scores[1])} recent scores of "
            f"{model_version}; not measured"
        )
    else:
        report.scores.append(measure(f"score:{model_version}", scores[0], scores[1], psi_threshold))
    return report
