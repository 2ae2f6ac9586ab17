"""Scorers: every candidate of a request in one pass over the hydrated features.

`BaselineScorer` is the explicit baseline that serves until a learned ranker exists
and stays as the fallback after. For an item of category c:

    score = affinity × popularity × recency
    affinity   = 1 + 2.0·[c is the session's intent category]
                   + 1.5·(share of the session's recent items in c)
                   + 1.5·(the user's long-term weight of c, from user_top_category_weights)
    popularity = ln(2 + item_pop_7d)
    recency    = 0.75 + 0.25·exp(−item_age_days / 30)

The session terms come first because the generator, and real shops, make the current
intent the strongest signal; the user's taste breaks ties; popularity orders within
a category; new items get a mild lift. A missing item row scores with defaults
(no popularity, a year old, unknown category).
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import numpy as np

from inkling.online_features import Hydrated

DEFAULT_AGE_DAYS = 365.0


class Scorer(Protocol):
    version: str

    def score(self, hydrated: Hydrated) -> np.ndarray:
        """One float64 score per item of `hydrated.items`, higher is better."""

    def categories(self, hydrated: Hydrated) -> list[str]:
        """Each item's category ("" when unknown), for the policy."""


class BaselineScorer:
    version = "baseline-affinity-popularity-recency-v1"

    def __init__(
        self,
        intent_weight: float = 2.0,
        session_share_weight: float = 1.5,
        user_weight: float = 1.5,
        age_scale_days: float = 30.0,
    ) -> None:
        self.intent_weight = intent_weight
        self.session_share_weight = session_share_weight
        self.user_weight = user_weight
        self.age_scale_days = age_scale_days

    def categories(self, hydrated: Hydrated) -> list[str]:
        return [c or "" for c in hydrated.items.to_python("item_category")]

    def _session_shares(self, hydrated: Hydrated) -> dict[str, float]:
        recent = list((hydrated.session or {}).get("session_recent_items") or [])
        if not recent:
            return {}
        snapshot = hydrated.items.snapshot
        column = snapshot.column("item_category")
        rows, _ = snapshot.lookup(recent)
        codes = column.values[rows]
        names = [
            column.vocabulary[c]
            for c, p in zip(codes, column.present[rows], strict=True)
            if p and c >= 0
        ]
        counts = Counter(names)
        return {c: n / len(recent) for c, n in counts.items()}

    def score(self, hydrated: Hydrated) -> np.ndarray:
        items = hydrated.items
        categories = self.categories(hydrated)
        session = hydrated.session or {}
        user = hydrated.user or {}
        intent = session.get("session_intent_category") or ""
        shares = self._session_shares(hydrated)
        user_w = dict(
            zip(
                user.get("user_top_categories") or [],
                user.get("user_top_category_weights") or [],
                strict=False,
            )
        )
        affinity = np.fromiter(
            (
                1.0
                + self.intent_weight * (c == intent and c != "")
                + self.session_share_weight * shares.get(c, 0.0)
                + self.user_weight * user_w.get(c, 0.0)
                for c in categories
            ),
            dtype=np.float64,
            count=len(categories),
        )
        pop = items.values("item_pop_7d").astype(np.float64)
        popularity = np.log(2.0 + np.maximum(pop, 0.0))
        age = items.values("item_age_days").astype(np.float64)
        age = np.where(np.isnan(age), DEFAULT_AGE_DAYS, age)
        recency = 0.75 + 0.25 * np.exp(-np.maximum(age, 0.0) / self.age_scale_days)
        return affinity * popularity * recency
