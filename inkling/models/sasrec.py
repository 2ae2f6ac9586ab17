"""SASRec: causal self-attention over a user's item sequence, next-item prediction.

Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018), with the
changes that later work found to matter:

- pre-LayerNorm transformer blocks (attention + point-wise feed-forward), a final
  LayerNorm, learned positional embeddings, item embeddings shared between input
  and output (scores are dot products with the item table);
- trained on the next item at every position (inputs ``seq[:-1]`` → targets
  ``seq[1:]``) with a configurable loss (:attr:`SasRecConfig.loss`, the functions in
  :mod:`inkling.models.losses`): the full softmax cross-entropy over the catalogue
  instead of the paper's binary cross-entropy with one negative; a sampled softmax
  over uniform negatives; a logQ-corrected softmax over the batch's targets plus
  popularity-sampled items (mixed negatives, whose cost grows with the batch and not
  the catalogue); or gSASRec's calibrated gBCE;
- layer options to measure against each other: SwiGLU feed-forward, post-norm, and
  LiGR-style gated residuals; the time since the previous action as an input
  (offline only: serving has no item times);
- early stopping on validation NDCG@10 under full ranking, restoring the best
  weights, under an optional wall-clock budget.

Two additions make it the session-aware ranker of the serving path:

- **Session flags.** Each position carries one bit: does the next item belong to
  the same session as this one? In training the bit comes from the log; at the
  newest position it says whether the item to predict continues the current
  session (the user is mid-session) or opens a new one. So the model knows which
  items are "what the user did a moment ago" and which are older history. The
  history-only ablation (``batch.evaluation.HistoryOnly``) cuts the current
  session off the input, which leaves the newest flag 0.
- **Item attributes** (:class:`ItemAttributes`): an item's vector is its id
  embedding plus a category embedding plus a price-bucket embedding, on the input
  and output side alike, so sparse items share what their category learned. The
  attributes are the catalogue's (the source of the ``item_features`` view's
  ``item_category`` and ``item_price``) at training time and travel with the model.
- **Repeat scores** (:attr:`SasRecConfig.repeat`): each item of the history gets a
  learned score by how far back it was last seen, so the model learns from the data
  whether users come back to an item (Diginetica's sessions do) or never do (a film
  is rated once), instead of finding it out item by item through the embeddings.
  With :attr:`SasRecConfig.repeat_context` the score also reads the sequence (its
  hidden state) and how often the item occurred, so it can tell a session that
  circles back from one that moves on.

Item indices are ``int64`` in ``1..n_items``; ``0`` is padding. Sequences are
left-padded and positions are counted from the newest item (the newest is always
position ``max_len - 1``), so a batch may be padded to any width without changing
a row's output.

The library does not depend on ``batch``: :meth:`SasRecRecommender.fit` takes any
object shaped like the evaluation split (:class:`SplitLike`).
"""

from __future__ import annotations

import copy
import json
import math
import queue
import threading
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inkling.errors import InvalidInputError, NotFoundError
from inkling.models.losses import (
    MixedNegatives,
    gbce_beta,
    gbce_loss,
    history_scores,
    sampled_softmax,
)

__all__ = [
    "FFNS",
    "LOSSES",
    "NORMS",
    "ItemAttributes",
    "SasRecConfig",
    "SasRecNet",
    "SasRecRecommender",
    "SplitLike",
    "TrainDataLike",
    "history_candidates",
    "ranks_of_targets",
    "revisit_share",
]

_FORMAT_VERSION = 2
LOSSES = ("auto", "full", "uniform", "logq", "gbce")
FFNS = ("relu", "swiglu")
NORMS = ("pre", "post")
_WEIGHTS = "model.pt"
_CONFIG = "config.json"
_ITEM_IDS = "item_ids.json"


@dataclass(frozen=True)
class ItemAttributes:
    """Each item index's category and price bucket (code 0 = unknown; index 0 = padding).

    Attributes:
        categories: int64 [n_items + 1], codes into ``category_names``.
        category_names: ``category_names[0]`` is ``""`` (unknown).
        price_buckets: int64 [n_items + 1]: 0 unknown, else 1 + the bucket among
            ``price_edges`` (quantiles of the training catalogue's prices).
        price_edges: ascending bucket boundaries.
    """

    categories: np.ndarray
    category_names: list[str]
    price_buckets: np.ndarray
    price_edges: list[float]

    @classmethod
    def build(
        cls,
        categories: Sequence[str | None],
        prices: Sequence[float | None],
        n_price_buckets: int = 10,
    ) -> ItemAttributes:
        """From one category and price per item index (index 0, padding, is ignored)."""
        if len(categories) != len(prices):
            raise InvalidInputError(
                f"{len(categories)} categories but {len(prices)} prices", field="prices"
            )
        names = sorted({c for c in list(categories)[1:] if c})
        index = {name: i + 1 for i, name in enumerate(names)}
        codes = np.array([0, *(index.get(c or "", 0) for c in list(categories)[1:])], np.int64)
        price = np.array([np.nan, *(np.nan if p is None else float(p) for p in list(prices)[1:])])
        known = price[np.isfinite(price)]
        edges = (
            np.unique(np.quantile(known, np.linspace(0, 1, n_price_buckets + 1)[1:-1]))
            if len(known)
            else np.zeros(0)
        )
        buckets = np.where(np.isfinite(price), 1 + np.searchsorted(edges, price), 0)
        buckets[0] = 0
        return cls(codes, ["", *names], buckets.astype(np.int64), [float(e) for e in edges])

    @property
    def n_categories(self) -> int:
        return len(self.category_names)

    @property
    def n_price_buckets(self) -> int:
        return len(self.price_edges) + 2

    def to_json(self) -> dict[str, Any]:
        return {"category_names": self.category_names, "price_edges": self.price_edges}


class TrainDataLike(Protocol):
    """The training part of a split: sequences in time order and the id of each index.

    It may also carry ``sessions`` (one session code per position, parallel to
    ``seqs``; without it every sequence counts as one session) and ``attributes``
    (:class:`ItemAttributes` over the same indices; without them, ids only).
    """

    @property
    def seqs(self) -> Sequence[np.ndarray]: ...

    @property
    def item_ids(self) -> Sequence[str]: ...


class SplitLike(Protocol):
    """What :meth:`SasRecRecommender.fit` reads from a split (never its test part)."""

    @property
    def train(self) -> TrainDataLike: ...

    @property
    def valid_history(self) -> Sequence[np.ndarray]: ...

    @property
    def valid_target(self) -> np.ndarray: ...


