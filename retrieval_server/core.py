"""L1 retrieval, free of gRPC: candidate sources, merge, filters.

The pipeline, in order (`RetrievalCore.retrieve`):

1. read the user's and the session's rows from the online store (by entity key);
2. fetch from each source:
   - co-visitation: neighbours of the session's most recent items, each neighbour
     scored by its co-visit counts, newer session items weighing more;
   - ANN: nearest item vectors to the query. With a two-tower model (`TwoTowerSpace`)
     the query is its query tower over the user's and the session's rows just read
     (and any items the request carries); with ALS embeddings (`EmbeddingSpace`) it
     is the user's ALS vector, or for a user the embeddings do not know, the mean
     vector of the session's recent items (then of the user's last items). No query
     (nothing known about the request), no ANN;
   - popularity: the most popular available items, which always answers;
3. merge in that order, keeping each item once with the first source that found it;
4. filter: already purchased, excluded by the caller, unavailable (no stock or
   blocked), categories; each filter's removals are counted;
5. keep the first `num_candidates`.

A source that fails is skipped and the response is flagged degraded; popularity
cannot fail short of the process being broken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from inkling.models.ann import AnnIndex
from inkling.serving.stages import (
    ANN,
    COVISITATION,
    CandidateSet,
    ItemTable,
    apply_filters,
    merge,
    popular,
    request_filters,
)
from inkling.telemetry.clock import StageClock
from inkling.telemetry.instruments import CANDIDATES, count_degraded
from inkling.v1 import resources_pb2

log = logging.getLogger("inkling.retrieval")

SESSION_DECAY = 0.7  # weight of the k-th most recent session item: SESSION_DECAY**k


class QueryEncoder(Protocol):
    """A query tower as serving runs it (`inkling.models.two_tower.QueryEncoder`)."""

    def encode(
        self,
        user_row: Mapping[str, Any] | None,
        session_row: Mapping[str, Any] | None,
        request_items: Sequence[str] = (),
    ) -> np.ndarray | None: ...


class RowSource(Protocol):
    """Reads online rows by entity key (inkling.feature_store.rows.RowReader)."""

    async def read(self, view_name: str, keys: Sequence[str]) -> list[dict[str, Any] | None]: ...


@dataclass(frozen=True)
class EmbeddingSpace:
    """Item and user vectors from one training run, and the ANN index over the items.

    `item_table_rows[i]` is the catalogue row of embedding item i (-1 when the
    catalogue no longer has it), so ANN hits map onto the item table.
    """

    version: str
    index: AnnIndex
    item_vectors: np.ndarray
    user_row: dict[str, int]
    user_vectors: np.ndarray
    item_ids: tuple[str, ...]
    item_row: dict[str, int]
    item_table_rows: np.ndarray

    @classmethod
    def build(
        cls,
        version: str,
        index: AnnIndex,
        item_ids: Sequence[str],
        item_vectors: np.ndarray,
        user_ids: Sequence[str],
        user_vectors: np.ndarray,
        table: ItemTable,
    ) -> EmbeddingSpace:
        return cls(
            version=version,
            index=index,
            item_vectors=item_vectors,
            user_row={u: i for i, u in enumerate(user_ids)},
            user_vectors=user_vectors,
            item_ids=tuple(item_ids),
            item_row={x: i for i, x in enumerate(item_ids)},
            item_table_rows=table.rows_of(item_ids),
        )

    def with_table(self, table: ItemTable) -> EmbeddingSpace:
        """The same vectors mapped onto a refreshed item table."""
        return replace(self, item_table_rows=table.rows_of(self.item_ids))

    @property
    def model_version(self) -> str:
        return f"als:{self.version}"

    def encode(self, rows: QueryRows) -> np.ndarray | None:
        return self.query(rows.user_id, rows.session_items, rows.user_items[:10])

    def query(
        self, user_id: str, session_items: Sequence[str], user_items: Sequence[str]
    ) -> np.ndarray | None:
        if user_id and user_id in self.user_row:
            return self.user_vectors[self.user_row[user_id]]
        for items in (session_items, user_items):
            rows = [self.item_row[i] for i in items if i in self.item_row]
            if rows:
                return self.item_vectors[rows].mean(axis=0)
        return None


@dataclass(frozen=True)
class TwoTowerSpace:
    """A published two-tower version: its query tower and the index over its item vectors.

    `item_ids[i]` is index row i; `item_table_rows` maps the rows onto the item table.
    """

    version: str
    """The index version answered in `served_by.index_version` (`two-tower-<version>`)."""
    model_version: str
    """`<registry model>:<version>`, answered in `served_by.model_version`."""
    index: AnnIndex
    item_ids: tuple[str, ...]
    item_table_rows: np.ndarray
    encoder: QueryEncoder

    @classmethod
    def build(
        cls,
        model: str,
        version: str,
        index: AnnIndex,
        item_ids: Sequence[str],
        encoder: QueryEncoder,
        table: ItemTable,
    ) -> TwoTowerSpace:
        return cls(
            version=f"two-tower-{version}",
            model_version=f"{model}:{version}",
            index=index,
            item_ids=tuple(item_ids),
            item_table_rows=table.rows_of(item_ids),
            encoder=encoder,
        )

    def with_table(self, table: ItemTable) -> TwoTowerSpace:
        return replace(self, item_table_rows=table.rows_of(self.item_ids))

    def encode(self, rows: QueryRows) -> np.ndarray | None:
        return self.encoder.encode(rows.user_row, rows.session_row, rows.request_items)


@dataclass(frozen=True)
class QueryRows:
    """What a space may build its query from: the rows read for the request and the
    session's and the user's items derived from them (newest first)."""

    user_id: str
    user_row: Mapping[str, Any] | None
    session_row: Mapping[str, Any] | None
    session_items: Sequence[str]
    user_items: Sequence[str]
    request_items: Sequence[str] = ()


class AnnSpace(Protocol):
    """Item vectors behind an ANN index and how to query them: `EmbeddingSpace` (ALS)
    or `TwoTowerSpace`."""

    @property
    def version(self) -> str: ...

    @property
    def model_version(self) -> str: ...

    @property
    def index(self) -> AnnIndex: ...

    @property
    def item_table_rows(self) -> np.ndarray: ...

    def with_table(self, table: ItemTable) -> AnnSpace: ...

    def encode(self, rows: QueryRows) -> np.ndarray | None: ...


@dataclass(frozen=True)
class RetrievalRequest:
    user_id: str
    session_id: str
    num_candidates: int
    exclude_item_ids: Sequence[str] = ()
    include_categories: Sequence[str] = ()
    exclude_categories: Sequence[str] = ()
    recent_item_ids: Sequence[str] = ()
    """Items the caller says the session interacted with that the online row may not
    have yet, newest last; they come after the session's own. (The RetrieveCandidates
    contract has no field for them today.)"""


@dataclass
class RetrievalResult:
    candidates: CandidateSet
    table: ItemTable
    also_found_by: dict[int, list[int]]
    removed: dict[str, int]
    index_version: str
    model_version: str = ""
    degraded: list[int] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)
    timings: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class RetrievalLimits:
    ann_candidates: int = 500
    covisit_candidates: int = 200
    session_items: int = 5


def covisited(table: ItemTable, session_rows: np.ndarray, limit: int) -> CandidateSet:
    """Neighbours of the session's items (newest first), scored by decayed co-visit counts."""
    if not len(table.covisit_rows) or not len(session_rows):
        return CandidateSet.empty()
    parts_rows, parts_scores = [], []
    for k, row in enumerate(session_rows.tolist()):
        rows, counts = table.neighbours(row)
        parts_rows.append(rows)
        parts_scores.append(counts * SESSION_DECAY**k)
    if not parts_rows:
        return CandidateSet.empty()
    rows = np.concatenate(parts_rows)
    scores = np.concatenate(parts_scores)
    unique, inverse = np.unique(rows, return_inverse=True)
    total = np.bincount(inverse, weights=scores)
    # The session's own items are what the user just saw, not candidates.
    keep = ~np.isin(unique, session_rows)
    unique, total = unique[keep], total[keep]
    order = np.argsort(-total, kind="stable")[:limit]
    return CandidateSet.of(unique[order], total[order], COVISITATION)


