"""Session-aware two-tower retrieval: a query tower and an item tower whose dot product
scores an item for a request, so the catalogue's item vectors go into a FAISS index and
one query vector per request finds the nearest items.

Query tower (the request: who the user is and what the session is doing):

- the session's recent items (``session_recent_items``, newest first) pooled with
  learned recency weights, plus the newest item on its own;
- the user's last items (``user_last_items``), pooled the same way;
- the user's top categories weighted by their shares (``user_top_categories``,
  ``user_top_category_weights``);
- the session's intent category (``session_intent_category``);

concatenated and passed through a two-layer MLP. Item tower: the item's id, category
and price bucket embedded, concatenated, through a two-layer MLP. Both outputs are
L2-normalised, so the score is a cosine and the index searches inner products.

The item id and category embedding tables are shared by the two towers: an item seen
in sessions and an item chosen next are the same thing, which matters on small logs.

Training (Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations", RecSys 2019): a softmax over the batch's own targets (in-batch
negatives) with temperature ``τ``; since popular items are in-batch negatives more
often, each column's logit is corrected by ``- log Q(item)``, ``Q`` the item's share of
the training targets (the logQ correction). Another row's target equal to a row's own
target is not a negative for it (masked). Validation is the last part of the rows in
time; training stops early on validation recall@k over the whole catalogue (exact
search), restoring the best weights, or at the time budget.

Item indices are ``1..n_items`` (``0`` pads); category index ``1`` is "unknown", and
price bucket ``0`` "no price". The feature names are those of the Feast feature
service ``retrieval_v1`` (see `QUERY_FEATURES`); training rows (Feast historical
retrieval) and online rows (Redis, by entity key) are encoded by the same
:meth:`QueryFeatures.from_columns`, so training and serving cannot drift apart.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inkling.errors import InvalidInputError, NotFoundError
from inkling.models.losses import in_batch_logits

__all__ = [
    "QUERY_FEATURES",
    "QueryEncoder",
    "QueryFeatures",
    "TwoTowerConfig",
    "TwoTowerModel",
    "TwoTowerNet",
    "TwoTowerVocab",
    "in_batch_logits",
    "recall_at_k",
]

QUERY_FEATURES: dict[str, tuple[str, ...]] = {
    "user_features": ("user_top_categories", "user_top_category_weights", "user_last_items"),
    "session_features": ("session_recent_items", "session_intent_category"),
}
"""The query tower's inputs: feature view → features, all in `retrieval_v1`."""

PAD = 0
UNKNOWN_CATEGORY = 1
"""Category index of a missing or unlisted category (the pipeline's "unknown" too)."""
_UNKNOWN_NAMES = frozenset({"", "unknown"})
_FORMAT_VERSION = 1
_WEIGHTS = "two_tower.pt"
_CONFIG = "two_tower.json"
_VOCAB = "vocab.json"


