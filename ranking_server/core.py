"""L2 ranking, free of gRPC: hydrate, score, apply the policy; and Recommend.

RankCandidates: hydrate the user's and session's rows (Redis, per request) and every
candidate's item row (the in-process snapshot), score all candidates in one pass,
then apply the policy: business boosts by category, then at most
`max_per_category` items of one category in the first `diversity_window` places.

Recommend: retrieval (through the `Retriever` port, within its budget), then the
same ranking. Fallbacks, each named in the response:

- retrieval unreachable or past its budget: the most popular items that pass the
  request's filters;
- an item row missing from the snapshot: that item is scored with defaults;
- the online store unreachable: the user and session count as unknown;
- the scorer failing or past its budget: candidates keep their retrieval order.

An unknown user or session is the ordinary cold start, not a degradation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from opentelemetry import trace

from inkling.bandit import CONTEXT_FEATURES, ItemTerms, LinearUCB, context_rows
from inkling.experiments import Arm, Experiment
from inkling.exploration import GREEDY, Guardrails, PolicySpec, draw
from inkling.feature_store.hydrator import Hydrated, Hydrator
from inkling.feature_store.snapshot import ItemSnapshot
from inkling.feature_store.values import Row
from inkling.serving.runtime import Deadline
from inkling.serving.serve_logger import Explored
from inkling.serving.stages import (
    CALLER,
    CandidateSet,
    ItemTable,
    popular,
    request_filters,
)
from inkling.telemetry.clock import StageClock
from inkling.telemetry.instruments import POLICY_IMPRESSIONS, count_degraded
from inkling.v1 import resources_pb2
from ranking_server.scoring import BaselineScorer, Categories, Scorer

log = logging.getLogger("inkling.ranking")

Reason = int  # a resources_pb2.DegradedReason value
BANDIT_SHORTLIST = 4
"""The bandit draws its pool from the ranker's best BANDIT_SHORTLIST x pool candidates."""


class RetrievalUnavailable(Exception):
    """The retrieval server could not be reached or failed."""


class RetrievalTimeout(Exception):
    """The retrieval server did not answer within the budget."""


@dataclass(frozen=True)
class Retrieved:
    item_ids: list[str]
    sources: list[int]
    scores: list[float]
    index_version: str
    removed: dict[str, int]


class Retriever(Protocol):
    """The retrieval server, as Recommend sees it (a gRPC stub in production)."""

    async def retrieve(
        self,
        *,
        user_id: str,
        session_id: str,
        num_candidates: int,
        exclude_item_ids: Sequence[str],
        include_categories: Sequence[str],
        exclude_categories: Sequence[str],
        timeout_s: float,
    ) -> Retrieved: ...


@dataclass(frozen=True)
class Policy:
    """Business rules applied after scoring."""

    max_per_category: int = 3
    diversity_window: int = 20
    category_boosts: dict[str, float] = field(default_factory=dict)
    surfaces: dict[str, PolicySpec] = field(default_factory=dict)
    """The ranking policy by request surface; "*" for surfaces not named; greedy else."""

    def of(self, surface: str) -> PolicySpec:
        return self.surfaces.get(surface) or self.surfaces.get("*") or GREEDY


@dataclass(frozen=True)
class Budgets:
    retrieval_s: float = 0.040
    scorer_s: float = 0.020
    default_deadline_s: float = 0.100
    retrieve_candidates: int = 1000


@dataclass
class Ranked:
    """A ranked list, best first, with what produced it."""

    item_ids: list[str]
    scores: np.ndarray
    sources: np.ndarray
    categories: list[str]
    model_version: str
    index_version: str = ""
    arm: str = ""
    """The experiment arm the request was assigned to; empty when none ran."""
    degraded: list[Reason] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)
    removed: dict[str, int] = field(default_factory=dict)
    timings: list[tuple[str, int]] = field(default_factory=list)
    hydrated: Hydrated | None = None
    propensities: np.ndarray | None = None
    """Per item, its probability at its position given those above; None: all 1."""
    exploration: Explored | None = None
    """A stochastic policy's draw (for the serve log); None for a greedy one."""


