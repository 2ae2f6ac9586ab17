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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from inkling.feature_store.hydrator import Hydrated
from inkling.models.inference import build_form, pad, serving_form

DEFAULT_AGE_DAYS = 365.0


@dataclass(frozen=True)
class Categories:
    """Each item's category as a code into `names` (the last name, "", is "unknown")."""

    codes: np.ndarray
    names: tuple[str, ...]
    index: dict[str, int]

    def of(self, positions: np.ndarray) -> list[str]:
        names = self.names
        return [names[c] for c in self.codes[positions].tolist()]


class _Vocabulary:
    """The item_category vocabulary of the current snapshot and its name → code map,
    rebuilt only when the snapshot (and so the column) changes."""

    def __init__(self) -> None:
        self._column: object = None
        self._names: tuple[str, ...] = ("",)
        self._index: dict[str, int] = {}

    def get(self, hydrated: Hydrated) -> tuple[np.ndarray, tuple[str, ...], dict[str, int]]:
        column = hydrated.items.snapshot.column("item_category")
        if column is not self._column:
            self._names = (*column.vocabulary, "")
            self._index = {name: i for i, name in enumerate(column.vocabulary)}
            self._column = column
        codes = hydrated.items.values("item_category").astype(np.int64)
        codes[codes < 0] = len(self._names) - 1
        return codes, self._names, self._index


class Scorer(Protocol):
    version: str

    def score(self, hydrated: Hydrated) -> np.ndarray:
        """One float64 score per item of `hydrated.items`, higher is better."""

    def categories(self, hydrated: Hydrated) -> Categories:
        """Each item's category, for the policy and the response."""


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
        self._vocabulary = _Vocabulary()

    def categories(self, hydrated: Hydrated) -> Categories:
        codes, names, index = self._vocabulary.get(hydrated)
        return Categories(codes, names, index)

    def _category_weights(self, hydrated: Hydrated, cats: Categories) -> np.ndarray:
        """Affinity − 1 per category code, from the session and the user rows."""
        weights = np.zeros(len(cats.names))
        session = hydrated.session or {}
        user = hydrated.user or {}
        intent = cats.index.get(session.get("session_intent_category") or "")
        if intent is not None:
            weights[intent] += self.intent_weight
        recent = list(session.get("session_recent_items") or [])
        if recent:
            snapshot = hydrated.items.snapshot
            column = snapshot.column("item_category")
            rows, _ = snapshot.lookup(recent)
            codes = column.values[rows][column.present[rows]]
            codes = codes[codes >= 0]
            # The vocabulary is the same column's, so its codes index `weights` directly.
            weights[: len(column.vocabulary)] += (
                self.session_share_weight
                * np.bincount(codes, minlength=len(column.vocabulary))
                / len(recent)
            )
        for name, w in zip(
            user.get("user_top_categories") or [],
            user.get("user_top_category_weights") or [],
            strict=False,
        ):
            code = cats.index.get(name)
            if code is not None and w is not None:
                weights[code] += self.user_weight * w
        weights[-1] = 0.0  # unknown category: no affinity
        return weights

    def score(self, hydrated: Hydrated) -> np.ndarray:
        items = hydrated.items
        cats = self.categories(hydrated)
        affinity = 1.0 + self._category_weights(hydrated, cats)[cats.codes]
        pop = items.values("item_pop_7d").astype(np.float64)
        popularity = np.log(2.0 + np.maximum(pop, 0.0))
        age = items.values("item_age_days").astype(np.float64)
        age = np.where(np.isnan(age), DEFAULT_AGE_DAYS, age)
        recency = 0.75 + 0.25 * np.exp(-np.maximum(age, 0.0) / self.age_scale_days)
        return affinity * popularity * recency


class SequenceScorer:
    """A learned next-item model (SASRec) as the ranker's scorer.

    The sequence is the user's last items (`user_last_items`) followed by the
    session's recent items (`session_recent_items`), newest last, consecutive repeats
    collapsed; when the user row already ends with the session's first items, the
    overlap is counted once. Each position carries the model's same-session-next
    flag: 0 where the history gives way to the session, 1 elsewhere (the user row
    does not say where its older sessions began), and at the newest position 1 when
    the session has items (the user is mid-session) or 0 when it has none. So what
    the user did a moment ago weighs in beside their history. One forward pass
    scores the whole catalogue; the candidates' scores are gathered from it. A
    candidate the model never saw in training scores below every known one, ordered
    among themselves by the baseline.
    """

    def __init__(self, model: Any, version: str, directory: Path | None = None) -> None:
        self.model = model
        self.version = version
        # ONNX Runtime when the version directory has a checked model.onnx, else
        # TorchScript: the same scores, measured faster than eager by `inkling bench ranker`.
        if directory is None:
            self._form, self.form = build_form(model, "torchscript"), "torchscript"
        else:
            self._form, self.form = serving_form(model, directory)
        self._max_len = int(model.config.max_len)
        self._index = {item: i for i, item in enumerate(model.item_ids) if i > 0}
        self._baseline = BaselineScorer()

    def categories(self, hydrated: Hydrated) -> Categories:
        return self._baseline.categories(hydrated)

    def warm(self) -> None:
        """One scoring call, so the first request does not pay the runtime's set-up."""
        items = np.arange(1, min(self.model.n_items, self._max_len) + 1, dtype=np.int64)
        self._catalogue_scores(items, np.ones(len(items), dtype=np.int64))

    def sequence(self, hydrated: Hydrated) -> tuple[np.ndarray, np.ndarray]:
        """The model's input: item indices, oldest first, and their flags."""
        history = list((hydrated.user or {}).get("user_last_items") or [])
        session = list((hydrated.session or {}).get("session_recent_items") or [])
        overlap = next(
            (k for k in range(min(len(history), len(session)), 0, -1)
             if history[-k:] == session[:k]),
            0,
        )  # fmt: skip
        index = self._index
        tagged = [(index[i], 0) for i in history[: len(history) - overlap] if i in index]
        tagged += [(index[i], 1) for i in session if i in index]
        kept = [t for k, t in enumerate(tagged) if k == 0 or tagged[k - 1][0] != t[0]]
        items = np.fromiter((i for i, _ in kept), np.int64, len(kept))
        part = np.fromiter((p for _, p in kept), np.int64, len(kept))
        flags = np.r_[part[1:] == part[:-1], part[-1:] == 1].astype(np.int64)
        return items, flags

    def _catalogue_scores(self, sequence: np.ndarray, flags: np.ndarray) -> np.ndarray:
        if not len(sequence):  # no history: the model's own cold-start prior
            return np.asarray(self.model.score([sequence])[0])
        return np.asarray(self._form(*pad(sequence, flags, self._max_len)))

    def score(self, hydrated: Hydrated) -> np.ndarray:
        everything = self._catalogue_scores(*self.sequence(hydrated))
        index = self._index
        positions = np.fromiter(
            (index.get(i, 0) for i in hydrated.items.ids), np.int64, len(hydrated.items.ids)
        )
        scores = everything[positions].astype(np.float64)
        unknown = positions == 0
        if unknown.any():
            floor = scores[~unknown].min() if (~unknown).any() else 0.0
            base = self._baseline.score(hydrated)[unknown]
            scores[unknown] = floor - 1.0 - 1.0 / (1.0 + base)  # below all known, baseline order
        return scores