def nearest(space: AnnSpace, query: np.ndarray, limit: int) -> CandidateSet:
    scores, hits = space.index.search(query.reshape(1, -1).astype(np.float32), limit)
    hits, scores = hits[0], scores[0]
    valid = hits >= 0
    rows = space.item_table_rows[hits[valid]]
    known = rows >= 0
    return CandidateSet.of(rows[known], scores[valid][known], ANN)


class RetrievalCore:
    """Wires the sources and filters over the current item table and embeddings."""

    def __init__(
        self,
        table: Callable[[], ItemTable],
        rows: RowSource,
        space: Callable[[], AnnSpace | None],
        limits: RetrievalLimits,
    ) -> None:
        self._table = table
        self._rows = rows
        self._space = space
        self._limits = limits

    async def retrieve(self, request: RetrievalRequest) -> RetrievalResult:
        clock = StageClock()
        table, space = self._table(), self._space()
        degraded: list[int] = []
        detail: list[str] = []
        user_row: dict[str, Any] | None = None
        session_row: dict[str, Any] | None = None
        try:
            if request.user_id:
                (user_row,) = await self._rows.read("user_features", [request.user_id])
            (session_row,) = await self._rows.read("session_features", [request.session_id])
        except Exception as e:  # the store is down: answer without the rows
            log.warning("online rows unavailable: %s", e)
            degraded.append(resources_pb2.DEGRADED_REASON_FEATURES_UNAVAILABLE)
            detail.append(f"online store unavailable: {type(e).__name__}")
        clock.lap("read_rows")

        recent = [
            *((session_row or {}).get("session_recent_items") or []),
            *request.recent_item_ids,
        ]
        session_items = list(reversed(recent))[: self._limits.session_items]
        user_items = list(reversed((user_row or {}).get("user_last_items") or []))
        purchased = (user_row or {}).get("user_purchased_items") or []
        filters = request_filters(
            table,
            exclude_item_ids=request.exclude_item_ids,
            purchased_item_ids=purchased,
            include_categories=request.include_categories,
            exclude_categories=request.exclude_categories,
        )

        parts = [covisited(table, table.rows_of(session_items), self._limits.covisit_candidates)]
        _count("covisitation", len(parts[0]))
        clock.lap("covisitation", {"inkling.candidates": len(parts[0])})
        if space is not None:
            try:
                query = space.encode(
                    QueryRows(
                        user_id=request.user_id,
                        user_row=user_row,
                        session_row=session_row,
                        session_items=session_items,
                        user_items=user_items,
                        request_items=request.recent_item_ids,
                    )
                )
                if query is not None:
                    parts.append(nearest(space, query, self._limits.ann_candidates))
                    _count("ann", len(parts[-1]))
            except Exception as e:
                log.exception("ANN source failed")
                degraded.append(resources_pb2.DEGRADED_REASON_SOURCE_FAILED)
                detail.append(f"ann failed: {type(e).__name__}")
        clock.lap("ann", _ann_attributes(space, parts[1:]))
        merged, also = merge(parts)
        kept, removed = apply_filters(merged, filters)
        clock.lap(
            "filter",
            {
                "inkling.candidates": len(kept),
                **{f"inkling.removed.{name}": count for name, count in removed.items()},
            },
        )
        if len(kept) < request.num_candidates:
            # Popularity fills the rest; it applies the same filters, and its own counts
            # are not reported, since what it skips was never a candidate.
            fill = popular(table, filters, request.num_candidates)
            _count("popularity", len(fill))
            kept, more = merge([kept, fill])
            also.update(more)
        clock.lap("popularity", {"inkling.candidates": len(kept)})
        count_degraded(degraded, "retrieve")
        return RetrievalResult(
            candidates=kept.head(request.num_candidates),
            table=table,
            also_found_by=also,
            removed=removed,
            index_version=space.version if space is not None else "",
            model_version=space.model_version if space is not None else "",
            degraded=degraded,
            detail=detail,
            timings=clock.timings,
        )


def _count(source: str, n: int) -> None:
    CANDIDATES.record(n, {"source": source})


def _ann_attributes(space: AnnSpace | None, found: list[CandidateSet]) -> dict[str, Any]:
    if space is None:
        return {"inkling.candidates": 0}
    return {
        "inkling.candidates": sum(len(part) for part in found),
        "inkling.index.version": space.version,
        "inkling.model.version": space.model_version,
    }