def diversify(
    categories: np.ndarray,
    max_per_category: int,
    window: int,
    placed: np.ndarray | None = None,
) -> np.ndarray:
    """A reordering of positions (already best first) with at most `max_per_category` of
    one category among the first `window`; the items it defers keep their order after.
    `placed`: the categories of items already above these (they count, and take their
    places in the window)."""
    n = len(categories)
    counts: dict[int, int] = {}
    for c in (placed if placed is not None else np.empty(0, np.int64)).tolist():
        counts[c] = counts.get(c, 0) + 1
    window -= 0 if placed is None else len(placed)
    if n <= 1 or window <= 0:
        return np.arange(n)
    first: list[int] = []
    deferred: list[int] = []
    rest = n
    for i, c in enumerate(categories.tolist()):
        if len(first) >= window:
            rest = i
            break
        if counts.get(c, 0) < max_per_category:
            counts[c] = counts.get(c, 0) + 1
            first.append(i)
        else:
            deferred.append(i)
    return np.concatenate(
        [np.asarray(first + deferred, dtype=np.int64), np.arange(rest, n, dtype=np.int64)]
    )


class RankingCore:
    """Hydrates, scores and orders candidates; composes retrieval for Recommend."""

    def __init__(
        self,
        hydrator: Hydrator,
        table: Any,
        retriever: Retriever | None,
        policy: Policy,
        budgets: Budgets,
        scorer: Scorer | None = None,
        executor: Executor | None = None,
    ) -> None:
        """`table` is a zero-argument callable returning the current ItemTable."""
        self._hydrator = hydrator
        self._table = table
        self._retriever = retriever
        self._policy = policy
        self._budgets = budgets
        self.scorer: Scorer = scorer or BaselineScorer()
        # The bandit's current model of a surface; None when it is unknown or stale (the
        # surface then serves greedily). Set by the app when a surface runs a bandit.
        self.bandit: Callable[[str], LinearUCB | None] = lambda surface: None
        self._terms: ItemTerms | None = None  # the bandit's item contexts, per snapshot
        # An experiment: `candidate` serves the users `design` assigns to the arm "candidate".
        self.candidate: Scorer | None = None
        self.design: Experiment | None = None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")

    @property
    def experiment(self) -> str:
        """The running experiment's name; empty when none runs."""
        return self.design.name if self.design is not None and self.candidate else ""

    def start_experiment(self, name: str, candidate: Scorer, share: float, salt: str = "") -> None:
        """Serve `share` of the users (by `Experiment.assign` on the user id, else the
        session id) with `candidate`; the others are the arm "control"."""
        arms = (Arm("candidate", share, candidate.version), Arm("control", 1.0 - share))
        self.design = Experiment(name, arms if share < 1 else arms[:1], salt=salt)
        self.candidate = candidate

    def stop_experiment(self) -> None:
        """Every user back on `scorer`."""
        self.candidate = None
        self.design = None

    def _route(self, user_id: str, session_id: str) -> tuple[Scorer, str]:
        """The scorer of a request and its arm ("" when no experiment runs)."""
        candidate, design = self.candidate, self.design
        if candidate is None or design is None:
            return self.scorer, ""
        arm = design.assign(user_id or session_id) or "control"
        return (candidate if arm == "candidate" else self.scorer), arm

    @property
    def feature_columns(self) -> dict[str, list[str]]:
        """Feature names of the service by entity: what debug output shows."""
        columns = self._hydrator.reader.columns
        return {
            kind: [f for v in columns.views_keyed_by(key) for f in v.feature_names]
            for kind, key in (("user", "user_id"), ("session", "session_id"), ("item", "item_id"))
        }

    async def _hydrate(
        self,
        user_id: str,
        session_id: str,
        item_ids: Sequence[str],
        out: Ranked,
        rows: tuple[ItemSnapshot, np.ndarray] | None = None,
        known: Mapping[str, Row | None] | None = None,
    ) -> Hydrated:
        try:
            return await self._hydrator.hydrate(
                user_id or None, session_id or None, item_ids, rows, known
            )
        except Exception as e:
            log.warning("online store unavailable, ranking without user/session rows: %s", e)
            out.degraded.append(resources_pb2.DEGRADED_REASON_FEATURES_UNAVAILABLE)
            out.detail.append(f"online store unavailable: {type(e).__name__}")
            return await self._hydrator.hydrate(None, None, item_ids, rows)

    async def _score(
        self, scorer: Scorer, hydrated: Hydrated, deadline: Deadline, out: Ranked
    ) -> np.ndarray | None:
        budget = deadline.budget(self._budgets.scorer_s)
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._executor, scorer.score, hydrated), budget
            )
        except TimeoutError:
            out.degraded.append(resources_pb2.DEGRADED_REASON_SCORER_DEADLINE)
            out.detail.append(f"scorer exceeded its {budget * 1000:.0f} ms budget")
        except Exception as e:
            log.exception("scorer failed")
            out.degraded.append(resources_pb2.DEGRADED_REASON_SCORER_FAILED)
            out.detail.append(f"scorer failed: {type(e).__name__}")
        return None

    async def rank(
        self,
        user_id: str,
        session_id: str,
        candidates: CandidateSet,
        table: ItemTable,
        deadline: Deadline,
        out: Ranked,
        clock: StageClock,
        num_results: int = 0,
        explicit_ids: Sequence[str] | None = None,
        known: Mapping[str, Row | None] | None = None,
        surface: str = "",
        seed: int = 0,
    ) -> Ranked:
        """Order the candidates (catalogue rows, or `explicit_ids` for a caller's list);
        `known`: feature views this request has read already (not read again); the
        surface's policy draws with `seed` (`inkling.exploration`)."""
        rows = None
        if explicit_ids is not None:
            item_ids = list(explicit_ids)
        else:
            item_ids = table.ids[candidates.rows].tolist()
            if table.snapshot is not None:  # its rows are the snapshot's: no second lookup
                rows = (table.snapshot, candidates.rows)
        hydrated = await self._hydrate(user_id, session_id, item_ids, out, rows, known)
        out.hydrated = hydrated
        missing = int(hydrated.items.missing.sum())
        if missing:
            out.degraded.append(resources_pb2.DEGRADED_REASON_FEATURES_MISSING)
            out.detail.append(f"{missing} item rows missing: scored with defaults")
        clock.lap(
            "hydrate",
            {"inkling.candidates": len(item_ids), "inkling.items.missing": missing},
            phases=hydrated.phases,
        )
        # One scorer per request, even if a new model is swapped in meanwhile.
        scorer, arm = self._route(user_id, session_id)
        out.model_version = scorer.version
        out.arm = arm
        scores = await self._score(scorer, hydrated, deadline, out)
        clock.lap(
            "score", {"inkling.model.version": scorer.version, "inkling.scored": scores is not None}
        )
        cats = scorer.categories(hydrated)
        if scores is None:
            # Retrieval order: a falling score keeps it through the policy's stable sort.
            scores = np.linspace(1.0, 0.0, num=len(item_ids), dtype=np.float64)
        else:
            boosts = self._policy.category_boosts
            if boosts:
                factor = np.array([boosts.get(name, 1.0) for name in cats.names])
                scores = scores * factor[cats.codes]
        order = np.argsort(-scores, kind="stable")
        spec = self._policy.of(surface)
        model = self.bandit(surface) if spec.kind == "bandit" else None
        if spec.kind == "bandit" and model is None:  # no current parameters: said so
            out.detail.append("bandit parameters unavailable or stale: greedy order")
            spec = GREEDY
        if spec.stochastic and len(order):
            if explicit_ids is not None:
                items = hydrated.items
                if items.snapshot is table.snapshot:  # the rows hydration looked up
                    at = np.where(items.found, items.rows, -1)
                else:
                    at = table.rows_of(item_ids)
                showable = (at >= 0) & table.available[np.maximum(at, 0)]
            else:
                showable = table.available[candidates.rows]
            order = self._explore(
                spec, model, seed, order, scores, showable, cats, hydrated, num_results, out
            )
        else:
            order = order[
                diversify(
                    cats.codes[order],
                    self._policy.max_per_category,
                    self._policy.diversity_window,
                )
            ]
            if num_results:
                order = order[:num_results]
            POLICY_IMPRESSIONS.add(len(order), {"policy": "greedy", "explored": False})
        clock.lap("policy", {"inkling.results": len(order)})
        operation = "rank_candidates" if explicit_ids is not None else "recommend"
        count_degraded(out.degraded, operation)
        span = trace.get_current_span()
        if span.is_recording():  # the RPC's server span: what a reader of the trace needs
            span.set_attributes(
                {
                    "inkling.model.version": scorer.version,
                    "inkling.experiment.arm": arm or "none",
                    "inkling.feature_service": self._hydrator.reader.columns.service,
                    "inkling.degraded.reasons": [
                        resources_pb2.DegradedReason.Name(r) for r in out.degraded
                    ],
                }
            )
        out.item_ids = [item_ids[i] for i in order.tolist()]
        out.scores = scores[order].astype(np.float32)
        out.sources = candidates.sources[order]
        out.categories = cats.of(order)
        out.timings = clock.timings
        return out

    def _explore(
        self,
        spec: PolicySpec,
        model: LinearUCB | None,
        seed: int,
        order: np.ndarray,
        scores: np.ndarray,
        showable: np.ndarray,
        cats: Categories,
        hydrated: Hydrated,
        num_results: int,
        out: Ranked,
    ) -> np.ndarray:
        """A stochastic policy's list: positions drawn from the pool (the best `spec.pool`
        showable candidates by the policy's values: the ranker's scores, or `model`'s over
        the ranker's best `BANDIT_SHORTLIST` x `spec.pool`), then the other candidates in
        the greedy order under the diversity rule. Sets the answer's propensities and what
        the serve log records."""
        candidates = order[showable[order]]
        candidates = candidates[: spec.pool * (BANDIT_SHORTLIST if spec.kind == "bandit" else 1)]
        k = num_results or len(order)
        items = hydrated.items
        session = hydrated.session or {}
        intent = cats.index.get(session.get("session_intent_category") or "", -1)

        terms = self._terms
        if terms is None or terms.snapshot is not items.snapshot:  # once per snapshot
            terms = self._terms = ItemTerms.of(items.snapshot)
        popularity, freshness = terms.take(items, candidates)
        x = context_rows(
            scores[candidates], popularity, freshness, cats.codes[candidates] == intent
        )
        values = scores[candidates] if model is None else model.over_ranker(x)
        top = np.argsort(-values, kind="stable")[: spec.pool]
        pool, x, values = candidates[top], x[top], values[top]
        rules = Guardrails(self._policy.max_per_category, self._policy.diversity_window)
        slate = draw(spec, values, scores[pool], cats.codes[pool], k, seed, rules)
        head = pool[slate.order]
        rest = order[:0]
        if len(head) < k:  # the other candidates follow in the greedy order, under the rule
            left = np.ones(len(scores), bool)
            left[head] = False
            rest = order[left[order]]
            rest = rest[
                diversify(cats.codes[rest], rules.max_per_category, rules.window, cats.codes[head])
            ]
        full = np.concatenate([head, rest])[:k]
        shown = len(full)
        explored = np.concatenate([slate.explored, np.zeros(len(rest), bool)])[:shown]
        out.propensities = np.concatenate([slate.propensities, np.ones(len(rest))])[:shown]
        out.exploration = Explored(
            policy=spec.name,
            seed=seed,
            explored=explored,
            pool_item_ids=[items.ids[i] for i in pool.tolist()],
            pool_scores=scores[pool].astype(np.float32),
            pool_categories=cats.of(pool),
            pool_values=np.asarray(values, np.float32),
            feature_names=CONTEXT_FEATURES,
            features=x,
        )
        n_explored = int(explored.sum())
        POLICY_IMPRESSIONS.add(n_explored, {"policy": spec.kind, "explored": True})
        POLICY_IMPRESSIONS.add(shown - n_explored, {"policy": spec.kind, "explored": False})
        return full

    async def rank_candidates(
        self,
        user_id: str,
        session_id: str,
        item_ids: Sequence[str],
        num_results: int,
        deadline: Deadline,
        surface: str = "",
        seed: int = 0,
    ) -> Ranked:
        clock = StageClock()
        out = self._empty()
        candidates = CandidateSet.of(
            np.zeros(len(item_ids), np.int64), np.zeros(len(item_ids)), CALLER
        )
        return await self.rank(
            user_id,
            session_id,
            candidates,
            self._table(),
            deadline,
            out,
            clock,
            num_results=num_results,
            explicit_ids=item_ids,
            surface=surface,
            seed=seed,
        )

    async def recommend(
        self,
        user_id: str,
        session_id: str,
        num_results: int,
        deadline: Deadline,
        exclude_item_ids: Sequence[str] = (),
        include_categories: Sequence[str] = (),
        exclude_categories: Sequence[str] = (),
        surface: str = "",
        seed: int = 0,
    ) -> Ranked:
        clock = StageClock()
        out = self._empty()
        table: ItemTable = self._table()
        candidates: CandidateSet | None = None
        reason: Reason | None = None
        if self._retriever is None:
            reason = resources_pb2.DEGRADED_REASON_RETRIEVAL_UNAVAILABLE
        else:
            budget = deadline.budget(self._budgets.retrieval_s, reserve_s=self._budgets.scorer_s)
            try:
                got = await self._retriever.retrieve(
                    user_id=user_id,
                    session_id=session_id,
                    num_candidates=self._budgets.retrieve_candidates,
                    exclude_item_ids=exclude_item_ids,
                    include_categories=include_categories,
                    exclude_categories=exclude_categories,
                    timeout_s=budget,
                )
                rows = table.rows_of(got.item_ids)
                known = rows >= 0
                candidates = CandidateSet(
                    rows[known],
                    np.asarray(got.scores, np.float32)[known],
                    np.asarray(got.sources, np.int32)[known],
                )
                out.index_version = got.index_version
                out.removed = dict(got.removed)
            except RetrievalTimeout:
                reason = resources_pb2.DEGRADED_REASON_RETRIEVAL_DEADLINE
            except RetrievalUnavailable as e:
                reason = resources_pb2.DEGRADED_REASON_RETRIEVAL_UNAVAILABLE
                out.detail.append(f"retrieval: {e}")
        clock.lap(
            "retrieve",
            {
                "inkling.candidates": len(candidates) if candidates is not None else 0,
                "inkling.index.version": out.index_version,
            },
        )
        read_views: Mapping[str, Row | None] | None = None
        if candidates is None:
            assert reason is not None
            out.degraded.append(reason)
            candidates, read_views = await self._popular_fallback(
                user_id, table, exclude_item_ids, include_categories, exclude_categories, out
            )
            clock.lap("popularity_fallback")
        return await self.rank(
            user_id,
            session_id,
            candidates,
            table,
            deadline,
            out,
            clock,
            num_results=num_results,
            known=read_views,
            surface=surface,
            seed=seed,
        )

    async def _popular_fallback(
        self,
        user_id: str,
        table: ItemTable,
        exclude_item_ids: Sequence[str],
        include_categories: Sequence[str],
        exclude_categories: Sequence[str],
        out: Ranked,
    ) -> tuple[CandidateSet, Mapping[str, Row | None] | None]:
        """Popular items the request's filters keep, and the user's feature views read to
        learn what they bought (for `rank`, which then does not read them again)."""
        purchased: list[str] = []
        known = None
        if user_id:
            try:
                hydrated = await self._hydrator.hydrate(user_id, None, [])
                purchased = list((hydrated.user or {}).get("user_purchased_items") or [])
                known = hydrated.views
            except Exception:
                purchased = []
        filters = request_filters(
            table,
            exclude_item_ids=exclude_item_ids,
            purchased_item_ids=purchased,
            include_categories=include_categories,
            exclude_categories=exclude_categories,
        )
        # What popularity skips was never a candidate, so no filter counts are reported.
        return popular(table, filters, self._budgets.retrieve_candidates), known

    def _empty(self) -> Ranked:
        return Ranked(
            item_ids=[],
            scores=np.empty(0, np.float32),
            sources=np.empty(0, np.int32),
            categories=[],
            model_version=self.scorer.version,
        )
