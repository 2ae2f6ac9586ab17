"""Softmax losses over a catalogue, full and sampled, shared by the ranker and the two-tower.

Every function here takes query vectors ``h`` [P, H] (one per trained position or
request) and an item table or item vectors, and returns logits or a scalar loss. Item
indices are ``1..n`` with ``0`` as padding, as everywhere in ``inkling.models``.

- :func:`in_batch_logits`: the two-tower's softmax over the batch's own targets, with
  the logQ correction of Yi et al. (RecSys 2019).
- :class:`MixedNegatives` and :func:`sampled_softmax`: a softmax over the batch's
  distinct targets plus ``K`` items drawn from a popularity distribution (mixed
  negative sampling, Yang et al., WWW 2020), each candidate's logit corrected by the
  log of its probability of being among the candidates. Candidates are deduplicated,
  so the correction is the log *inclusion* probability ``π_j = 1 − exp(−E_j)``, ``E_j``
  the expected number of times ``j`` is drawn (targets and samples together, a
  Poisson approximation). A candidate set holding every item with ``π = 1`` gives the
  full softmax exactly.
- :func:`gbce_loss`: gSASRec's generalised binary cross-entropy (Petrov & Macdonald,
  RecSys 2023) over uniformly sampled negatives, whose calibration ``t`` undoes the
  over-confidence that negative sampling teaches.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from inkling.errors import InvalidInputError

__all__ = [
    "MixedNegatives",
    "gbce_beta",
    "gbce_loss",
    "in_batch_logits",
    "sampled_softmax",
]


def in_batch_logits(
    queries: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None,
) -> torch.Tensor:
    """[B, B] logits of row b's query against the batch's target items.

    ``logit[b, j] = q_b · v_j / τ − log Q(target_j)`` (the second term when ``log_q``
    is given: the log of each item's sampling probability, indexed by item). A column
    whose target equals row b's own target, other than b's own column, is ``-inf``: the
    same item is not a negative of itself.
    """
    logits = queries @ items.t() / temperature
    if log_q is not None:
        logits = logits - log_q[targets].unsqueeze(0)
    same = targets.unsqueeze(0) == targets.unsqueeze(1)
    own = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    return logits.masked_fill(same & ~own, float("-inf"))


def sampled_softmax(
    h: torch.Tensor,
    table: torch.Tensor,
    labels: torch.Tensor,
    candidates: torch.Tensor,
    log_inclusion: torch.Tensor,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of each row's label among ``candidates``, logQ-corrected.

    Args:
        h: [P, H] query vectors.
        table: [n + 1, H] item vectors (row 0 is padding and never a candidate).
        labels: int64 [P], each row's column in ``candidates`` (its target's position).
        candidates: int64 [C] distinct item indices, every row's target among them.
        log_inclusion: [C] ``log π_j``, the log probability that candidate ``j`` was
            in the set; subtracted from its logit. Zeros when the set is not sampled.
        extra: [P, C] scores added to the logits (a history's repeat scores), or None.
    """
    logits = h @ table[candidates].t() - log_inclusion.unsqueeze(0)
    if extra is not None:
        logits = logits + extra
    return F.cross_entropy(logits, labels)


def history_scores(
    weights: torch.Tensor, items: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """[P, C]: each row's score of each candidate from its history — ``weights[p, s]``
    summed over the positions ``s`` where ``items[p, s]`` is the candidate.

    Args:
        weights: [P, T] a score per history position (0 where it gives none).
        items: int64 [P, T] the history's item indices (0 = padding, weight 0).
        candidates: int64 [C] item indices, repeats allowed (each copy scored alike).
    """
    distinct, inverse = torch.unique(candidates, return_inverse=True)
    largest = [int(t.max()) for t in (items, distinct) if t.numel()]
    size = max(largest, default=0) + 1
    column = torch.full((size,), len(distinct), dtype=torch.long, device=items.device)
    column[distinct] = torch.arange(len(distinct), device=items.device)
    out = torch.zeros(items.size(0), len(distinct) + 1, device=weights.device, dtype=weights.dtype)
    out = out.scatter_add(1, column[items], weights)
    return out[:, inverse]


class MixedNegatives:
    """Draws the candidate set of :func:`sampled_softmax` for one batch: the batch's
    distinct targets plus ``n_sampled`` items drawn with replacement from
    ``q_j ∝ count_j ** power`` (``power`` 0: uniform over the catalogue; 1: the
    training popularity), and the log inclusion probability of each.

    The targets are draws from the training distribution ``p_j ∝ count_j``, so item
    ``j`` is expected ``E_j = P·p_j + K·q_j`` times among ``P`` targets and ``K``
    samples; it is in the deduplicated set with probability ``π_j ≈ 1 − exp(−E_j)``.
    """

    def __init__(
        self, counts: np.ndarray, n_sampled: int, power: float, generator: torch.Generator
    ) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 1 or len(counts) < 2:
            raise InvalidInputError("counts must be 1-d over items 0..n", field="counts")
        if n_sampled < 0:
            raise InvalidInputError(f"n_sampled must be >= 0, got {n_sampled}", "n_sampled")
        counts = counts.copy()
        counts[0] = 0.0
        total = counts.sum()
        if total <= 0:
            raise InvalidInputError("counts hold no item", field="counts")
        weights = np.zeros_like(counts)  # padding (index 0) is never drawn
        weights[1:] = np.maximum(counts[1:], 0.0) ** power
        if power > 0:
            # A never-seen item keeps a small chance, so the tail is still a negative.
            weights[1:] = np.maximum(weights[1:], weights[1:][weights[1:] > 0].min() / 2)
        self.p = torch.from_numpy(counts / total).float()
        self.q = torch.from_numpy(weights / weights.sum()).float()
        self.n_sampled = n_sampled
        self.generator = generator

    def draw(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(candidates [C], labels [P] (each target's column), log π [C]) for targets [P]."""
        if self.n_sampled:
            sampled = torch.multinomial(
                self.q, self.n_sampled, replacement=True, generator=self.generator
            ).to(targets.device)
            pool = torch.cat([targets, sampled])
        else:
            pool = targets
        candidates, inverse = torch.unique(pool, return_inverse=True)
        labels = inverse[: len(targets)]
        p, q = self.p.to(targets.device), self.q.to(targets.device)
        expected = len(targets) * p[candidates] + self.n_sampled * q[candidates]
        return candidates, labels, torch.log(-torch.expm1(-expected.clamp_min(1e-12)))


def gbce_beta(n_negatives: int, n_items: int, t: float) -> float:
    """gSASRec's power on the positive's probability: ``β = α(t(1 − 1/α) + 1/α)`` with
    the sampling rate ``α = k / (n − 1)``; ``t = 0`` gives plain BCE (``β = 1``),
    ``t = 1`` gives ``β = α``."""
    if n_items < 2:
        raise InvalidInputError("gBCE needs at least two items", field="n_items")
    if not 0.0 <= t <= 1.0:
        raise InvalidInputError(f"gbce_t must be in [0, 1], got {t}", field="gbce_t")
    alpha = min(1.0, n_negatives / (n_items - 1))
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce_loss(
    positive: torch.Tensor, negative: torch.Tensor, beta: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows of ``−β log σ(s⁺) − Σ_k log(1 − σ(s⁻_k))``.

    ``positive`` [P] logits of the targets, ``negative`` [P, K] logits of the sampled
    negatives; ``mask`` [P, K] True where a "negative" is in fact the row's target
    (left out of the sum).
    """
    if not math.isfinite(beta) or beta <= 0:
        raise InvalidInputError(f"gBCE beta must be positive, got {beta}", field="beta")
    neg = F.softplus(negative)
    if mask is not None:
        neg = neg.masked_fill(mask, 0.0)
    return (beta * F.softplus(-positive) + neg.sum(dim=1)).mean()
