"""Stages shared by the retrieval and ranking servers: the serving view of the
catalogue, candidate sets, filters and the popularity source.

A candidate set is three aligned arrays (catalogue rows, scores, sources), so a
stage over a thousand candidates is a few numpy operations, never a Python loop
per item. Filters follow one shape: `keep(rows) -> mask`, and `apply_filters`
reports how many each removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import pandas as pd

from inkling.feature_store.snapshot import ItemSnapshot
from inkling.feature_store.snapshot_refresh import SnapshotRefresher
from inkling.v1 import resources_pb2

ANN = resources_pb2.CANDIDATE_SOURCE_ANN
COVISITATION = resources_pb2.CANDIDATE_SOURCE_COVISITATION
POPULARITY = resources_pb2.CANDIDATE_SOURCE_POPULARITY
CALLER = resources_pb2.CANDIDATE_SOURCE_CALLER
UNKNOWN_ROW = -1
UNKNOWN_CATEGORY = "unknown"


@dataclass(frozen=True)
class ItemTable:
    """The catalogue as serving sees it: one row per item in the online store.

    `available` = in stock and not blocked; `popular_rows` = available rows by
    7-day popularity, best first (the fallback source and the cold-start answer).
    Co-visitation is flat: row r's neighbours are
    `covisit_rows[covisit_offsets[r]:covisit_offsets[r + 1]]`, with their counts in
    `covisit_counts` (neighbours the table does not hold are dropped).
    """

    ids: np.ndarray
    row_of: Mapping[str, int]
    category_codes: np.ndarray
    categories: Sequence[str]
    available: np.ndarray
    popularity: np.ndarray
    popular_rows: np.ndarray
    covisit_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    covisit_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    covisit_counts: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    snapshot: ItemSnapshot | None = None
    """The snapshot the table was built from (its rows are the snapshot's rows)."""

    @classmethod
    def build(
        cls,
        ids: Sequence[str],
        categories: Sequence[str | None],
        popularity: np.ndarray,
        in_stock: np.ndarray,
        blocked: np.ndarray,
        covisit: Mapping[str, Sequence[tuple[str, int]]] | None = None,
    ) -> ItemTable:
        """A table from plain Python values (tests, small tools)."""
        row_of = {item: i for i, item in enumerate(ids)}
        names = sorted({c or UNKNOWN_CATEGORY for c in categories})
        code = {c: i for i, c in enumerate(names)}
        codes = np.array([code[c or UNKNOWN_CATEGORY] for c in categories], dtype=np.int32)
        lists = [
            [(row_of[n], w) for n, w in (covisit or {}).get(i, ()) if n in row_of] for i in ids
        ]
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
        flat = [pair for x in lists for pair in x]
        return cls._assemble(
            ids=np.asarray(ids, dtype=object),
            row_of=row_of,
            codes=codes,
            vocabulary=names,
            popularity=np.asarray(popularity, dtype=np.float64),
            available=np.asarray(in_stock, bool) & ~np.asarray(blocked, bool),
            covisit_offsets=offsets,
            covisit_rows=np.array([r for r, _ in flat], dtype=np.int64),
            covisit_counts=np.array([w for _, w in flat], dtype=np.float64),
        )

    @classmethod
    def _assemble(
        cls,
        *,
        ids: np.ndarray,
        row_of: Mapping[str, int],
        codes: np.ndarray,
        vocabulary: Sequence[str],
        popularity: np.ndarray,
        available: np.ndarray,
        covisit_offsets: np.ndarray,
        covisit_rows: np.ndarray,
        covisit_counts: np.ndarray,
    ) -> ItemTable:
        pop = np.nan_to_num(popularity, nan=0.0)
        order = np.argsort(-pop, kind="stable")
        return cls(
            ids=ids,
            row_of=row_of,
            category_codes=codes,
            categories=vocabulary,
            available=available,
            popularity=pop,
            popular_rows=order[available[order]].astype(np.int64),
            covisit_offsets=covisit_offsets,
            covisit_rows=covisit_rows,
            covisit_counts=covisit_counts,
        )

    @classmethod
    def from_snapshot(cls, snapshot: ItemSnapshot) -> ItemTable:
        """The table over a snapshot's rows (same ids, same row numbers, the same id map),
        with categories, stock and popularity from the item features."""
        n = snapshot.n_items
        rows = np.arange(n, dtype=np.int64)

        def scalar(name: str, fill: float | bool) -> np.ndarray:
            c = snapshot.features.get(name)
            if c is None:
                return np.full(n, fill)
            return np.where(c.present[:n], c.values[:n], fill)

        cat = snapshot.features.get("item_category")
        if cat is not None:
            vocabulary = [*cat.vocabulary, UNKNOWN_CATEGORY]
            codes = np.where(cat.present[:n], cat.values[:n], -1).astype(np.int32)
            codes[codes < 0] = len(vocabulary) - 1
        else:
            vocabulary, codes = [UNKNOWN_CATEGORY], np.zeros(n, np.int32)
        available = scalar("item_in_stock", True).astype(bool) & ~scalar(
            "item_blocked", False
        ).astype(bool)
        items = snapshot.features.get("covisit_items")
        counts = snapshot.features.get("covisit_counts")
        if items is not None and items.offsets is not None:
            # Codes index the column's vocabulary of item ids: map it onto rows once.
            vocab_rows = pd.Index(snapshot.ids).get_indexer(pd.Index(items.vocabulary))
            flat_rows = vocab_rows[items.values] if len(items.values) else items.values
            same_shape = counts is not None and len(counts.values) == len(items.values)
            flat_counts = (
                counts.values.astype(np.float64)
                if same_shape and counts is not None
                else np.ones(len(flat_rows))
            )
            seg = items.offsets[: n + 1]
            owner = np.repeat(rows, seg[1:] - seg[:-1])
            flat_rows, flat_counts = flat_rows[: len(owner)], flat_counts[: len(owner)]
            keep = (flat_rows >= 0) & items.present[:n][owner]
            kept_lengths = np.bincount(owner[keep], minlength=n)
            offsets = np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int64)
            covisit_rows = flat_rows[keep].astype(np.int64)
            covisit_counts = flat_counts[keep]
        else:
            offsets = np.zeros(n + 1, np.int64)
            covisit_rows = np.empty(0, np.int64)
            covisit_counts = np.empty(0, np.float64)
        table = cls._assemble(
            ids=np.asarray(snapshot.ids, dtype=object),
            row_of=snapshot.id_to_row,
            codes=codes,
            vocabulary=vocabulary,
            popularity=scalar("item_pop_7d", 0).astype(np.float64),
            available=available,
            covisit_offsets=offsets,
            covisit_rows=covisit_rows,
            covisit_counts=covisit_counts,
        )
        return replace(table, snapshot=snapshot)

    def neighbours(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `row`'s co-visited rows and their counts."""
        if row < 0 or row + 1 >= len(self.covisit_offsets):
            return self.covisit_rows[:0], self.covisit_counts[:0]
        a, b = self.covisit_offsets[row], self.covisit_offsets[row + 1]
        return self.covisit_rows[a:b], self.covisit_counts[a:b]

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, item_ids: Iterable[str]) -> np.ndarray:
        """Catalogue rows of the ids, UNKNOWN_ROW (-1) for an id the store does not hold."""
        get = self.row_of.get
        return np.fromiter((get(i, UNKNOWN_ROW) for i in item_ids), dtype=np.int64)

    def codes_of(self, categories: Iterable[str]) -> np.ndarray:
        """Codes of the named categories; names the catalogue lacks are dropped."""
        index = self._category_index
        return np.array([index[c] for c in categories if c in index], dtype=np.int32)

    @property
    def _category_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.categories)}

    def category_of(self, rows: np.ndarray) -> list[str]:
        names = self.categories
        return [
            names[c] if r >= 0 else "" for r, c in zip(rows, self.category_codes[rows], strict=True)
        ]