@dataclass(frozen=True)
class SasRecConfig:
    """Hyperparameters. Defaults follow the SASRec paper unless noted.

    Attributes:
        max_len: Most recent items the model sees; longer histories keep the newest.
            The paper uses 200 for MovieLens-1M and 50 for sparser data.
        hidden: Embedding and hidden width (paper: 50).
        n_blocks: Transformer blocks (paper: 2).
        n_heads: Attention heads; must divide ``hidden`` (paper: 1).
        dropout: Dropout on embeddings, attention weights and residual branches
            (paper: 0.2 for MovieLens-1M, 0.5 for sparse data).
        lr: Adam learning rate.
        weight_decay: Adam L2 penalty (0 = none).
        batch_size: Training windows per step.
        max_epochs: Upper bound on passes over the training windows.
        eval_every: Evaluate on validation every this many epochs (and at the last).
        patience: Stop after this many evaluations without a better validation
            NDCG@10; the best weights are restored. Validation on a small set is
            noisy, so a short patience can stop on a dip that is only noise.
        max_train_seconds: Optional wall-clock budget (validation time included);
            training stops at the first step past it, mid-epoch if need be, then
            evaluates and keeps the best weights so far.
        loss: The training loss (see :data:`LOSSES`): ``"full"`` softmax over the
            catalogue; ``"uniform"`` sampled softmax over ``n_negatives`` uniform
            negatives shared by the batch (uniform sampling needs no correction);
            ``"logq"`` sampled softmax over the batch's targets plus ``n_negatives``
            popularity-sampled items, logQ-corrected (:class:`MixedNegatives`);
            ``"gbce"`` gSASRec's calibrated binary cross-entropy over ``n_negatives``
            uniform negatives; ``"auto"``: ``"full"`` up to ``full_softmax_max_items``
            items, else ``"logq"``.
        full_softmax_max_items: The catalogue size up to which ``"auto"`` picks the
            full softmax. Chosen at equal wall-clock (README, "Training the ranker"):
            the full softmax won or tied at 1.7k and 7.1k items, the logQ softmax won
            by far at 15k, where an epoch of the full softmax costs several of its.
        n_negatives: Sampled negatives per batch of the sampled losses.
        negative_power: ``"logq"`` samples item ``j`` with probability ∝
            ``count_j ** negative_power`` (0: uniform, 1: popularity).
        gbce_t: gBCE's calibration ``t`` in [0, 1] (0: plain BCE).
        repeat: Add a learned score to each item of the history, by how many positions
            back its newest occurrence is (:func:`repeat_buckets`). The model learns
            from the data how likely a revisit is: strongly negative where nobody
            revisits, which also spares the softmax from pushing seen items down one
            by one (the newest item, never the next once consecutive repeats are
            collapsed, learns that too). Models saved before this setting have none.
        repeat_context: With ``repeat``, let the repeat score depend on the sequence
            too: each distance bucket adds a learned linear function of the query
            position's hidden state (so a session can be read as one that returns to
            items or one that moves on), and the item gets a learned score by how often
            it occurred so far (once, twice, three times or more). Models saved
            before this setting have none.
        time_gaps: Add an embedding of each position's time since the previous item
            (log2-second buckets, :func:`gap_buckets`); scoring then needs the
            histories' times. An offline option: the serving path has no times.
        ffn: The feed-forward of each block: ``"relu"`` (two layers, the paper's) or
            ``"swiglu"`` (a SiLU-gated linear unit, same hidden width).
        norm: ``"pre"`` (LayerNorm before each branch) or ``"post"`` (after the
            residual sum, the original transformer's).
        gated_residual: Scale each branch's output by a learned sigmoid gate of its
            input before the residual sum (LiGR-style).
        threads: ``torch.set_num_threads`` for training and scoring; ``None`` leaves
            torch's default (one per core).
        prefetch: Batches prepared ahead by a loader thread (0: on the training thread).
        all_windows: Cut sequences longer than ``max_len + 1`` into consecutive
            windows so every transition is trained on; ``False`` keeps only the
            newest window, as the paper does.
        max_valid: Validation users evaluated (a seeded sample when there are more).
        eval_batch_size: Histories per scoring forward pass.
        seed: Seeds parameter init, dropout, shuffling and negative sampling.
        session_flags: Feed each position's same-session-next bit (see the module
            docstring); ``False`` feeds 1 everywhere, the plain SASRec input.
        use_attributes: Add the category and price-bucket embeddings when the
            model is given :class:`ItemAttributes`.
        device: Torch device for training and scoring.
    """

    max_len: int = 50
    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 200
    eval_every: int = 5
    patience: int = 6
    max_train_seconds: float | None = None
    loss: str = "auto"
    full_softmax_max_items: int = 10_000
    n_negatives: int = 1024
    negative_power: float = 0.75
    gbce_t: float = 0.75
    repeat: bool = True
    repeat_context: bool = True
    time_gaps: bool = False
    ffn: str = "relu"
    norm: str = "pre"
    gated_residual: bool = False
    threads: int | None = None
    prefetch: int = 4
    all_windows: bool = True
    max_valid: int = 10_000
    eval_batch_size: int = 512
    seed: int = 0
    session_flags: bool = True
    use_attributes: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        positive = {
            "max_len": self.max_len,
            "hidden": self.hidden,
            "n_blocks": self.n_blocks,
            "n_heads": self.n_heads,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "eval_every": self.eval_every,
            "patience": self.patience,
            "n_negatives": self.n_negatives,
            "max_valid": self.max_valid,
            "eval_batch_size": self.eval_batch_size,
        }
        for field, value in positive.items():
            if value < 1:
                raise InvalidInputError(f"{field} must be at least 1, got {value}", field=field)
        if self.hidden % self.n_heads:
            raise InvalidInputError(
                f"n_heads ({self.n_heads}) must divide hidden ({self.hidden})", field="n_heads"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInputError(f"dropout must be in [0, 1), got {self.dropout}", "dropout")
        if self.lr <= 0:
            raise InvalidInputError(f"lr must be positive, got {self.lr}", field="lr")
        choices = {"loss": (self.loss, LOSSES), "ffn": (self.ffn, FFNS), "norm": (self.norm, NORMS)}
        for name, (chosen, allowed) in choices.items():
            if chosen not in allowed:
                raise InvalidInputError(
                    f"{name} must be one of {', '.join(allowed)}; got {chosen!r}", field=name
                )
        if not 0.0 <= self.gbce_t <= 1.0:
            raise InvalidInputError(f"gbce_t must be in [0, 1], got {self.gbce_t}", "gbce_t")
        if self.negative_power < 0:
            raise InvalidInputError(
                f"negative_power must be >= 0, got {self.negative_power}", "negative_power"
            )
        if self.threads is not None and self.threads < 1:
            raise InvalidInputError(f"threads must be at least 1, got {self.threads}", "threads")
        if self.prefetch < 0:
            raise InvalidInputError(f"prefetch must be >= 0, got {self.prefetch}", "prefetch")

    @classmethod
    def parse_overrides(cls, text: str) -> dict[str, Any]:
        """``field=value,field=value`` → the fields typed as their defaults (``none`` is
        None, booleans are true/false); an unknown field or a bad value raises
        InvalidInputError naming it, and the result is validated as a config."""
        defaults = asdict(cls())
        kinds = {f.name: str(f.type) for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in filter(None, (x.strip() for x in text.split(","))):
            key, eq, raw = (part.strip() for part in item.partition("="))
            if not eq or key not in defaults:
                raise InvalidInputError(
                    f"{item!r} is not field=value over the ranker's settings "
                    f"({', '.join(sorted(defaults))})",
                    field="config",
                )
            default, kind = defaults[key], kinds[key]
            try:
                if raw.lower() == "none" and "None" in kind:
                    values[key] = None
                elif isinstance(default, bool):
                    if raw.lower() not in ("true", "false"):
                        raise ValueError(raw)
                    values[key] = raw.lower() == "true"
                elif "int" in kind:
                    values[key] = int(raw)
                elif "float" in kind:
                    values[key] = float(raw)
                else:
                    values[key] = raw
            except ValueError:
                raise InvalidInputError(
                    f"{key}={raw!r}: expected {kind.replace(' | None', '')}", field=key
                ) from None
        cls(**values)
        return values

    def resolved_loss(self, n_items: int) -> str:
        """The loss trained on a catalogue of ``n_items``: ``loss`` unless it is "auto"."""
        if self.loss != "auto":
            return self.loss
        return "full" if n_items <= self.full_softmax_max_items else "logq"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SasRecConfig:
        """Build from :func:`dataclasses.asdict` output, ignoring unknown keys."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class _Dropout(nn.Module):
    """Inverted dropout drawing its masks from NumPy's PCG64 instead of torch's CPU
    ``bernoulli_``, which took about a fifth of a training step. ``p`` is rounded to a
    multiple of 1/256 (a mask byte below ``round(256 p)`` drops). In eval mode, and
    under TorchScript or export, it is the identity, like ``nn.Dropout``.

    All dropouts of one net share one generator, seeded by ``SasRecConfig.seed``.
    """

    __jit_ignored_attributes__: ClassVar[list[str]] = ["rng"]

    def __init__(self, p: float, rng: np.random.Generator) -> None:
        super().__init__()
        self.threshold = round(256 * p)
        self.scale = 256.0 / (256 - self.threshold)
        self.rng = rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.threshold > 0:
            return self._drop(x)
        return x

    # Unannotated: TorchScript parses an unused method's signature and cannot resolve
    # the string annotations `from __future__ import annotations` makes.
    @torch.jit.unused
    def _drop(self, x):  # type: ignore[no-untyped-def]
        mask = self.rng.integers(0, 256, size=tuple(x.shape), dtype=np.uint8)
        keep = torch.from_numpy(mask).to(x.device) >= self.threshold
        return x * keep * self.scale


class _ReluFeedForward(nn.Module):
    """The paper's point-wise feed-forward: Linear → ReLU → dropout → Linear."""

    def __init__(self, hidden: int, dropout: _Dropout) -> None:
        super().__init__()
        self.inner = nn.Linear(hidden, hidden)
        self.dropout = dropout
        self.outer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(self.dropout(F.relu(self.inner(x))))


class _SwiGLU(nn.Module):
    """A SiLU-gated linear unit (Shazeer 2020): ``W₃(SiLU(W₁x) ⊙ W₂x)``, inner width
    ``hidden`` as the ReLU feed-forward's."""

    def __init__(self, hidden: int, dropout: _Dropout) -> None:
        super().__init__()
        self.inner = nn.Linear(hidden, 2 * hidden)
        self.dropout = dropout
        self.outer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.inner(x).chunk(2, dim=-1)
        return self.outer(self.dropout(F.silu(gate) * value))


class _Gate(nn.Module):
    """LiGR-style residual gate: the branch output times ``σ(W·input)``, per channel."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, branch_input: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return branch * torch.sigmoid(self.linear(branch_input))


class _NoGate(nn.Module):
    def forward(self, branch_input: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return branch


class _Block(nn.Module):
    """Causal self-attention then a point-wise feed-forward, each a residual branch.

    Pre-norm (default): ``x + branch(LN(x))``; post-norm: ``LN(x + branch(x))``. With
    ``gated_residual`` each branch's output is scaled by a learned sigmoid gate of the
    branch's input. The feed-forward is ReLU or SwiGLU (``SasRecConfig.ffn``).
    """

    def __init__(self, config: SasRecConfig, rng: np.random.Generator) -> None:
        super().__init__()
        hidden, dropout = config.hidden, config.dropout
        self.n_heads = config.n_heads
        self.attn_dropout = dropout
        self.post_norm = config.norm == "post"
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)
        ffn = _SwiGLU if config.ffn == "swiglu" else _ReluFeedForward
        self.ffn = ffn(hidden, _Dropout(dropout, rng))
        self.attn_gate = _Gate(hidden) if config.gated_residual else _NoGate()
        self.ffn_gate = _Gate(hidden) if config.gated_residual else _NoGate()
        self.dropout = _Dropout(dropout, rng)

    def _attend(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, h // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=p)
        return self.attn_out(a.transpose(1, 2).reshape(b, t, h))

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T, H]; ``attend`` [B, 1, T, T] bool, True where a query may see a key."""
        if self.post_norm:
            x = self.attn_norm(x + self.dropout(self.attn_gate(x, self._attend(x, attend))))
            return self.ffn_norm(x + self.dropout(self.ffn_gate(x, self.ffn(x))))
        h = self.attn_norm(x)
        x = x + self.dropout(self.attn_gate(h, self._attend(h, attend)))
        h = self.ffn_norm(x)
        return x + self.dropout(self.ffn_gate(h, self.ffn(h)))


class SasRecNet(nn.Module):
    """The network. ``forward`` scores the catalogue from each row's newest position.

    Rows are left-padded with 0 to any width up to ``max_len``. A row with no items
    at all gets the log-popularity prior in ``prior`` (set at training time).
    """

    if TYPE_CHECKING:  # registered buffers; TorchScript cannot read a string annotation
        prior: torch.Tensor
        repeat_codes: torch.Tensor
        item_cat: torch.Tensor
        item_price: torch.Tensor

    def __init__(
        self, n_items: int, config: SasRecConfig, n_categories: int = 1, n_price_buckets: int = 1
    ) -> None:
        super().__init__()
        self.max_len = config.max_len
        self.item_emb = nn.Embedding(n_items + 1, config.hidden, padding_idx=0)
        # Attribute codes per item (0 = unknown, a zero vector); all 0 without attributes.
        self.cat_emb = nn.Embedding(max(n_categories, 1), config.hidden, padding_idx=0)
        self.price_emb = nn.Embedding(max(n_price_buckets, 1), config.hidden, padding_idx=0)
        self.register_buffer("item_cat", torch.zeros(n_items + 1, dtype=torch.long))
        self.register_buffer("item_price", torch.zeros(n_items + 1, dtype=torch.long))
        self.flag_emb = nn.Embedding(2, config.hidden)
        self.time_gaps = config.time_gaps
        self.gap_emb = nn.Embedding(GAP_BUCKETS, config.hidden) if config.time_gaps else None
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.repeat_bias = nn.Parameter(torch.zeros(REPEAT_BUCKETS)) if config.repeat else None
        self.repeat_scale = REPEAT_SCALE  # an attribute: TorchScript reads no float globals
        context = config.repeat and config.repeat_context
        self.repeat_gate = (
            nn.Parameter(torch.zeros(REPEAT_BUCKETS, config.hidden)) if context else None
        )
        self.count_bias = nn.Parameter(torch.zeros(COUNT_BUCKETS)) if context else None
        self.register_buffer("repeat_codes", repeat_buckets(config.max_len), persistent=False)
        rng = np.random.default_rng(config.seed)
        self.emb_dropout = _Dropout(config.dropout, rng)
        self.blocks = nn.ModuleList([_Block(config, rng) for _ in range(config.n_blocks)])
        self.out_norm = nn.LayerNorm(config.hidden)
        self.register_buffer("prior", torch.zeros(n_items + 1))
        tables = [self.item_emb, self.cat_emb, self.price_emb, self.pos_emb, self.flag_emb]
        for table in [*tables, *([self.gap_emb] if self.gap_emb is not None else [])]:
            nn.init.normal_(table.weight, std=0.02)
        with torch.no_grad():
            for table in (self.item_emb, self.cat_emb, self.price_emb):
                table.weight[0].zero_()

    def item_table(self) -> torch.Tensor:
        """Every item's vector [n_items + 1, H]: id + category + price bucket."""
        return self.item_emb.weight + self.cat_emb(self.item_cat) + self.price_emb(self.item_price)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """The vectors of ``items`` (any shape of indices): rows of :meth:`item_table`
        without building the whole table."""
        return (
            self.item_emb(items)
            + self.cat_emb(self.item_cat[items])
            + self.price_emb(self.item_price[items])
        )

    def encode(self, seqs: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Hidden state at every position: [B, T] item indices and [B, T] same-session-
        next bits (int64 0/1; with ``time_gaps``, bit + 2 × gap bucket) → [B, T, H].

        Position ``j`` depends only on positions ``≤ j`` that are not padding; the
        outputs at padded positions are finite but meaningless.
        """
        t = seqs.size(1)
        keep = seqs != 0
        positions = torch.arange(self.max_len - t, self.max_len, device=seqs.device)
        x = self.item_vectors(seqs) + self.pos_emb(positions).unsqueeze(0)
        gap_emb = self.gap_emb
        if gap_emb is not None:  # flags carry bit + 2 × gap bucket (pack_time_gaps)
            x = x + self.flag_emb(flags % 2) + gap_emb(torch.div(flags, 2, rounding_mode="floor"))
        else:
            x = x + self.flag_emb(flags)
        x = self.emb_dropout(x) * keep.unsqueeze(-1).to(x.dtype)
        causal = torch.ones(t, t, dtype=torch.bool, device=seqs.device).tril()
        # A padded query sees only itself, so no softmax row is all-masked (NaN).
        diagonal = torch.eye(t, dtype=torch.bool, device=seqs.device)
        attend = ((causal & keep.unsqueeze(1)) | diagonal).unsqueeze(1)
        for block in self.blocks:
            x = block(x, attend)
        return self.out_norm(x)

    def repeat_weights(self, seqs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, T]: the learned repeat score that query position ``t`` gives the item
        at position ``s`` where ``s <= t`` is that item's newest occurrence up to ``t``
        and not padding, else 0. The score is :data:`REPEAT_SCALE` × ``repeat_bias`` of
        the bucket of ``t - s``. With ``repeat_context`` it adds the dot product of
        ``hidden`` [B, T, H] (the encoder's output at ``t``) with
        ``repeat_gate``'s row of that bucket, and :data:`REPEAT_SCALE` × ``count_bias``
        of how often the item occurred up to ``s`` (:data:`COUNT_BUCKETS`).
        Zeros without ``repeat``."""
        t = seqs.size(1)
        bias = self.repeat_bias
        if bias is None:
            return torch.zeros(seqs.size(0), t, t, device=seqs.device)
        idx = torch.arange(t, device=seqs.device)
        same = seqs.unsqueeze(2) == seqs.unsqueeze(1)  # [B, s, s']
        later = same & (idx.view(1, 1, t) > idx.view(1, t, 1))
        # Next occurrence of each position's item (t when none): s is the newest
        # occurrence for every query from s up to just before it.
        upto = torch.where(later, idx.view(1, 1, t), torch.full_like(seqs, t).unsqueeze(2))
        nxt = upto.min(dim=2).values  # [B, s]
        query = idx.view(1, t, 1)
        source = idx.view(1, 1, t)
        newest = (source <= query) & (nxt.unsqueeze(1) > query) & (seqs != 0).unsqueeze(1)
        codes = self.repeat_codes[(query - source).clamp(min=0).squeeze(0)]  # [t, t]
        scores = (self.repeat_scale * bias[codes]).unsqueeze(0)  # [1, t, t]
        gate, count_bias = self.repeat_gate, self.count_bias
        if gate is not None and count_bias is not None:
            by_bucket = hidden @ gate.t()  # [B, t, buckets]
            scores = scores + by_bucket.gather(2, codes.unsqueeze(0).expand(seqs.size(0), t, t))
            # Occurrences of s's item at positions <= s: the count at every query
            # for which s is the newest occurrence.
            count = (same & (idx.view(1, 1, t) <= idx.view(1, t, 1))).sum(dim=2)  # [B, s]
            count_codes = (count - 1).clamp(min=0, max=count_bias.size(0) - 1)
            scores = scores + (self.repeat_scale * count_bias[count_codes]).unsqueeze(1)
        return torch.where(newest, scores, torch.zeros_like(scores))

    def forward(self, seqs: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Scores [B, n_items + 1] from the newest position; column 0 is ``-inf``."""
        hidden = self.encode(seqs, flags)
        last = hidden[:, -1, :]
        scores = last @ self.item_table().t()
        if self.repeat_bias is not None:
            repeat = self.repeat_weights(seqs, hidden)[:, -1, :]
            scores = scores.scatter_add(1, seqs, repeat)
        empty = (seqs[:, -1] == 0).unsqueeze(1)
        scores = torch.where(empty, self.prior.unsqueeze(0), scores)
        scores[:, 0] = float("-inf")
        return scores


REVISIT_SHARE = 0.01
"""Sequences whose positions repeat an earlier item of the same sequence at least this
often are data where users revisit items: ranking keeps history items as candidates."""


def revisit_share(seqs: Sequence[np.ndarray]) -> float:
    """The share of positions (each sequence's first excepted) whose item already
    occurred earlier in the same sequence."""
    revisits = positions = 0
    for seq in seqs:
        seq = np.asarray(seq)
        if len(seq) < 2:
            continue
        positions += len(seq) - 1
        revisits += len(seq) - len(np.unique(seq))
    return revisits / positions if positions else 0.0


def history_candidates(seqs: Sequence[np.ndarray]) -> bool:
    """Whether full ranking keeps a history's own items as candidates, decided from
    (training) sequences alone: yes where users revisit items (:data:`REVISIT_SHARE`),
    since a revisit is then a legitimate next item; no where they do not (the MovieLens
    convention: a seen item is not recommended again)."""
    return revisit_share(seqs) >= REVISIT_SHARE


def ranks_of_targets(
    scores: np.ndarray,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    keep_history: bool = False,
) -> np.ndarray:
    """0-based rank of each target among items 1..n: all of them with ``keep_history``,
    else all but the row's history items.

    The candidates never depend on the target: when history items are excluded, a
    target among them is not ranked (its rank is n, a miss at every cut-off). Ties
    count against the target, so a constant scorer earns nothing.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    targets = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets].copy()
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    if lengths.sum() and not keep_history:
        flat = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
        scores[np.repeat(rows, lengths), flat] = -np.inf
    scores[:, 0] = -np.inf
    scores[rows, targets] = target_scores
    better = (scores > target_scores[:, None]).sum(axis=1)
    tied = (scores == target_scores[:, None]).sum(axis=1) - 1
    ranks = np.asarray(better + tied, dtype=np.int64)
    if not keep_history:
        seen = [bool(np.any(np.asarray(h) == t)) for h, t in zip(histories, targets, strict=True)]
        ranks[np.array(seen, dtype=bool)] = scores.shape[1] - 1
    return ranks


def _ndcg_recall(ranks: np.ndarray, k: int = 10) -> tuple[float, float]:
    if len(ranks) == 0:
        return 0.0, 0.0
    hit = ranks < k
    ndcg = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(ndcg.mean()), float(hit.mean())


def session_flags(sessions: np.ndarray) -> np.ndarray:
    """int64 [len - 1]: 1 where position j + 1 is in the same session as position j."""
    sessions = np.asarray(sessions)
    return (sessions[1:] == sessions[:-1]).astype(np.int64)


REPEAT_BUCKETS = 9
"""Repeat buckets by positions back: 0 (the newest item itself), 1, 2-3, 4-7, …, 128+."""
COUNT_BUCKETS = 3
"""Occurrence-count buckets of a history item (``repeat_context``): 1, 2, 3+."""
REPEAT_SCALE = 10.0
"""A repeat score is this times its parameter. Adam moves a parameter by about the
learning rate per step, so at 1e-3 a few hundred steps would leave the scores far
smaller than the logits they are added to; the scale speeds that one table up."""


def repeat_buckets(max_len: int) -> torch.Tensor:
    """int64 [max_len]: the repeat bucket of each distance 0..max_len-1 (0 → 0, d → 1 +
    ⌊log2 d⌋, at most REPEAT_BUCKETS - 1)."""
    d = torch.arange(max_len, dtype=torch.float64)
    codes = torch.where(d > 0, 1 + torch.floor(torch.log2(d.clamp(min=1))), torch.zeros_like(d))
    return codes.clamp(max=REPEAT_BUCKETS - 1).to(torch.int64)


GAP_BUCKETS = 24
"""Gap codes: 0 for no previous item or no time; ``1 + ⌊log2(1 + seconds)⌋``, at most 23."""


def gap_buckets(times: np.ndarray) -> np.ndarray:
    """int64 [len]: each position's gap code from the previous one (0 at the first).
    ``times`` in seconds, ascending; a negative gap counts as 0 s."""
    t = np.asarray(times, dtype=np.float64)
    gaps = np.maximum(np.diff(t), 0.0)
    codes = 1 + np.minimum(np.floor(np.log2(1.0 + gaps)), GAP_BUCKETS - 2)
    return np.r_[0, codes].astype(np.int64)


def pack_time_gaps(bits: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The ``time_gaps`` model's per-position input: session bit + 2 × gap code."""
    bits = np.asarray(bits, dtype=np.int64)
    if len(bits) != len(times):
        raise InvalidInputError(f"{len(bits)} flags but {len(times)} times", field="times")
    return np.clip(bits, 0, 1) + 2 * gap_buckets(times)


def training_windows(
    seqs: Sequence[np.ndarray],
    sessions: Sequence[np.ndarray] | None,
    max_len: int,
    all_windows: bool,
    times: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded windows [N, max_len + 1] of consecutive items, newest last, and each
    position's same-session-next bit (the newest position's bit is never an input);
    with ``times`` (seconds per position), the bits packed with the gap codes
    (:func:`pack_time_gaps`)."""
    width = max_len + 1
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for n, raw in enumerate(seqs):
        seq = np.asarray(raw, dtype=np.int64)
        if sessions is None:
            bits = np.ones(len(seq), dtype=np.int64)
        else:
            codes = np.asarray(sessions[n])
            if len(codes) != len(seq):
                raise InvalidInputError(
                    f"sequence {n} has {len(seq)} items but {len(codes)} session codes",
                    field="train.sessions",
                )
            bits = np.r_[session_flags(codes), 1]
        if times is not None:
            bits = pack_time_gaps(bits, times[n])
        real = seq != 0
        seq, bits = seq[real], bits[real]
        end = len(seq)
        while end >= 2:
            lo = max(0, end - width)
            rows.append((seq[lo:end], bits[lo:end]))
            if not all_windows:
                break
            end -= max_len  # consecutive windows share one item: every transition once
    items = np.zeros((len(rows), width), dtype=np.int64)
    flags = np.zeros((len(rows), width), dtype=np.int64)
    for i, (row, bit) in enumerate(rows):
        items[i, width - len(row) :] = row
        flags[i, width - len(row) :] = bit
    return items, flags


def _left_pad(
    histories: Sequence[np.ndarray],
    flags: Sequence[np.ndarray] | None,
    max_len: int,
    largest_flag: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The newest ``max_len`` items of each history and their flags (clipped to
    0..``largest_flag``), left-padded to the longest row. Without flags every position
    is 1 (one session, continuing)."""
    rows = []
    for n, raw in enumerate(histories):
        h = np.asarray(raw, dtype=np.int64)
        f = np.ones(len(h), dtype=np.int64) if flags is None else np.asarray(flags[n], np.int64)
        if len(f) != len(h):
            raise InvalidInputError(
                f"history {n} has {len(h)} items but {len(f)} flags", field="flags"
            )
        real = h != 0
        rows.append((h[real][-max_len:], f[real][-max_len:]))
    width = max(1, max((len(h) for h, _ in rows), default=1))
    items = np.zeros((len(rows), width), dtype=np.int64)
    bits = np.zeros((len(rows), width), dtype=np.int64)
    for i, (h, f) in enumerate(rows):
        if len(h):
            items[i, width - len(h) :] = h
            bits[i, width - len(h) :] = np.clip(f, 0, largest_flag)
    return items, bits


class Objective:
    """The training loss of :attr:`SasRecConfig.loss` on a catalogue of ``n_items``:
    called with a batch's inputs, flags and targets [B, T], it returns the mean loss
    over the positions whose input and target are both items."""

    def __init__(self, cfg: SasRecConfig, n_items: int, counts: np.ndarray, device: torch.device):
        self.kind = cfg.resolved_loss(n_items)
        self.n_items = n_items
        self.n_negatives = cfg.n_negatives
        self.device = device
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.mixed = (
            MixedNegatives(counts, cfg.n_negatives, cfg.negative_power, self.generator)
            if self.kind == "logq"
            else None
        )
        self.beta = gbce_beta(cfg.n_negatives, n_items, cfg.gbce_t) if self.kind == "gbce" else 1.0
        self.power, self.t = cfg.negative_power, cfg.gbce_t
        # gBCE scores are absolute, and at the start the cheapest way down its loss is
        # one constant score for every item, which the tied item table can reach by
        # making all items alike: training then stalls there. A learned offset on the
        # scores, starting at the constant that minimises the loss (σ(c)/(1 − σ(c)) =
        # β/k), takes that shift instead. Only the loss sees it: a constant does not
        # change a ranking, so serving and export leave it out.
        start = math.log(self.beta / max(cfg.n_negatives, 1))
        self.offset = nn.Parameter(torch.tensor(start, device=device))

    def parameters(self) -> list[nn.Parameter]:
        """The loss's own trained parameters (gBCE's score offset), beside the net's."""
        return [self.offset] if self.kind == "gbce" else []

    def describe(self) -> str:
        return {
            "full": "full softmax",
            "uniform": f"sampled softmax ({self.n_negatives} uniform negatives)",
            "logq": f"logQ-corrected softmax (in-batch + {self.n_negatives} sampled ∝ "
            f"count^{self.power:g})",
            "gbce": f"gBCE ({self.n_negatives} uniform negatives, t={self.t:g}, β={self.beta:.4f})",
        }[self.kind]

    def __call__(
        self, net: SasRecNet, inputs: torch.Tensor, flags: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        hidden = net.encode(inputs, flags)
        trained = (inputs != 0) & (targets != 0)
        h, y = hidden[trained], targets[trained]
        # Each trained position's repeat scores over its prefix ([P, T], with the items).
        repeat = net.repeat_bias is not None
        if repeat:
            where = trained.nonzero(as_tuple=True)
            weights = net.repeat_weights(inputs, hidden)[where]
            history = inputs[where[0]]
        if self.kind == "full":
            logits = h @ net.item_table()[1:].t()
            if repeat:
                logits = logits.scatter_add(1, (history - 1).clamp(min=0), weights)
            return F.cross_entropy(logits, y - 1)
        if self.mixed is not None:
            candidates, labels, log_inclusion = self.mixed.draw(y)
            extra = history_scores(weights, history, candidates) if repeat else None
            return sampled_softmax(h, net.item_table(), labels, candidates, log_inclusion, extra)
        negatives = torch.randint(
            1, self.n_items + 1, (self.n_negatives,), generator=self.generator
        ).to(self.device)
        positive = (h * net.item_vectors(y)).sum(dim=-1)
        negative = h @ net.item_vectors(negatives).t()
        if repeat:
            positive = positive + (weights * (history == y.unsqueeze(1))).sum(dim=1)
            negative = negative + history_scores(weights, history, negatives)
        same = negatives.unsqueeze(0) == y.unsqueeze(1)
        if self.kind == "gbce":
            return gbce_loss(positive + self.offset, negative + self.offset, self.beta, same)
        logits = torch.cat([positive.unsqueeze(1), negative.masked_fill(same, float("-inf"))], 1)
        return F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=h.device))


def train_step(
    net: SasRecNet,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[float, int]:
    """One optimiser step on (inputs, flags, targets); returns the loss and the number of
    positions trained (next-item predictions)."""
    inputs, flags, targets = batch
    loss = objective(net, inputs, flags, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), int(((inputs != 0) & (targets != 0)).sum())


_END = object()


def training_batches(
    windows: np.ndarray,
    window_flags: np.ndarray,
    order: np.ndarray,
    cfg: SasRecConfig,
    device: torch.device,
) -> Generator[tuple[torch.Tensor, torch.Tensor, torch.Tensor], None, None]:
    """(inputs, flags, targets) of each batch of ``order``'s windows, each cut to its
    longest row. With ``cfg.prefetch`` > 0 a loader thread prepares up to that many
    batches ahead; an error there is raised here, and closing the iterator stops it."""

    def make(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = windows[rows]
        width = int((batch != 0).sum(axis=1).max())
        items = torch.from_numpy(batch[:, -width:]).to(device)
        bits = torch.from_numpy(window_flags[rows, -width:]).to(device)
        return items[:, :-1], bits[:, :-1], items[:, 1:]

    chunks = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    if cfg.prefetch == 0:
        for rows in chunks:
            yield make(rows)
        return
    ready: queue.Queue[Any] = queue.Queue(maxsize=cfg.prefetch)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for rows in chunks:
                if not put(make(rows)):
                    return
            put(_END)
        except BaseException as e:  # handed to the training thread, which raises it
            put(e)

    loader = threading.Thread(target=fill, name="sasrec-loader", daemon=True)
    loader.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        loader.join()


class SasRecRecommender:
    """Trains a :class:`SasRecNet` on item sequences and scores the full catalogue.

    Example:
        >>> model = SasRecRecommender(SasRecConfig(max_epochs=50))
        >>> model.fit(split, progress=print)  # doctest: +SKIP
        >>> scores = model.score([np.array([3, 7, 2])])  # [1, n_items + 1]  # doctest: +SKIP
    """

    def __init__(self, config: SasRecConfig | None = None, name: str | None = None) -> None:
        self.config = config or SasRecConfig()
        self.name: str = name or "sasrec"
        self.attributes: ItemAttributes | None = None
        self.net: SasRecNet | None = None
        self.item_ids: list[str] = []
        self.history: list[dict[str, float]] = []
        self.epoch_losses: list[float] = []
        self.epoch_seconds: list[float] = []
        """Training seconds of each epoch (validation excluded)."""
        self.epoch_examples: list[int] = []
        """Trained positions (next-item predictions) of each epoch."""
        self.best_epoch: int = 0
        self.keep_history = False
        """Whether validation ranks among history items too (:func:`history_candidates`
        of the training sequences)."""

    @property
    def n_items(self) -> int:
        """Catalogue size (indices 1..n_items); 0 before training."""
        return max(0, len(self.item_ids) - 1)

    def fit(self, split: SplitLike, progress: Callable[[str], None] | None = None) -> None:
        """Train on ``split.train.seqs``, early-stopping on the validation part.

        Reads ``split.train`` and ``split.valid_*`` only. Without validation users,
        trains for ``max_epochs`` (or the time budget) and keeps the last weights.
        """
        cfg = self.config
        say = progress or (lambda _line: None)
        item_ids = list(split.train.item_ids)
        n_items = len(item_ids) - 1
        if n_items < 1:
            raise InvalidInputError("the split has no items", field="train.item_ids")
        seqs = list(split.train.seqs)
        for seq in seqs:
            _check_indices(seq, n_items, "train.seqs")
        sessions = getattr(split.train, "sessions", None) or None
        times = None
        if cfg.time_gaps:
            times = getattr(split.train, "times", None) or None
            if times is None:
                raise InvalidInputError(
                    "time_gaps needs the training sequences' times (train.times)",
                    field="time_gaps",
                )
        windows, window_flags = training_windows(
            seqs, sessions if cfg.session_flags else None, cfg.max_len, cfg.all_windows, times
        )
        if len(windows) == 0:
            raise InvalidInputError("no training sequence has two items", field="train.seqs")
        attributes = getattr(split.train, "attributes", None) if cfg.use_attributes else None
        if attributes is not None and len(attributes.categories) != n_items + 1:
            raise InvalidInputError(
                f"item attributes cover {len(attributes.categories) - 1} items; the split has "
                f"{n_items}",
                field="attributes",
            )
        self.attributes = attributes
        self.keep_history = history_candidates(seqs)
        rng = np.random.default_rng(cfg.seed)
        valid = _validation_sample(split, n_items, cfg.max_valid, rng, cfg)

        self.item_ids = item_ids
        self.history, self.epoch_losses, self.best_epoch = [], [], 0
        self.epoch_seconds, self.epoch_examples = [], []
        device = torch.device(cfg.device)
        counts = np.bincount(windows.ravel(), minlength=n_items + 1).astype(np.float32)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = self._new_net(n_items).to(device)
            self.net = net
            with torch.no_grad():
                net.prior.copy_(torch.from_numpy(np.log1p(counts)))
                net.prior[0] = 0.0
            objective = Objective(cfg, n_items, counts, device)
            optimizer = torch.optim.Adam(
                [*net.parameters(), *objective.parameters()],
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
            )
            n_params = sum(p.numel() for p in net.parameters())
            say(
                f"[{self.name}] {len(windows)} windows from {len(seqs)} sequences, "
                f"{n_items} items, {len(valid[1])} validation users, {n_params} parameters, "
                f"session flags {'on' if sessions and cfg.session_flags else 'off'}, "
                f"attributes {'on' if attributes is not None else 'off'}, "
                f"loss {objective.describe()}, {torch.get_num_threads()} threads"
            )
            self._train_loop(net, optimizer, objective, windows, window_flags, valid, rng, say)

    def _new_net(self, n_items: int) -> SasRecNet:
        a = self.attributes
        if a is None:
            return SasRecNet(n_items, self.config)
        net = SasRecNet(n_items, self.config, a.n_categories, a.n_price_buckets)
        net.item_cat.copy_(torch.from_numpy(np.asarray(a.categories, dtype=np.int64)))
        net.item_price.copy_(torch.from_numpy(np.asarray(a.price_buckets, dtype=np.int64)))
        return net

    def _train_loop(
        self,
        net: SasRecNet,
        optimizer: torch.optim.Optimizer,
        objective: Objective,
        windows: np.ndarray,
        window_flags: np.ndarray,
        valid: tuple[list[np.ndarray], np.ndarray, list[np.ndarray] | None],
        rng: np.random.Generator,
        say: Callable[[str], None],
    ) -> None:
        valid_history, valid_target, valid_flags = valid
        cfg = self.config
        device = torch.device(cfg.device)
        began = time.perf_counter()
        deadline = None if cfg.max_train_seconds is None else began + cfg.max_train_seconds
        best_ndcg = -1.0
        best_state: dict[str, torch.Tensor] | None = None
        stale = 0
        stop_reason = f"reached max_epochs={cfg.max_epochs}"
        for epoch in range(1, cfg.max_epochs + 1):
            net.train()
            epoch_began = time.perf_counter()
            total, steps, examples = 0.0, 0, 0
            batches = training_batches(
                windows, window_flags, rng.permutation(len(windows)), cfg, device
            )
            for batch in batches:
                loss, trained = train_step(net, optimizer, objective, batch)
                total += loss
                steps += 1
                examples += trained
                if deadline is not None and time.perf_counter() >= deadline:
                    batches.close()  # the budget ends mid-epoch: stop the loader, evaluate
                    break
            self.epoch_seconds.append(time.perf_counter() - epoch_began)
            self.epoch_examples.append(examples)
            train_loss = total / max(steps, 1)
            self.epoch_losses.append(train_loss)
            elapsed = time.perf_counter() - began
            out_of_time = cfg.max_train_seconds is not None and elapsed >= cfg.max_train_seconds
            last = epoch == cfg.max_epochs or out_of_time
            if epoch % cfg.eval_every and not last:
                continue
            if len(valid_target) == 0:
                say(f"[{self.name}] epoch {epoch:3d} loss {train_loss:.4f} {elapsed:6.1f}s")
                self.best_epoch = epoch
                if out_of_time:
                    stop_reason = f"time budget {cfg.max_train_seconds}s spent"
                    break
                continue
            ranks = ranks_of_targets(
                self.score(valid_history, valid_flags),
                valid_history,
                valid_target,
                self.keep_history,
            )
            ndcg, recall = _ndcg_recall(ranks)
            elapsed = time.perf_counter() - began
            self.history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "valid_ndcg10": ndcg,
                    "valid_recall10": recall,
                    "elapsed_s": elapsed,
                    "train_s": sum(self.epoch_seconds),
                }
            )
            improved = ndcg > best_ndcg
            if improved:
                best_ndcg, self.best_epoch, stale = ndcg, epoch, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                stale += 1
            say(
                f"[{self.name}] epoch {epoch:3d} loss {train_loss:.4f} "
                f"valid NDCG@10 {ndcg:.4f} Recall@10 {recall:.4f}"
                f"{' *' if improved else '  '} {elapsed:6.1f}s"
            )
            if stale >= cfg.patience:
                stop_reason = f"no better validation NDCG@10 in {cfg.patience} evaluations"
                break
            if out_of_time:
                stop_reason = f"time budget {cfg.max_train_seconds}s spent"
                break
        if best_state is not None:
            net.load_state_dict(best_state)
            say(
                f"[{self.name}] stopped: {stop_reason}; restored epoch {self.best_epoch} "
                f"(valid NDCG@10 {best_ndcg:.4f})"
            )
        else:
            say(f"[{self.name}] stopped: {stop_reason}")
        net.eval()

    def training_summary(self) -> dict[str, Any]:
        """What the registry manifest records about how this model was trained."""
        seconds = sum(self.epoch_seconds)
        return {
            "loss": self.config.resolved_loss(self.n_items),
            "config": asdict(self.config),
            "epochs": len(self.epoch_losses),
            "best_epoch": self.best_epoch,
            "train_s": seconds,
            "positions_per_s": sum(self.epoch_examples) / seconds if seconds else None,
            "threads": torch.get_num_threads(),
        }

    def _require_net(self) -> SasRecNet:
        if self.net is None:
            raise InvalidInputError(f"{self.name} is not trained; call fit() or load() first")
        return self.net

    @property
    def reads_times(self) -> bool:
        """Whether :meth:`score` wants the histories' times (``time_gaps``)."""
        return self.config.time_gaps

    @torch.no_grad()
    def score(
        self,
        histories: Sequence[np.ndarray],
        flags: Sequence[np.ndarray] | None = None,
        times: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Scores float32 [len(histories), n_items + 1] from each history (oldest first).

        ``flags[i][j]`` is 1 when the item after ``histories[i][j]`` (for the newest
        position: the item being predicted) is in the same session; without flags,
        all 1. ``times[i][j]``: the time of ``histories[i][j]`` in seconds, read by a
        ``time_gaps`` model (without them its gap inputs are "unknown"). Only the
        newest ``max_len`` items count. Column 0 is ``-inf``; an
        empty history gets the training log-popularity. History items are not excluded.
        """
        net = self._require_net()
        net.eval()
        device = next(net.parameters()).device
        out = np.empty((len(histories), self.n_items + 1), dtype=np.float32)
        size = self.config.eval_batch_size
        for start in range(0, len(histories), size):
            chunk = histories[start : start + size]
            for h in chunk:
                _check_indices(h, self.n_items, "histories")
            bits = None
            if flags is not None and self.config.session_flags:
                bits = flags[start : start + size]
            if self.config.time_gaps and times is not None:
                bits = _model_flags(self.config, chunk, bits, times[start : start + size])
            largest = 2 * GAP_BUCKETS - 1 if self.config.time_gaps else 1
            seqs, bit_rows = _left_pad(chunk, bits, self.config.max_len, largest)
            out[start : start + len(chunk)] = (
                net(torch.from_numpy(seqs).to(device), torch.from_numpy(bit_rows).to(device))
                .float()
                .cpu()
                .numpy()
            )
        return out

    def scripted(self) -> torch.jit.ScriptModule:
        """TorchScript of the scoring forward: int64 [B, T ≤ max_len] left-padded items and
        their flags → [B, n+1].

        Uses ``torch.jit.script`` (the forward has no data-dependent Python control
        flow, so scripting and eager agree; its deprecation warning is silenced).
        The module is a copy in eval mode on the CPU, independent of later training.
        """
        net = copy.deepcopy(self._require_net()).cpu().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.script(net)
        return module

    def plot_curves(self, path: str | Path) -> Path:
        """Write a PNG of training loss per epoch and validation NDCG@10/Recall@10
        against wall-clock seconds since training began (validation time included)."""
        from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

        path = Path(path)
        fig = Figure(figsize=(10, 4), layout="constrained")
        ax_loss, ax_metric = fig.subplots(1, 2)
        ax_loss.plot(range(1, len(self.epoch_losses) + 1), self.epoch_losses, color="tab:blue")
        loss = self.config.resolved_loss(self.n_items) if self.n_items else self.config.loss
        ax_loss.set(title=f"{self.name}: training loss ({loss})", xlabel="epoch", ylabel="loss")
        seconds = [h["elapsed_s"] for h in self.history]
        ax_metric.plot(seconds, [h["valid_ndcg10"] for h in self.history], "o-", label="NDCG@10")
        ax_metric.plot(
            seconds, [h["valid_recall10"] for h in self.history], "s-", label="Recall@10"
        )
        best = [h["elapsed_s"] for h in self.history if h["epoch"] == self.best_epoch]
        if best:
            ax_metric.axvline(best[0], color="grey", linestyle=":", label="best")
        ax_metric.set(
            title="validation (full ranking)", xlabel="wall-clock seconds", ylabel="metric"
        )
        ax_metric.legend()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path

    def save(self, directory: str | Path) -> Path:
        """Write ``model.pt`` (state_dict), ``config.json`` and ``item_ids.json``."""
        net = self._require_net()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save(state, directory / _WEIGHTS)
        meta = {
            "format_version": _FORMAT_VERSION,
            "name": self.name,
            "n_items": self.n_items,
            "best_epoch": self.best_epoch,
            "config": asdict(self.config),
            "attributes": None if self.attributes is None else self.attributes.to_json(),
            "history": self.history,
            "epoch_losses": self.epoch_losses,
            "epoch_seconds": self.epoch_seconds,
            "epoch_examples": self.epoch_examples,
        }
        (directory / _CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        (directory / _ITEM_IDS).write_text(json.dumps(self.item_ids) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> SasRecRecommender:
        """Read what :meth:`save` wrote; ``device`` overrides the saved one."""
        directory = Path(directory)
        for name in (_WEIGHTS, _CONFIG, _ITEM_IDS):
            if not (directory / name).is_file():
                raise NotFoundError(f"{directory / name} does not exist")
        meta = json.loads((directory / _CONFIG).read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise InvalidInputError(
                f"{directory / _CONFIG}: unsupported format_version {meta.get('format_version')}"
            )
        # A model saved before `repeat` (or `repeat_context`) existed has none.
        config = SasRecConfig.from_dict(
            {"repeat": False, "repeat_context": False, **meta["config"]}
        )
        if device is not None:
            config = SasRecConfig.from_dict({**asdict(config), "device": device})
        model = cls(config, name=meta["name"])
        model.item_ids = [str(i) for i in json.loads((directory / _ITEM_IDS).read_text())]
        if model.n_items != meta["n_items"]:
            raise InvalidInputError(
                f"{directory}: item_ids.json has {model.n_items} items, config says {meta['n_items']}"
            )
        state = _renamed(torch.load(directory / _WEIGHTS, map_location="cpu", weights_only=True))
        saved = meta.get("attributes")
        if saved is not None:
            model.attributes = ItemAttributes(
                categories=state["item_cat"].numpy(),
                category_names=[str(n) for n in saved["category_names"]],
                price_buckets=state["item_price"].numpy(),
                price_edges=[float(e) for e in saved["price_edges"]],
            )
        net = model._new_net(model.n_items)
        net.load_state_dict(state)
        model.net = net.to(torch.device(config.device)).eval()
        model.best_epoch = int(meta.get("best_epoch", 0))
        model.history = list(meta.get("history", []))
        model.epoch_losses = [float(x) for x in meta.get("epoch_losses", [])]
        model.epoch_seconds = [float(x) for x in meta.get("epoch_seconds", [])]
        model.epoch_examples = [int(x) for x in meta.get("epoch_examples", [])]
        return model


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved before the feed-forward became a module of its own (``ffn.0`` and
    ``ffn.3`` of an ``nn.Sequential``) under today's names (``ffn.inner``, ``ffn.outer``)."""
    old = {".ffn.0.": ".ffn.inner.", ".ffn.3.": ".ffn.outer."}
    renamed = {}
    for key, value in state.items():
        for before, after in old.items():
            key = key.replace(before, after)
        renamed[key] = value
    return renamed


def _model_flags(
    cfg: SasRecConfig,
    histories: Sequence[np.ndarray],
    flags: Sequence[np.ndarray] | None,
    times: Sequence[np.ndarray],
) -> list[np.ndarray]:
    """Session bits (1 without flags or with ``session_flags`` off) packed with the
    gap codes of ``times``."""
    out = []
    for n, history in enumerate(histories):
        bits = (
            np.asarray(flags[n], np.int64)
            if flags is not None and cfg.session_flags
            else np.ones(len(history), np.int64)
        )
        out.append(pack_time_gaps(bits, np.asarray(times[n])))
    return out


def _check_indices(seq: np.ndarray, n_items: int, field: str) -> None:
    arr = np.asarray(seq)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{field}: expected 1-d integer arrays, got {arr.dtype}", field)
    if len(arr) and (int(arr.min()) < 0 or int(arr.max()) > n_items):
        raise InvalidInputError(f"{field}: item indices must be in 0..{n_items}", field=field)


def _validation_sample(
    split: SplitLike,
    n_items: int,
    max_valid: int,
    rng: np.random.Generator,
    cfg: SasRecConfig,
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray] | None]:
    """Validation histories, targets and flags (when the split has them; with
    ``time_gaps``, packed with the validation times), a seeded sample of at most
    ``max_valid``."""
    flags = getattr(split, "valid_flags", None) or None
    histories = [np.asarray(h, dtype=np.int64) for h in split.valid_history]
    if cfg.time_gaps:
        times = getattr(split, "valid_times", None) or None
        if times is None:
            raise InvalidInputError("time_gaps needs the validation times", "valid_times")
        flags = _model_flags(cfg, histories, flags, times)
    targets = np.asarray(split.valid_target, dtype=np.int64).reshape(-1)
    if len(histories) != len(targets):
        raise InvalidInputError(
            f"{len(histories)} validation histories but {len(targets)} targets", "valid_target"
        )
    for h in histories:
        _check_indices(h, n_items, "valid_history")
    _check_indices(targets, n_items, "valid_target")
    if len(targets) and int(targets.min()) < 1:
        raise InvalidInputError("valid_target holds padding (0)", field="valid_target")
    if len(targets) > max_valid:
        keep = np.sort(rng.choice(len(targets), size=max_valid, replace=False))
        picked = None if flags is None else [flags[i] for i in keep]
        return [histories[i] for i in keep], targets[keep], picked
    return histories, targets, flags