@dataclass(frozen=True)
class TwoTowerConfig:
    """Hyperparameters. On the demo log (~22k training clicks, 3k items, 2 cores) the
    defaults train in under 10 s. The temperature was the best on validation recall@100
    of 0.05, 0.1, 0.2 and 0.3 there; batch size, dropout, learning rate and widths were
    tried around these values without a difference beyond the validation noise (~1 %).

    Attributes:
        dim: Output width of both towers (the index's vector size).
        id_dim: Item id embedding width.
        category_dim: Category embedding width.
        price_dim: Price-bucket embedding width.
        hidden: Hidden width of each tower's MLP.
        price_buckets: Quantile buckets of log-price (bucket 0 = no price).
        session_len: Most recent session items the query sees.
        history_len: Most recent user items the query sees.
        top_categories: User top categories the query sees.
        temperature: Softmax temperature over cosine scores.
        logq_correction: Subtract log Q(item) from in-batch logits.
        dropout: Dropout in the MLPs.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Rows per step (= in-batch negatives + 1).
        max_epochs: Upper bound on passes over the training rows.
        patience: Stop after this many epochs without a better validation recall.
        max_train_seconds: Wall-clock budget; training stops after the first epoch past it.
        valid_share: The last share of the rows in time used for validation.
        eval_k: Validation recall@k (exact search over the whole catalogue).
        max_valid: Validation rows evaluated (the newest when there are more).
        seed: Seeds initialisation, shuffling and dropout.
        threads: Torch intra-op threads while training (restored after). One is the
            fastest here: this model's matrices are small, and on a busy 2-core machine
            two spinning OpenMP threads made epochs 10-30x slower.
    """

    dim: int = 64
    id_dim: int = 64
    category_dim: int = 16
    price_dim: int = 8
    hidden: int = 128
    price_buckets: int = 10
    session_len: int = 10
    history_len: int = 20
    top_categories: int = 3
    temperature: float = 0.2
    logq_correction: bool = True
    dropout: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 1e-5
    batch_size: int = 512
    max_epochs: int = 60
    patience: int = 4
    max_train_seconds: float | None = 60.0
    valid_share: float = 0.1
    eval_k: int = 100
    max_valid: int = 5_000
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name in (
            "dim", "id_dim", "category_dim", "price_dim", "hidden", "price_buckets",
            "session_len", "history_len", "top_categories", "batch_size", "max_epochs",
            "patience", "eval_k", "max_valid", "threads",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise InvalidInputError(
                    f"{name} must be at least 1, got {getattr(self, name)}", field=name
                )
        if self.batch_size < 2:
            raise InvalidInputError(
                "batch_size must be at least 2 (in-batch negatives)", "batch_size"
            )
        if not self.temperature > 0:
            raise InvalidInputError(
                f"temperature must be positive, got {self.temperature}", "temperature"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInputError(f"dropout must be in [0, 1), got {self.dropout}", "dropout")
        if not self.lr > 0:
            raise InvalidInputError(f"lr must be positive, got {self.lr}", "lr")
        if not 0.0 <= self.valid_share < 1.0:
            raise InvalidInputError(
                f"valid_share must be in [0, 1), got {self.valid_share}", "valid_share"
            )
        if self.max_train_seconds is not None and not self.max_train_seconds > 0:
            raise InvalidInputError(
                f"max_train_seconds must be positive, got {self.max_train_seconds}",
                "max_train_seconds",
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TwoTowerConfig:
        """Build from :func:`dataclasses.asdict` output, ignoring unknown keys."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class TwoTowerVocab:
    """Item and category vocabularies and each item's attributes.

    ``item_ids[i]`` has index ``i + 1``; ``item_category[i]`` and ``item_price_bucket[i]``
    are its category index and price bucket. ``categories[c - 2]`` is category index
    ``c`` (0 pads, 1 is unknown).
    """

    item_ids: tuple[str, ...]
    categories: tuple[str, ...]
    price_edges: tuple[float, ...]
    """Interior quantile edges of log1p(price); bucket = 1 + number of edges <= value."""
    item_category: np.ndarray
    item_price_bucket: np.ndarray

    def __post_init__(self) -> None:
        if len(set(self.item_ids)) != len(self.item_ids):
            raise InvalidInputError("item ids repeat", field="item_ids")
        n = len(self.item_ids)
        if self.item_category.shape != (n,) or self.item_price_bucket.shape != (n,):
            raise InvalidInputError(
                f"{n} items but {self.item_category.shape} categories and "
                f"{self.item_price_bucket.shape} price buckets"
            )

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_categories(self) -> int:
        """Category indices, padding and unknown included."""
        return len(self.categories) + 2

    @property
    def n_price_buckets(self) -> int:
        return len(self.price_edges) + 2

    @classmethod
    def build(
        cls,
        item_ids: Sequence[str],
        item_categories: Sequence[str | None],
        item_prices: Sequence[float | None],
        price_buckets: int = 10,
    ) -> TwoTowerVocab:
        """The vocabulary of a catalogue: one entry per item with its category and price."""
        if not (len(item_ids) == len(item_categories) == len(item_prices)):
            raise InvalidInputError(
                f"{len(item_ids)} item ids, {len(item_categories)} categories and "
                f"{len(item_prices)} prices: they must align"
            )
        if not len(item_ids):
            raise InvalidInputError("the catalogue has no items", field="item_ids")
        if any(not isinstance(i, str) or not i for i in item_ids):
            raise InvalidInputError("item ids must be non-empty strings", field="item_ids")
        names = sorted({c for c in item_categories if isinstance(c, str) and _known_category(c)})
        prices = np.array([np.nan if p is None else float(p) for p in item_prices], np.float64)
        valid = np.isfinite(prices) & (prices >= 0)
        logs = np.log1p(prices[valid])
        edges: list[float] = []
        if len(logs) and price_buckets > 1:
            qs = np.quantile(logs, np.linspace(0, 1, price_buckets + 1)[1:-1])
            edges = sorted({float(q) for q in qs})
        vocab = cls(
            item_ids=tuple(item_ids),
            categories=tuple(names),
            price_edges=tuple(edges),
            item_category=np.zeros(len(item_ids), np.int64),
            item_price_bucket=np.zeros(len(item_ids), np.int64),
        )
        vocab.item_category[:] = vocab.category_indices(item_categories)
        vocab.item_price_bucket[:] = vocab.price_bucket(prices)
        return vocab

    def category_indices(self, names: Sequence[Any]) -> np.ndarray:
        index = self.category_index
        return np.fromiter(
            (index.get(c, UNKNOWN_CATEGORY) if isinstance(c, str) else UNKNOWN_CATEGORY
             for c in names),
            np.int64, len(names),
        )  # fmt: skip

    def price_bucket(self, prices: np.ndarray) -> np.ndarray:
        prices = np.asarray(prices, dtype=np.float64)
        valid = np.isfinite(prices) & (prices >= 0)
        buckets = np.zeros(len(prices), np.int64)
        edges = np.asarray(self.price_edges, np.float64)
        buckets[valid] = 1 + np.searchsorted(edges, np.log1p(prices[valid]), side="right")
        return buckets

    @property
    def item_index(self) -> dict[str, int]:
        return {item: i + 1 for i, item in enumerate(self.item_ids)}

    @property
    def category_index(self) -> dict[str, int]:
        return {c: i + 2 for i, c in enumerate(self.categories)}

    def to_json(self) -> dict[str, Any]:
        return {
            "item_ids": list(self.item_ids),
            "categories": list(self.categories),
            "price_edges": list(self.price_edges),
            "item_category": self.item_category.tolist(),
            "item_price_bucket": self.item_price_bucket.tolist(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TwoTowerVocab:
        try:
            return cls(
                item_ids=tuple(str(i) for i in data["item_ids"]),
                categories=tuple(str(c) for c in data["categories"]),
                price_edges=tuple(float(e) for e in data["price_edges"]),
                item_category=np.asarray(data["item_category"], np.int64),
                item_price_bucket=np.asarray(data["item_price_bucket"], np.int64),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInputError(f"not a two-tower vocabulary: {e}") from e


def _known_category(value: Any) -> bool:
    return isinstance(value, str) and value not in _UNKNOWN_NAMES


def _as_list(value: Any) -> list[Any]:
    """A feature value as a list: None, NaN and missing are empty."""
    if value is None:
        return []
    if isinstance(value, float) and math.isnan(value):
        return []
    if isinstance(value, str):
        raise InvalidInputError(f"expected a list feature, got the string {value!r}")
    return list(value)


@dataclass(frozen=True)
class QueryFeatures:
    """Query-tower inputs for N requests; item lists newest first, right-padded with 0."""

    session: np.ndarray
    """int64 [N, session_len]"""
    history: np.ndarray
    """int64 [N, history_len]"""
    top_categories: np.ndarray
    """int64 [N, top_categories]"""
    top_weights: np.ndarray
    """float32 [N, top_categories]"""
    intent: np.ndarray
    """int64 [N]"""

    def __len__(self) -> int:
        return len(self.intent)

    def take(self, rows: np.ndarray) -> QueryFeatures:
        return QueryFeatures(
            self.session[rows],
            self.history[rows],
            self.top_categories[rows],
            self.top_weights[rows],
            self.intent[rows],
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (
            torch.from_numpy(self.session),
            torch.from_numpy(self.history),
            torch.from_numpy(self.top_categories),
            torch.from_numpy(self.top_weights),
            torch.from_numpy(self.intent),
        )

    def informative(self) -> np.ndarray:
        """bool [N]: the request has at least one known item, category or intent."""
        return (
            (self.session != PAD).any(axis=1)
            | (self.history != PAD).any(axis=1)
            | (self.top_categories > UNKNOWN_CATEGORY).any(axis=1)
            | (self.intent > UNKNOWN_CATEGORY)
        )

    @classmethod
    def from_columns(
        cls,
        vocab: TwoTowerVocab,
        config: TwoTowerConfig,
        *,
        session_recent_items: Sequence[Any],
        user_last_items: Sequence[Any],
        user_top_categories: Sequence[Any],
        user_top_category_weights: Sequence[Any],
        session_intent_category: Sequence[Any],
        item_index: Mapping[str, int] | None = None,
        category_index: Mapping[str, int] | None = None,
    ) -> QueryFeatures:
        """Encode N requests from the features' values as Feast returns them (lists newest
        last, None for a missing row). Items the vocabulary lacks are dropped."""
        n = len(session_intent_category)
        columns = {
            "session_recent_items": session_recent_items,
            "user_last_items": user_last_items,
            "user_top_categories": user_top_categories,
            "user_top_category_weights": user_top_category_weights,
        }
        for name, values in columns.items():
            if len(values) != n:
                raise InvalidInputError(
                    f"{name} has {len(values)} rows, session_intent_category {n}", field=name
                )
        items = item_index if item_index is not None else vocab.item_index
        cats = category_index if category_index is not None else vocab.category_index

        def recent(values: Sequence[Any], width: int) -> np.ndarray:
            out = np.zeros((n, width), np.int64)
            for r, value in enumerate(values):
                known = [items[i] for i in reversed(_as_list(value)) if i in items][:width]
                out[r, : len(known)] = known
            return out

        top = np.zeros((n, config.top_categories), np.int64)
        weights = np.zeros((n, config.top_categories), np.float32)
        for r, (names, shares) in enumerate(
            zip(user_top_categories, user_top_category_weights, strict=True)
        ):
            names_l = _as_list(names)[: config.top_categories]
            shares_l = _as_list(shares)
            for c, name in enumerate(names_l):
                known = isinstance(name, str)
                top[r, c] = cats.get(name, UNKNOWN_CATEGORY) if known else UNKNOWN_CATEGORY
                share = shares_l[c] if c < len(shares_l) else None
                w = float(share) if share is not None else 0.0
                weights[r, c] = w if math.isfinite(w) and w > 0 else 0.0
        intent = np.fromiter(
            (cats.get(c, UNKNOWN_CATEGORY) if isinstance(c, str) else UNKNOWN_CATEGORY
             for c in session_intent_category),
            np.int64, n,
        )  # fmt: skip
        return cls(
            session=recent(session_recent_items, config.session_len),
            history=recent(user_last_items, config.history_len),
            top_categories=top,
            top_weights=weights,
            intent=intent,
        )

    @classmethod
    def from_frame(cls, vocab: TwoTowerVocab, config: TwoTowerConfig, frame: Any) -> QueryFeatures:
        """Encode the rows of a training set (a pandas frame with the `QUERY_FEATURES`)."""
        wanted = [f for names in QUERY_FEATURES.values() for f in names]
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise InvalidInputError(
                f"the training rows lack the query features {', '.join(missing)}; build them "
                "from a feature service that has them (retrieval_v1)",
                field=missing[0],
            )
        return cls.from_columns(vocab, config, **{c: frame[c].tolist() for c in wanted})


def _pool(emb: torch.Tensor, idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Recency-weighted mean of [B, L, D] over non-padding positions (zero when none)."""
    mask = (idx != 0).to(emb.dtype)
    w = torch.exp(logits - logits.max()).unsqueeze(0) * mask
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-9)
    return (emb * w.unsqueeze(-1)).sum(dim=1)


class QueryTower(nn.Module):
    """The request's features → a unit vector [B, dim]. Shares embedding tables with
    the item tower (see the module docstring)."""

    def __init__(self, items: nn.Embedding, categories: nn.Embedding, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.items = items
        self.categories = categories
        self.session_recency = nn.Parameter(torch.zeros(cfg.session_len))
        self.history_recency = nn.Parameter(torch.zeros(cfg.history_len))
        width = 3 * cfg.id_dim + 2 * cfg.category_dim
        self.mlp = nn.Sequential(
            nn.Linear(width, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.dim),
        )

    def forward(
        self,
        session: torch.Tensor,
        history: torch.Tensor,
        top_categories: torch.Tensor,
        top_weights: torch.Tensor,
        intent: torch.Tensor,
    ) -> torch.Tensor:
        s = self.items(session)
        h = self.items(history)
        pooled_session = _pool(s, session, self.session_recency)
        newest = s[:, 0, :]
        pooled_history = _pool(h, history, self.history_recency)
        tops = (self.categories(top_categories) * top_weights.unsqueeze(-1)).sum(dim=1)
        x = torch.cat(
            [pooled_session, newest, pooled_history, tops, self.categories(intent)], dim=1
        )
        return F.normalize(self.mlp(x), dim=-1)


class ItemTower(nn.Module):
    """An item's id, category and price bucket → a unit vector [B, dim]."""

    def __init__(
        self,
        items: nn.Embedding,
        categories: nn.Embedding,
        prices: nn.Embedding,
        cfg: TwoTowerConfig,
    ) -> None:
        super().__init__()
        self.items = items
        self.categories = categories
        self.prices = prices
        self.mlp = nn.Sequential(
            nn.Linear(cfg.id_dim + cfg.category_dim + cfg.price_dim, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.dim),
        )

    def forward(
        self, item: torch.Tensor, category: torch.Tensor, price_bucket: torch.Tensor
    ) -> torch.Tensor:
        x = torch.cat([self.items(item), self.categories(category), self.prices(price_bucket)], 1)
        return F.normalize(self.mlp(x), dim=-1)


class TwoTowerNet(nn.Module):
    """Both towers over shared id and category tables."""

    if TYPE_CHECKING:  # registered buffers
        item_category: torch.Tensor
        item_price: torch.Tensor

    def __init__(self, vocab: TwoTowerVocab, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(vocab.n_items + 1, cfg.id_dim, padding_idx=PAD)
        self.category_emb = nn.Embedding(vocab.n_categories, cfg.category_dim, padding_idx=PAD)
        self.price_emb = nn.Embedding(vocab.n_price_buckets, cfg.price_dim)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.category_emb.weight, std=0.05)
        nn.init.normal_(self.price_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()
            self.category_emb.weight[PAD].zero_()
        self.query = QueryTower(self.item_emb, self.category_emb, cfg)
        self.item = ItemTower(self.item_emb, self.category_emb, self.price_emb, cfg)
        self.register_buffer("item_category", torch.from_numpy(np.r_[0, vocab.item_category]))
        self.register_buffer("item_price", torch.from_numpy(np.r_[0, vocab.item_price_bucket]))

    def items(self, idx: torch.Tensor) -> torch.Tensor:
        """Item vectors of item indices (1..n)."""
        return self.item(idx, self.item_category[idx], self.item_price[idx])


def recall_at_k(
    query_vectors: np.ndarray, item_vectors: np.ndarray, targets: np.ndarray, k: int
) -> float:
    """Share of rows whose target (item index 1..n) is among the exact top-k items."""
    if not len(targets):
        return 0.0
    q = torch.from_numpy(np.ascontiguousarray(query_vectors, np.float32))
    v = torch.from_numpy(np.ascontiguousarray(item_vectors, np.float32))
    hits = 0
    k = min(k, len(v))
    for start in range(0, len(q), 2048):
        top = torch.topk(q[start : start + 2048] @ v.t(), k, dim=1).indices + 1
        t = torch.from_numpy(np.asarray(targets[start : start + 2048], np.int64)).unsqueeze(1)
        hits += int((top == t).any(dim=1).sum())
    return hits / len(targets)


class TwoTowerModel:
    """Trains a :class:`TwoTowerNet` and encodes queries and items.

    Example:
        >>> model = TwoTowerModel(vocab, TwoTowerConfig(max_train_seconds=30))  # doctest: +SKIP
        >>> model.fit(train, train_targets, valid, valid_targets, progress=print)  # doctest: +SKIP
        >>> items = model.item_vectors()  # [n_items, dim], row i = vocab.item_ids[i]
    """

    name = "two-tower"

    def __init__(self, vocab: TwoTowerVocab, config: TwoTowerConfig | None = None) -> None:
        self.vocab = vocab
        self.config = config or TwoTowerConfig()
        self.net: TwoTowerNet | None = None
        self.history: list[dict[str, float]] = []
        self.best_epoch = 0
        self.stop_reason = ""
        self.train_seconds = 0.0

    def _check_targets(self, targets: np.ndarray, name: str) -> np.ndarray:
        t = np.asarray(targets)
        if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
            raise InvalidInputError(f"{name} must be a 1-d integer array", field=name)
        if len(t) and (int(t.min()) < 1 or int(t.max()) > self.vocab.n_items):
            raise InvalidInputError(
                f"{name} must be item indices in 1..{self.vocab.n_items}", field=name
            )
        return t.astype(np.int64)

    def _check_features(self, features: QueryFeatures, n: int, name: str) -> None:
        cfg = self.config
        shapes = {
            "session": (features.session.shape, (n, cfg.session_len)),
            "history": (features.history.shape, (n, cfg.history_len)),
            "top_categories": (features.top_categories.shape, (n, cfg.top_categories)),
            "top_weights": (features.top_weights.shape, (n, cfg.top_categories)),
            "intent": (features.intent.shape, (n,)),
        }
        for part, (got, want) in shapes.items():
            if got != want:
                raise InvalidInputError(f"{name}.{part} has shape {got}, expected {want}", name)
        for part, arr, top in (
            ("session", features.session, self.vocab.n_items),
            ("history", features.history, self.vocab.n_items),
            ("top_categories", features.top_categories, self.vocab.n_categories - 1),
            ("intent", features.intent, self.vocab.n_categories - 1),
        ):
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) > top):
                raise InvalidInputError(f"{name}.{part} holds indices outside 0..{top}", name)

    def fit(
        self,
        train: QueryFeatures,
        train_targets: np.ndarray,
        valid: QueryFeatures | None = None,
        valid_targets: np.ndarray | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """Train on rows (features, target item index), early-stopping on validation rows.

        Without explicit validation rows, the last ``valid_share`` of the training rows
        (which must then be in time order) are held out for it.
        """
        cfg = self.config
        say = progress or (lambda _line: None)
        targets = self._check_targets(train_targets, "train_targets")
        self._check_features(train, len(targets), "train")
        if (valid is None) != (valid_targets is None):
            raise InvalidInputError("give both valid and valid_targets, or neither", "valid")
        if valid is None or valid_targets is None:
            cut = len(targets) - int(len(targets) * cfg.valid_share)
            valid, valid_t = train.take(np.arange(cut, len(targets))), targets[cut:]
            train, targets = train.take(np.arange(cut)), targets[:cut]
        else:
            valid_t = self._check_targets(valid_targets, "valid_targets")
            self._check_features(valid, len(valid_t), "valid")
        if len(targets) < 2:
            raise InvalidInputError("training needs at least 2 rows", field="train_targets")
        if len(valid_t) > cfg.max_valid:  # the newest rows
            keep = np.arange(len(valid_t) - cfg.max_valid, len(valid_t))
            valid, valid_t = valid.take(keep), valid_t[keep]
        counts = np.bincount(targets, minlength=self.vocab.n_items + 1).astype(np.float64)
        log_q = torch.from_numpy(np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32))
        self.history, self.best_epoch, self.stop_reason = [], 0, ""
        rng = np.random.default_rng(cfg.seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                net = TwoTowerNet(self.vocab, cfg)
                self.net = net
                optimizer = torch.optim.AdamW(
                    net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
                )
                n_params = sum(p.numel() for p in net.parameters())
                say(
                    f"[{self.name}] {len(targets)} training rows, {len(valid_t)} validation rows, "
                    f"{self.vocab.n_items} items, {n_params} parameters, in-batch softmax "
                    f"(batch {cfg.batch_size}, τ {cfg.temperature}"
                    f"{', logQ-corrected' if cfg.logq_correction else ''})"
                )
                self._train_loop(
                    net, optimizer, train, targets, valid, valid_t,
                    log_q if cfg.logq_correction else None, rng, say,
                )  # fmt: skip
        finally:
            torch.set_num_threads(threads)

    def _train_loop(
        self,
        net: TwoTowerNet,
        optimizer: torch.optim.Optimizer,
        train: QueryFeatures,
        targets: np.ndarray,
        valid: QueryFeatures,
        valid_t: np.ndarray,
        log_q: torch.Tensor | None,
        rng: np.random.Generator,
        say: Callable[[str], None],
    ) -> None:
        cfg = self.config
        began = time.perf_counter()
        best, best_state, stale = -1.0, None, 0
        self.stop_reason = f"reached max_epochs={cfg.max_epochs}"
        tensors = train.tensors()
        target_t = torch.from_numpy(targets)
        for epoch in range(1, cfg.max_epochs + 1):
            net.train()
            order = torch.from_numpy(rng.permutation(len(targets)))
            total, steps = 0.0, 0
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start : start + cfg.batch_size]
                if len(rows) < 2:
                    continue
                batch_targets = target_t[rows]
                queries = net.query(*(t[rows] for t in tensors))
                items = net.items(batch_targets)
                logits = in_batch_logits(queries, items, batch_targets, cfg.temperature, log_q)
                loss = F.cross_entropy(logits, torch.arange(len(rows)))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                steps += 1
            train_loss = total / max(steps, 1)
            elapsed = time.perf_counter() - began
            out_of_time = cfg.max_train_seconds is not None and elapsed >= cfg.max_train_seconds
            entry: dict[str, float] = {"epoch": epoch, "train_loss": train_loss}
            if len(valid_t):
                recall = recall_at_k(
                    self.query_vectors(valid), self.item_vectors(), valid_t, cfg.eval_k
                )
                entry[f"valid_recall{cfg.eval_k}"] = recall
                improved = recall > best
                if improved:
                    best, self.best_epoch, stale = recall, epoch, 0
                    best_state = copy.deepcopy(net.state_dict())
                else:
                    stale += 1
                note = f" valid recall@{cfg.eval_k} {recall:.4f}{' *' if improved else '  '}"
            else:
                self.best_epoch, note = epoch, ""
            entry["elapsed_s"] = time.perf_counter() - began
            self.history.append(entry)
            say(
                f"[{self.name}] epoch {epoch:3d} loss {train_loss:.4f}{note} {entry['elapsed_s']:6.1f}s"
            )
            if len(valid_t) and stale >= cfg.patience:
                self.stop_reason = (
                    f"no better validation recall@{cfg.eval_k} in {cfg.patience} epochs"
                )
                break
            if out_of_time:
                self.stop_reason = f"time budget {cfg.max_train_seconds}s spent"
                break
        self.train_seconds = time.perf_counter() - began
        if best_state is not None:
            net.load_state_dict(best_state)
            say(
                f"[{self.name}] stopped: {self.stop_reason}; restored epoch {self.best_epoch} "
                f"(valid recall@{cfg.eval_k} {best:.4f}) after {self.train_seconds:.1f}s"
            )
        else:
            say(f"[{self.name}] stopped: {self.stop_reason} after {self.train_seconds:.1f}s")
        net.eval()

    def _require_net(self) -> TwoTowerNet:
        if self.net is None:
            raise InvalidInputError(f"{self.name} is not trained; call fit() or load() first")
        return self.net

    @torch.no_grad()
    def query_vectors(self, features: QueryFeatures, batch_size: int = 4096) -> np.ndarray:
        """float32 [N, dim] unit query vectors."""
        net = self._require_net()
        self._check_features(features, len(features), "features")
        was_training = net.training
        net.eval()
        out = np.empty((len(features), self.config.dim), np.float32)
        tensors = features.tensors()
        for start in range(0, len(features), batch_size):
            part = slice(start, start + batch_size)
            out[part] = net.query(*(t[part] for t in tensors)).numpy()
        net.train(was_training)
        return out

    @torch.no_grad()
    def item_vectors(self) -> np.ndarray:
        """float32 [n_items, dim] unit item vectors; row i is ``vocab.item_ids[i]``."""
        net = self._require_net()
        was_training = net.training
        net.eval()
        out = net.items(torch.arange(1, self.vocab.n_items + 1)).numpy()
        net.train(was_training)
        return np.ascontiguousarray(out, np.float32)

    def scripted_query_tower(self) -> torch.jit.ScriptModule:
        """TorchScript of the query tower (a copy in eval mode, independent of training)."""
        net = copy.deepcopy(self._require_net()).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(net.query)

    def encoder(self, scripted: bool = True) -> QueryEncoder:
        """The serving encoder: one request's feature rows → one query vector."""
        net = self._require_net()
        tower: Callable[..., torch.Tensor] = (
            self.scripted_query_tower() if scripted else copy.deepcopy(net).eval().query
        )
        return QueryEncoder(self.vocab, self.config, tower)

    def plot_curves(self, path: str | Path) -> Path:
        """A PNG of the training loss and the validation recall per epoch."""
        from matplotlib.figure import Figure

        path = Path(path)
        fig = Figure(figsize=(10, 4), layout="constrained")
        ax_loss, ax_recall = fig.subplots(1, 2)
        epochs = [h["epoch"] for h in self.history]
        ax_loss.plot(epochs, [h["train_loss"] for h in self.history], color="tab:blue")
        ax_loss.set(title=f"{self.name}: training loss", xlabel="epoch", ylabel="in-batch softmax")
        key = f"valid_recall{self.config.eval_k}"
        shown = [(h["epoch"], h[key]) for h in self.history if key in h]
        if shown:
            ax_recall.plot(*zip(*shown, strict=True), "o-", label=f"recall@{self.config.eval_k}")
            ax_recall.axvline(self.best_epoch, color="grey", linestyle=":", label="best")
            ax_recall.legend()
        ax_recall.set(title="validation (exact, whole catalogue)", xlabel="epoch", ylabel="recall")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path

    def save(self, directory: str | Path) -> Path:
        """Write the weights, the config with the training history, and the vocabulary."""
        net = self._require_net()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, directory / _WEIGHTS)
        meta = {
            "format_version": _FORMAT_VERSION,
            "name": self.name,
            "config": asdict(self.config),
            "best_epoch": self.best_epoch,
            "stop_reason": self.stop_reason,
            "train_seconds": self.train_seconds,
            "history": self.history,
        }
        (directory / _CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        (directory / _VOCAB).write_text(json.dumps(self.vocab.to_json()) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TwoTowerModel:
        """Read what :meth:`save` wrote."""
        directory = Path(directory)
        for name in (_WEIGHTS, _CONFIG, _VOCAB):
            if not (directory / name).is_file():
                raise NotFoundError(f"{directory / name} does not exist")
        try:
            meta = json.loads((directory / _CONFIG).read_text())
            vocab = TwoTowerVocab.from_json(json.loads((directory / _VOCAB).read_text()))
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{directory}: invalid JSON: {e}") from e
        if meta.get("format_version") != _FORMAT_VERSION:
            raise InvalidInputError(
                f"{directory / _CONFIG}: unsupported format_version {meta.get('format_version')}"
            )
        model = cls(vocab, TwoTowerConfig.from_dict(meta["config"]))
        net = TwoTowerNet(vocab, model.config)
        state = torch.load(directory / _WEIGHTS, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise InvalidInputError(
                f"{directory / _WEIGHTS} does not fit its vocabulary: {e}"
            ) from e
        model.net = net.eval()
        model.history = list(meta.get("history", []))
        model.best_epoch = int(meta.get("best_epoch", 0))
        model.stop_reason = str(meta.get("stop_reason", ""))
        model.train_seconds = float(meta.get("train_seconds", 0.0))
        return model


class QueryEncoder:
    """One request's online rows → its query vector, as the retrieval server needs it.

    ``user_row`` and ``session_row`` are the rows the server read by entity key (any
    mapping with the `QUERY_FEATURES`; None for a missing row); ``request_items`` are
    items the caller says the session just saw, newest last, placed after the
    session's own. A request with nothing the model knows gets None: no query.
    """

    def __init__(
        self, vocab: TwoTowerVocab, config: TwoTowerConfig, tower: Callable[..., torch.Tensor]
    ) -> None:
        self.vocab = vocab
        self.config = config
        self._tower = tower
        self._items = vocab.item_index
        self._categories = vocab.category_index

    def features(
        self,
        user_row: Mapping[str, Any] | None,
        session_row: Mapping[str, Any] | None,
        request_items: Sequence[str] = (),
    ) -> QueryFeatures:
        user, session = user_row or {}, session_row or {}
        recent = [*_as_list(session.get("session_recent_items")), *request_items]
        return QueryFeatures.from_columns(
            self.vocab,
            self.config,
            session_recent_items=[recent],
            user_last_items=[user.get("user_last_items")],
            user_top_categories=[user.get("user_top_categories")],
            user_top_category_weights=[user.get("user_top_category_weights")],
            session_intent_category=[session.get("session_intent_category")],
            item_index=self._items,
            category_index=self._categories,
        )

    def encode(
        self,
        user_row: Mapping[str, Any] | None,
        session_row: Mapping[str, Any] | None,
        request_items: Sequence[str] = (),
    ) -> np.ndarray | None:
        """float32 [dim], or None when the request has nothing the model knows."""
        features = self.features(user_row, session_row, request_items)
        if not features.informative()[0]:
            return None
        with torch.inference_mode():
            vector = self._tower(*features.tensors())
        return np.asarray(vector[0].numpy(), dtype=np.float32)