@dataclass(frozen=True)
class CandidateSet:
    """Aligned arrays: catalogue row, source score, and the source that found it."""

    rows: np.ndarray
    scores: np.ndarray
    sources: np.ndarray

    @classmethod
    def empty(cls) -> CandidateSet:
        return cls(np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int32))

    @classmethod
    def of(cls, rows: np.ndarray, scores: np.ndarray, source: int) -> CandidateSet:
        rows = np.asarray(rows, dtype=np.int64)
        return cls(rows, np.asarray(scores, dtype=np.float32), np.full(len(rows), source, np.int32))

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, mask_or_index: np.ndarray) -> CandidateSet:
        return CandidateSet(
            self.rows[mask_or_index], self.scores[mask_or_index], self.sources[mask_or_index]
        )

    def head(self, n: int) -> CandidateSet:
        return self.take(np.arange(min(n, len(self))))


def merge(parts: Sequence[CandidateSet]) -> tuple[CandidateSet, dict[int, list[int]]]:
    """Concatenate in priority order and drop repeats, keeping the first occurrence.

    Returns the merged set and, for rows found by more than one source, every source
    that found them (in priority order).
    """
    if not parts:
        return CandidateSet.empty(), {}
    rows = np.concatenate([p.rows for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    sources = np.concatenate([p.sources for p in parts])
    unique, first = np.unique(rows, return_index=True)
    also: dict[int, list[int]] = {}
    if len(first) < len(rows):
        repeated = np.ones(len(rows), bool)
        repeated[first] = False
        # Only the (few) rows found more than once are looked at one by one.
        origin = sources[first[np.searchsorted(unique, rows[repeated])]]
        for row, source, by in zip(
            rows[repeated].tolist(), sources[repeated].tolist(), origin.tolist(), strict=True
        ):
            also.setdefault(row, [by]).append(source)
    first.sort()
    return CandidateSet(rows[first], scores[first], sources[first]), also


class Filter(Protocol):
    """A filter names itself and says, for each candidate row, whether to keep it."""

    @property
    def name(self) -> str: ...

    def keep(self, rows: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ExcludeRows:
    """Drop the given catalogue rows (caller exclusions, already purchased)."""

    name: str
    excluded: np.ndarray

    def keep(self, rows: np.ndarray) -> np.ndarray:
        return ~np.isin(rows, self.excluded)


@dataclass(frozen=True)
class CategoryFilter:
    """Keep only `include` categories (when any are given) and never `exclude` ones."""

    table: ItemTable
    include: np.ndarray
    exclude: np.ndarray
    name: str = "category"

    def keep(self, rows: np.ndarray) -> np.ndarray:
        codes = self.table.category_codes[rows]
        mask = ~np.isin(codes, self.exclude)
        if len(self.include):
            mask &= np.isin(codes, self.include)
        return mask


@dataclass(frozen=True)
class Unavailable:
    """Drop items out of stock or blocked."""

    table: ItemTable
    name: str = "unavailable"

    def keep(self, rows: np.ndarray) -> np.ndarray:
        return self.table.available[rows]


def apply_filters(
    candidates: CandidateSet, filters: Sequence[Filter]
) -> tuple[CandidateSet, dict[str, int]]:
    """Run the filters in order; each one's count is what it removed of what reached it."""
    removed: dict[str, int] = {}
    for f in filters:
        if not len(candidates):
            removed[f.name] = 0
            continue
        mask = f.keep(candidates.rows)
        removed[f.name] = int(len(mask) - mask.sum())
        candidates = candidates.take(mask)
    return candidates, removed


def request_filters(
    table: ItemTable,
    *,
    exclude_item_ids: Sequence[str] = (),
    purchased_item_ids: Sequence[str] = (),
    include_categories: Sequence[str] = (),
    exclude_categories: Sequence[str] = (),
) -> list[Filter]:
    """The filters every request gets, in the order their counts are reported."""
    filters: list[Filter] = [
        ExcludeRows("already_purchased", table.rows_of(purchased_item_ids)),
        ExcludeRows("excluded_by_caller", table.rows_of(exclude_item_ids)),
        Unavailable(table),
    ]
    if include_categories or exclude_categories:
        include = table.codes_of(include_categories)
        if include_categories and not len(include):
            # Only categories the catalogue does not have: nothing can qualify.
            include = np.array([-1], dtype=np.int32)
        filters.append(CategoryFilter(table, include, table.codes_of(exclude_categories)))
    return filters


def popular(table: ItemTable, filters: Sequence[Filter], n: int) -> CandidateSet:
    """The n most popular items that pass the filters: the source that always answers.

    Walks the popularity order in growing slices, so a request with heavy filters
    still gets n items while a plain one looks at little more than n.
    """
    out: list[CandidateSet] = []
    have, start, step = 0, 0, max(2 * n, 64)
    order = table.popular_rows
    while have < n and start < len(order):
        rows = order[start : start + step]
        part = CandidateSet.of(rows, table.popularity[rows], POPULARITY)
        part, _ = apply_filters(part, filters)
        out.append(part)
        have += len(part)
        start += step
        step *= 2
    merged = CandidateSet(
        np.concatenate([p.rows for p in out]) if out else np.empty(0, np.int64),
        np.concatenate([p.scores for p in out]) if out else np.empty(0, np.float32),
        np.concatenate([p.sources for p in out]) if out else np.empty(0, np.int32),
    )
    return merged.head(n)


class CatalogRefresher(SnapshotRefresher):
    """A snapshot refresher that also rebuilds the `ItemTable` after each swap, off the
    request path. `table` is the table of the latest snapshot."""

    _table: ItemTable | None = None
    on_table: list[Callable[[ItemTable], None]]

    async def refresh(self) -> ItemSnapshot:
        snapshot = await super().refresh()
        if snapshot.rows_read == 0 and self._table is not None:
            return snapshot  # no row changed: the table over the same arrays stands
        table = ItemTable.from_snapshot(snapshot)
        for listener in getattr(self, "on_table", ()):
            listener(table)
        self._table = table
        return snapshot

    @property
    def table(self) -> ItemTable:
        if self._table is None:
            self.snapshot  # raises the not-started error  # noqa: B018
            self._table = ItemTable.from_snapshot(self.snapshot)
        return self._table
