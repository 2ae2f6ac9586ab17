"""Offline evaluation of next-item recommenders: leave-last-out, full and sampled ranking.

Data
    `load_sequences` turns the event log into one item sequence per user (or per
    session when most interactions are anonymous): interactions only (click,
    add_to_cart, purchase), in time order (ties broken by `event_id`), consecutive
    repeats of the same item collapsed. Items are indexed 1..n in id order; index 0
    is padding.

    Each position also keeps its session (`Sequences.sessions`), and when the data
    directory has a catalogue, each item its category and price bucket
    (`Sequences.attributes`).

Split (`leave_last_out`)
    Per sequence the last item is the test target, the one before the validation
    target and the rest is training data. Validation predicts its target from the
    training part; test predicts its target from training + validation. Models are
    fitted on `Split.without_test()`, so test targets never reach `fit`.
    Each history comes with its session flags: flag j is 1 when the item after
    position j (for the newest position: the target) is in the same session.

Session part and history only
    The items of a history that share the target's session are its *session part*:
    what the user did a moment ago. `HistoryOnly` wraps a fitted model and scores
    with the session part cut off, the ranker without its session input. The
    candidates stay those of the full history, so the two rows differ only in what
    the model sees.

Full ranking (the headline)
    The target is ranked against the catalogue. Whether a history's own items are
    candidates is decided once per split from the training sequences
    (`Split.keep_history`, `history_candidates`): where users revisit items (Diginetica's
    sessions), they are, since a revisit is a legitimate next item; where they do not
    (MovieLens ratings), they are excluded, and a target among them is a miss. The
    candidates never depend on the target: excluding the history but keeping a target
    that repeats it tells the model which history item is the answer. Recall@k (= HR@k
    with one target), NDCG@k and MRR (uncut).

Sampled ranking (reported beside it, always labelled "sampled")
    The protocol of SASRec (Kang & McAuley, 2018): the target against
    `sampled_negatives` items drawn uniformly, without replacement, from the items
    that are neither in the history nor the target (seeded; the same draw for every
    model). HR@k and NDCG@k.

Ties
    A target that ties with other candidates gets the metric's *expected value*
    under a uniformly random order of the tied items: with `g` candidates scoring
    strictly higher and `t` tying, its position is uniform on g+1 .. g+t+1. A
    constant scorer therefore scores exactly like a random ranking (Recall@10 =
    10 / candidates), never better.

Baselines: `MostPopular` (training interaction counts), `AlsBaseline` (Spark's
implicit ALS on the training part; a history is folded in by the same least-squares
step ALS uses for its user factors) and `ItemKNN` (item-to-item co-occurrence
neighbours of the last few items, a session-based baseline).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.als import AlsConfig, als_estimator
from inkling.errors import InvalidInputError, NotFoundError
from inkling.events.eventlog import EventLog
from inkling.events.schema import INTERACTION_TYPES
from inkling.models.sasrec import ItemAttributes, history_candidates, revisit_share, session_flags

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

PAD = "<pad>"
"""`Sequences.item_ids[0]`: the padding index, never a real item."""
MIN_SEQUENCES = 10
"""Fewer sequences than this say nothing about a model; `load_sequences` refuses them."""
BY = ("auto", "user", "session")
BATCH_CELLS = 4_000_000
"""Rows per batch are capped so that a batch's [rows, n_items + 1] matrices stay this small."""

Progress = Callable[[str], None]


# --- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sequences:
    """Item sequences, one per key, over a shared vocabulary.

    Attributes:
        item_ids: the vocabulary; index i is `item_ids[i]`; `item_ids[0]` is `PAD`.
        keys: one per sequence: the user id, or the session id when `by` is "session".
        seqs: int64 item indices (>= 1) in time order.
        by: "user" or "session".
        stats: counts from loading (rows read, anonymous dropped, repeats collapsed, ...).
        sessions: per sequence, a session code per position (equal codes = same
            session); empty when unknown (each sequence is then one session).
        attributes: category and price bucket per item index, when known.
        times: per sequence, each position's time in epoch seconds (int64); empty
            when unknown.
    """

    item_ids: list[str]
    keys: list[str]
    seqs: list[np.ndarray]
    by: str
    stats: dict[str, int] = field(default_factory=dict)
    sessions: list[np.ndarray] = field(default_factory=list)
    attributes: ItemAttributes | None = None
    times: list[np.ndarray] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        """Real items; score matrices have `n_items + 1` columns (column 0 is padding)."""
        return len(self.item_ids) - 1

    def __len__(self) -> int:
        return len(self.seqs)


def load_sequences(
    events_dir: Path, by: str = "auto", min_length: int = 3, catalog: Path | None = None
) -> Sequences:
    """Interaction sequences from the event log at `events_dir`.

    Args:
        events_dir: the event log's root directory.
        catalog: a catalogue `items.parquet` (item_id, category, price); when it
            exists the sequences carry each item's attributes.
        by: "user", "session", or "auto": per user when at least half of the
            interactions carry a `user_id`, else per session. Per user, anonymous
            interactions are left out.
        min_length: sequences shorter than this (after collapsing repeats) are dropped.

    Raises:
        NotFoundError: `events_dir` does not exist.
        InvalidInputError: a bad argument, no interactions, or fewer than
            `MIN_SEQUENCES` sequences of `min_length` items.
    """
    if by not in BY:
        raise InvalidInputError(f"by must be one of {', '.join(BY)}; got {by!r}", field="by")
    if min_length < 1:
        raise InvalidInputError(
            f"min_length must be at least 1, got {min_length}", field="min_length"
        )
    root = Path(events_dir)
    if not root.exists():
        raise NotFoundError(f"event log directory {root} does not exist")
    table = EventLog(root).read(
        ["event_id", "user_id", "session_id", "item_id", "event_type", "timestamp"]
    )
    read = table.num_rows
    table = table.filter(
        pc.and_(
            pc.is_in(table.column("event_type"), value_set=pa.array(INTERACTION_TYPES)),
            pc.is_valid(table.column("item_id")),
        )
    )
    interactions = table.num_rows
    if interactions == 0:
        raise InvalidInputError(
            f"the event log at {root} has no interactions ({', '.join(INTERACTION_TYPES)}) "
            f"to evaluate on ({read} events read)"
        )
    with_user = interactions - table.column("user_id").null_count
    if by == "auto":
        by = "user" if with_user * 2 >= interactions else "session"
    if by == "user":
        table = table.filter(pc.is_valid(table.column("user_id")))
    key_column = "user_id" if by == "user" else "session_id"
    table = table.sort_by(
        [(key_column, "ascending"), ("timestamp", "ascending"), ("event_id", "ascending")]
    )
    keys = np.asarray(table.column(key_column).to_numpy(zero_copy_only=False), dtype=object)
    raw_items = np.asarray(table.column("item_id").to_numpy(zero_copy_only=False), dtype=object)
    if len(keys) == 0:
        _too_few(root, by, min_length, 0, 0)
    _, key_codes = np.unique(keys, return_inverse=True)
    session_names = table.column("session_id").fill_null("").to_numpy(zero_copy_only=False)
    _, session_codes = np.unique(np.asarray(session_names, dtype=object), return_inverse=True)
    item_names, item_codes = np.unique(raw_items, return_inverse=True)
    starts = np.r_[True, key_codes[1:] != key_codes[:-1]]
    keep = starts | np.r_[True, item_codes[1:] != item_codes[:-1]]
    keys, item_codes, starts = keys[keep], item_codes[keep], starts[keep]
    session_codes = session_codes[keep]
    seconds = (
        np.asarray(table.column("timestamp").to_numpy(zero_copy_only=False))
        .astype("datetime64[s]")
        .astype(np.int64)[keep]
    )

    bounds = np.r_[np.flatnonzero(starts), len(item_codes)]
    lengths = np.diff(bounds)
    long_enough = lengths >= min_length
    if int(long_enough.sum()) < MIN_SEQUENCES:
        _too_few(root, by, min_length, int(long_enough.sum()), len(lengths))
    row_kept = np.repeat(long_enough, lengths)
    used = np.unique(item_codes[row_kept])
    remap = np.zeros(len(item_names), dtype=np.int64)
    remap[used] = np.arange(1, len(used) + 1)
    kept = np.flatnonzero(long_enough)
    seqs = [remap[item_codes[bounds[i] : bounds[i + 1]]] for i in kept]
    sessions = [session_codes[bounds[i] : bounds[i + 1]].astype(np.int64) for i in kept]
    stats = {
        "events_read": read,
        "interactions": interactions,
        "anonymous_dropped": interactions - with_user if by == "user" else 0,
        "repeats_collapsed": int((~keep).sum()),
        "short_sequences_dropped": int((~long_enough).sum()),
        "sequences": len(seqs),
        "items": len(used),
        "sequence_items": int(lengths[long_enough].sum()),
    }
    item_ids = [PAD, *(str(name) for name in item_names[used])]
    return Sequences(
        item_ids=item_ids,
        keys=[str(k) for k in keys[bounds[:-1][long_enough]]],
        seqs=seqs,
        by=by,
        stats=stats,
        sessions=sessions,
        attributes=load_item_attributes(catalog, item_ids) if catalog else None,
        times=[seconds[bounds[i] : bounds[i + 1]] for i in kept],
    )


def load_item_attributes(path: Path, item_ids: Sequence[str]) -> ItemAttributes | None:
    """Category and price bucket per item index from a catalogue parquet; None when the
    file does not exist or has no category column. Items it lacks are unknown (code 0)."""
    path = Path(path)
    if not path.is_file():
        return None
    table = pq.read_table(path)
    if "item_id" not in table.column_names or "category" not in table.column_names:
        return None
    ids = table.column("item_id").to_pylist()
    cats = dict(zip(ids, table.column("category").to_pylist(), strict=True))
    prices: dict[str, float | None] = {}
    if "price" in table.column_names:
        prices = dict(zip(ids, table.column("price").to_pylist(), strict=True))
    return ItemAttributes.build(
        [None, *(cats.get(i) for i in item_ids[1:])],
        [None, *(prices.get(i) for i in item_ids[1:])],
    )


def _too_few(root: Path, by: str, min_length: int, found: int, total: int) -> NoReturn:
    raise InvalidInputError(
        f"the event log at {root} has {found} {by} sequences of at least {min_length} "
        f"interactions (of {total} {by}s); an evaluation needs at least {MIN_SEQUENCES}"
    )


@dataclass(frozen=True)
class Split:
    """Leave-last-out: training sequences, and one (history, target) per sequence for
    validation and for test. Row i of every part belongs to sequence i."""

    train: Sequences
    valid_history: list[np.ndarray]
    valid_target: np.ndarray
    test_history: list[np.ndarray]
    test_target: np.ndarray
    valid_flags: list[np.ndarray] = field(default_factory=list)
    test_flags: list[np.ndarray] = field(default_factory=list)
    valid_times: list[np.ndarray] = field(default_factory=list)
    """Each validation history's times (seconds), when the sequences have times."""
    test_times: list[np.ndarray] = field(default_factory=list)
    keep_history: bool = False
    """Whether full ranking keeps a history's own items as candidates
    (`history_candidates` of the training sequences)."""

    @property
    def n_items(self) -> int:
        return self.train.n_items

    def without_test(self) -> Split:
        """The split a model may be fitted on: the test part is empty."""
        return replace(
            self,
            test_history=[],
            test_target=np.zeros(0, dtype=np.int64),
            test_flags=[],
            test_times=[],
        )


def leave_last_out(seqs: Sequences) -> Split:
    """Hold out each sequence's last item for test and the one before for validation.

    Raises:
        InvalidInputError: no sequences, or one shorter than 3.
    """
    if len(seqs) == 0:
        raise InvalidInputError("leave-last-out needs at least one sequence")
    short = [key for key, s in zip(seqs.keys, seqs.seqs, strict=True) if len(s) < 3]
    if short:
        raise InvalidInputError(
            f"leave-last-out needs sequences of at least 3 items; {len(short)} are shorter "
            f"(first: {short[0]!r})"
        )
    arrays = [np.array(s, dtype=np.int64) for s in seqs.seqs]
    for array in arrays:
        array.setflags(write=False)  # models share these; none may change them
    train = [s[:-2] for s in arrays]
    sessions = seqs.sessions or [np.zeros(len(s), dtype=np.int64) for s in arrays]
    flags = [session_flags(s) for s in sessions]  # len(seq) - 1: position j → j + 1
    times = [np.asarray(t, dtype=np.int64) for t in seqs.times]
    return Split(
        train=replace(
            seqs, seqs=train, sessions=[s[:-2] for s in sessions], times=[t[:-2] for t in times]
        ),
        valid_history=train,
        valid_target=np.array([s[-2] for s in arrays], dtype=np.int64),
        test_history=[s[:-1] for s in arrays],
        test_target=np.array([s[-1] for s in arrays], dtype=np.int64),
        valid_flags=[f[:-1] for f in flags],
        test_flags=flags,
        valid_times=[t[:-2] for t in times],
        test_times=[t[:-1] for t in times],
        keep_history=history_candidates(train),
    )


def session_start(flags: np.ndarray) -> int:
    """Where the target's session begins in a history with these flags: the history's
    length when the target opens a new session (its newest flag is 0)."""
    flags = np.asarray(flags)
    if len(flags) == 0 or flags[-1] == 0:
        return len(flags)
    breaks = np.flatnonzero(flags[:-1] == 0)
    return int(breaks[-1]) + 1 if len(breaks) else 0


# --- the protocol every model follows ---------------------------------------------------------------


@runtime_checkable
class SequenceRecommender(Protocol):
    """A next-item model evaluated here (baselines and the learned rankers alike)."""

    name: str

    def fit(self, split: Split, progress: Progress | None = None) -> None:
        """Train on `split.train`; the validation part may steer early stopping.
        `evaluate_all` passes `split.without_test()`."""
        ...

    def score(
        self, histories: list[np.ndarray], flags: list[np.ndarray] | None = None
    ) -> np.ndarray:
        """float32 [len(histories), n_items + 1] scores, higher is better; column 0 is
        ignored. `flags` are the histories' session flags (models may ignore them)."""
        ...


# --- metrics ---------------------------------------------------------------------------------------


def candidate_mask(
    histories: Sequence[np.ndarray], n_items: int, keep_history: bool = False
) -> np.ndarray:
    """bool [B, n_items + 1]: the candidates of full ranking, every item but padding and,
    unless `keep_history`, the history's items. The target plays no part."""
    mask = np.ones((len(histories), n_items + 1), dtype=bool)
    mask[:, 0] = False
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    if lengths.sum() and not keep_history:
        rows = np.repeat(np.arange(len(histories)), lengths)
        mask[rows, np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])] = False
    return mask


def expected_metrics(greater: np.ndarray, ties: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-row hit@k, NDCG@k and reciprocal rank of a target whose position is uniform on
    greater+1 .. greater+ties+1 (a random order among tied candidates)."""
    greater = np.asarray(greater, dtype=np.int64)
    width = np.asarray(ties, dtype=np.int64) + 1
    last = greater + width
    positions = np.arange(1, int(last.max(initial=0)) + 1, dtype=np.float64)
    harmonic = np.r_[0.0, np.cumsum(1.0 / positions)]
    gains = np.r_[0.0, np.cumsum(np.where(positions <= k, 1.0 / np.log2(positions + 1.0), 0.0))]
    return {
        "hit": np.clip(k - greater, 0, width) / width,
        "ndcg": (gains[last] - gains[greater]) / width,
        "rr": (harmonic[last] - harmonic[greater]) / width,
    }


def full_ranking(
    scores: np.ndarray,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    k: int = 10,
    keep_history: bool = False,
) -> dict[str, np.ndarray]:
    """Per-row Recall@k, NDCG@k and RR of each target among `candidate_mask`'s items (a
    target outside them scores 0 on each)."""
    targets = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(targets))
    candidates = candidate_mask(histories, scores.shape[1] - 1, keep_history)
    ranked = candidates[rows, targets]
    candidates[rows, targets] = False
    target_scores = scores[rows, targets][:, None]
    greater = ((scores > target_scores) & candidates).sum(axis=1)
    ties = ((scores == target_scores) & candidates).sum(axis=1)
    m = expected_metrics(greater, ties, k)
    return {
        f"recall@{k}": np.where(ranked, m["hit"], 0.0),
        f"ndcg@{k}": np.where(ranked, m["ndcg"], 0.0),
        "mrr": np.where(ranked, m["rr"], 0.0),
    }


def sample_negatives(
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    n_items: int,
    count: int = 100,
    seed: int = 0,
    batch_size: int = 512,
) -> np.ndarray:
    """int64 [B, count]: per row, `count` distinct items drawn uniformly from the items
    that are neither in the history nor the target; -1 pads rows with fewer available.

    The draw depends on the seed and the data only (not on `batch_size`)."""
    rng = np.random.default_rng(seed)
    out = np.full((len(targets), count), -1, dtype=np.int64)
    take = min(count, n_items)
    batch_size = _rows(batch_size, n_items)
    for start in range(0, len(targets), batch_size):
        stop = min(start + batch_size, len(targets))
        keys = rng.random((stop - start, n_items + 1))
        allowed = candidate_mask(histories[start:stop], n_items)
        allowed[np.arange(stop - start), targets[start:stop]] = False
        # Draw from all items, excluded ones given an infinite key. Uniform random keys:
        # the `take` smallest are a uniform sample without replacement of the allowed.
        keys[~allowed] = np.inf
        if take == 0:
            continue
        picked = np.argpartition(keys, take - 1, axis=1)[:, :take]
        valid = np.isfinite(np.take_along_axis(keys, picked, axis=1))
        out[start:stop, :take] = np.where(valid, picked, -1)
    return out


def sampled_ranking(
    scores: np.ndarray, targets: np.ndarray, negatives: np.ndarray, k: int = 10
) -> dict[str, np.ndarray]:
    """Per-row HR@k and NDCG@k of each target against its sampled negatives (-1 = none)."""
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets][:, None]
    valid = negatives >= 0
    negative_scores = np.take_along_axis(scores, np.maximum(negatives, 0), axis=1)
    greater = ((negative_scores > target_scores) & valid).sum(axis=1)
    ties = ((negative_scores == target_scores) & valid).sum(axis=1)
    m = expected_metrics(greater, ties, k)
    return {f"hr@{k}": m["hit"], f"ndcg@{k}": m["ndcg"]}


# --- evaluation ------------------------------------------------------------------------------------


def evaluate(
    model: SequenceRecommender,
    split: Split,
    k: int = 10,
    sampled_negatives: int = 100,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Metrics of a fitted `model` on the validation and test parts of `split`.

    Returns:
        ``{"model", "k", "valid": part, "test": part}`` where a part is
        ``{"sequences": n, "full": {"recall@k", "ndcg@k", "mrr"},
        "sampled": {"hr@k", "ndcg@k", "negatives"}}`` (means over sequences).
    """
    if k < 1:
        raise InvalidInputError(f"k must be at least 1, got {k}", field="k")
    if sampled_negatives < 1:
        raise InvalidInputError(
            f"sampled_negatives must be at least 1, got {sampled_negatives}",
            field="sampled_negatives",
        )
    result: dict[str, Any] = {"model": model.name, "k": k}
    reads_times = bool(getattr(model, "reads_times", False))
    for part, histories, flags, times, targets in (
        ("valid", split.valid_history, split.valid_flags, split.valid_times, split.valid_target),
        ("test", split.test_history, split.test_flags, split.test_times, split.test_target),
    ):
        result[part] = _evaluate_part(
            model, histories, flags or None, targets, split.n_items, k, sampled_negatives,
            seed, batch_size, times if reads_times else None, split.keep_history,
        )  # fmt: skip
    return result


def _evaluate_part(
    model: SequenceRecommender,
    histories: list[np.ndarray],
    flags: list[np.ndarray] | None,
    targets: np.ndarray,
    n_items: int,
    k: int,
    sampled_negatives: int,
    seed: int,
    batch_size: int,
    times: list[np.ndarray] | None = None,
    keep_history: bool = False,
) -> dict[str, Any]:
    """`times` (each history's, in seconds) go to models whose `reads_times` is true;
    `keep_history` is `full_ranking`'s."""
    if len(targets) == 0:
        raise InvalidInputError("the split has no sequences to evaluate on")
    negatives = sample_negatives(histories, targets, n_items, sampled_negatives, seed)
    full: dict[str, list[np.ndarray]] = {}
    sampled: dict[str, list[np.ndarray]] = {}
    batch_size = _rows(batch_size, n_items)
    for start in range(0, len(targets), batch_size):
        stop = min(start + batch_size, len(targets))
        batch = histories[start:stop]
        part_flags = None if flags is None else flags[start:stop]
        if times:
            scores = np.asarray(model.score(batch, part_flags, times=times[start:stop]))  # type: ignore[call-arg]
        else:
            scores = np.asarray(model.score(batch, part_flags))
        if scores.shape != (stop - start, n_items + 1):
            raise InvalidInputError(
                f"model {model.name!r} returned scores of shape {scores.shape} for "
                f"{stop - start} histories; expected ({stop - start}, {n_items + 1})"
            )
        if np.isnan(scores).any():
            raise InvalidInputError(f"model {model.name!r} returned NaN scores")
        ranked = full_ranking(scores, batch, targets[start:stop], k, keep_history)
        for name, values in ranked.items():
            full.setdefault(name, []).append(values)
        for name, values in sampled_ranking(
            scores, targets[start:stop], negatives[start:stop], k
        ).items():
            sampled.setdefault(name, []).append(values)
    return {
        "sequences": len(targets),
        "full": {name: float(np.concatenate(v).mean()) for name, v in full.items()},
        "sampled": {
            **{name: float(np.concatenate(v).mean()) for name, v in sampled.items()},
            "negatives": sampled_negatives,
        },
    }


def _rows(batch_size: int, n_items: int) -> int:
    return max(1, min(batch_size, BATCH_CELLS // (n_items + 1)))


def evaluate_all(
    models: Sequence[SequenceRecommender],
    split: Split,
    k: int = 10,
    sampled_negatives: int = 100,
    seed: int = 0,
    fit: bool = True,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Fit each model on `split.without_test()` (unless `fit` is False), then `evaluate` it.

    Each result also carries `fit_s` and `eval_s` (wall seconds).
    """
    say = progress or (lambda _: None)
    results = []
    fit_split = split.without_test()
    for model in models:
        started = time.perf_counter()
        if fit:
            say(f"[evaluate] fitting {model.name} ...")
            model.fit(fit_split, progress)
        fitted = time.perf_counter()
        say(f"[evaluate] scoring {model.name} ...")
        result = evaluate(model, split, k, sampled_negatives, seed)
        result["fit_s"] = round(fitted - started, 2)
        result["eval_s"] = round(time.perf_counter() - fitted, 2)
        say(
            f"[evaluate] {model.name}: test Recall@{k} {result['test']['full'][f'recall@{k}']:.4f}"
            f", NDCG@{k} {result['test']['full'][f'ndcg@{k}']:.4f}"
        )
        results.append(result)
    return results


# --- baselines -------------------------------------------------------------------------------------


def _counts(split: Split) -> np.ndarray:
    seqs = split.train.seqs
    flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=split.n_items + 1).astype(np.float32)


class MostPopular:
    """Every history gets the same scores: each item's number of training interactions."""

    name = "most_popular"

    def __init__(self) -> None:
        self.popularity: np.ndarray | None = None

    def fit(self, split: Split, progress: Progress | None = None) -> None:
        self.popularity = _counts(split)

    def score(
        self, histories: list[np.ndarray], flags: list[np.ndarray] | None = None
    ) -> np.ndarray:
        if self.popularity is None:
            raise InvalidInputError(f"{self.name} is not fitted")
        return np.broadcast_to(self.popularity, (len(histories), len(self.popularity))).copy()


class AlsBaseline:
    """Implicit ALS (Spark ML) on the training sequences, scored by folding a history in.

    Each training sequence is a row; its confidence for an item is 1 + alpha * (times
    the item occurs in it). A history's vector is the least-squares solution ALS
    itself computes for a row with that history given the item factors (ALS-WR
    regularisation, lambda * number of distinct items), so a training row's
    history reproduces its Spark user factor, and unseen histories (validation and
    test, sessions) work the same way. A history with no item known to ALS scores
    like `MostPopular`; items without factors (never in training) rank last.
    """

    name = "als"

    def __init__(self, spark: SparkSession, config: AlsConfig | None = None) -> None:
        self.spark = spark
        self.config = config or AlsConfig()
        self.item_factors: np.ndarray | None = None
        self.user_factors: np.ndarray | None = None
        self.known: np.ndarray | None = None
        self.gram: np.ndarray | None = None
        self.popularity: np.ndarray | None = None

    def fit(self, split: Split, progress: Progress | None = None) -> None:
        say = progress or (lambda _: None)
        rows, items, counts = [], [], []
        for row, seq in enumerate(split.train.seqs):
            unique, count = np.unique(seq, return_counts=True)
            rows.append(np.full(len(unique), row, dtype=np.int32))
            items.append(unique.astype(np.int32))
            counts.append(count.astype(np.float32))
        if not rows or sum(len(r) for r in rows) == 0:
            raise InvalidInputError("ALS needs training interactions; the split has none")
        ratings = pa.table(
            {
                "user": np.concatenate(rows),
                "item": np.concatenate(items),
                "rating": np.concatenate(counts),
            }
        )
        cfg = self.config
        say(
            f"[als] rank {cfg.rank}, {cfg.max_iter} iterations over {ratings.num_rows} pairs "
            f"({len(split.train)} rows x {split.n_items} items)"
        )
        model = als_estimator(self.spark, cfg).fit(self.spark.createDataFrame(ratings))
        self.item_factors, self.known = _collect(model.itemFactors, split.n_items + 1, cfg.rank)
        self.user_factors, _ = _collect(model.userFactors, len(split.train), cfg.rank)
        y = self.item_factors.astype(np.float64)
        self.gram = y.T @ y
        self.popularity = _counts(split)

    def history_vector(self, history: np.ndarray) -> np.ndarray | None:
        """The ALS row vector of `history`, or None when none of its items has factors."""
        if self.item_factors is None or self.known is None or self.gram is None:
            raise InvalidInputError(f"{self.name} is not fitted")
        history = np.asarray(history, dtype=np.int64)
        history = history[self.known[history]]
        if len(history) == 0:
            return None
        items, counts = np.unique(history, return_counts=True)
        y = self.item_factors[items].astype(np.float64)
        c = self.config.alpha * counts.astype(np.float64)
        a = self.gram + (y.T * c) @ y + self.config.reg_param * len(items) * np.eye(len(self.gram))
        b = ((1.0 + c)[:, None] * y).sum(axis=0)
        return np.asarray(np.linalg.solve(a, b))

    def score(
        self, histories: list[np.ndarray], flags: list[np.ndarray] | None = None
    ) -> np.ndarray:
        if self.item_factors is None or self.known is None or self.popularity is None:
            raise InvalidInputError(f"{self.name} is not fitted")
        out = np.empty((len(histories), len(self.item_factors)), dtype=np.float32)
        for i, history in enumerate(histories):
            vector = self.history_vector(history)
            if vector is None:
                out[i] = self.popularity
                continue
            out[i] = self.item_factors @ vector.astype(np.float32)
            out[i, ~self.known] = -np.inf
        return out


class ItemKNN:
    """Session-style item-to-item neighbours: score = similarity to the last items.

    Two items co-occur when they are at most `window` positions apart in a training
    sequence; similarity is the co-occurrence count over sqrt(count(a) * count(b)) +
    `shrink` (cosine, shrunk towards 0 for rarely seen pairs); each item keeps its
    `neighbours` most similar. A history scores an item by the similarity to its last
    `recent` items, weighted 1, 1/2, 1/3, ... from the newest. Popularity, scaled to
    a thousandth of the least similarity, breaks ties and orders the items no recent
    item is similar to. The defaults were set before any result was seen (not tuned).
    """

    name = "item_knn"

    def __init__(
        self, window: int = 3, neighbours: int = 100, recent: int = 3, shrink: float = 5.0
    ) -> None:
        for attr, value in (("window", window), ("neighbours", neighbours), ("recent", recent)):
            if value < 1:
                raise InvalidInputError(f"{attr} must be at least 1, got {value}", field=attr)
        if shrink < 0:
            raise InvalidInputError(f"shrink must not be negative, got {shrink}", field="shrink")
        self.window, self.neighbours, self.recent, self.shrink = window, neighbours, recent, shrink
        self.indptr: np.ndarray | None = None
        self.indices = np.zeros(0, dtype=np.int64)
        self.weights = np.zeros(0, dtype=np.float32)
        self.prior = np.zeros(0, dtype=np.float32)

    def fit(self, split: Split, progress: Progress | None = None) -> None:
        size = split.n_items + 1
        seqs = [s for s in split.train.seqs if len(s)]
        flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        owner = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
        count = np.bincount(flat, minlength=size).astype(np.float64)
        codes = []
        for d in range(1, self.window + 1):
            a, b = flat[:-d], flat[d:]
            keep = (owner[:-d] == owner[d:]) & (a != b)
            codes += [a[keep] * size + b[keep], b[keep] * size + a[keep]]
        pairs, together = np.unique(
            np.concatenate([np.zeros(0, dtype=np.int64), *codes]), return_counts=True
        )
        src, dst = pairs // size, pairs % size
        sim = together / (np.sqrt(count[src] * count[dst]) + self.shrink)
        order = np.lexsort((-sim, src))
        src, dst, sim = src[order], dst[order], sim[order]
        starts = np.searchsorted(src, np.arange(size + 1))
        rank = np.arange(len(src)) - starts[src]
        top = rank < self.neighbours
        src, dst, sim = src[top], dst[top], sim[top]
        self.indptr = np.searchsorted(src, np.arange(size + 1))
        self.indices, self.weights = dst, sim.astype(np.float32)
        # A thousandth of the least a similar item can get: it orders ties, barely more.
        floor = 1e-3 * float(sim.min()) / self.recent if len(sim) else 1.0
        self.prior = (floor * count / max(count.max(), 1.0)).astype(np.float32)
        if progress:
            progress(f"[item_knn] {len(src)} neighbour links over {split.n_items} items")

    def score(
        self, histories: list[np.ndarray], flags: list[np.ndarray] | None = None
    ) -> np.ndarray:
        if self.indptr is None:
            raise InvalidInputError(f"{self.name} is not fitted")
        out = np.tile(self.prior, (len(histories), 1))
        for row, history in enumerate(histories):
            for back, item in enumerate(np.asarray(history)[::-1][: self.recent]):
                lo, hi = self.indptr[item], self.indptr[item + 1]
                out[row, self.indices[lo:hi]] += self.weights[lo:hi] / (back + 1)
        return out


class HistoryOnly:
    """A fitted model scored without the session part of each history (see the module
    docstring): the ablation that shows what the current session is worth.

    Its `fit` does nothing: it scores with the wrapped model's weights, so it goes
    after that model in `evaluate_all` (or is given a fitted one)."""

    def __init__(self, model: SequenceRecommender) -> None:
        self.model = model
        self.name = f"{model.name}_history_only"

    def fit(self, split: Split, progress: Progress | None = None) -> None:
        return None

    def score(
        self, histories: list[np.ndarray], flags: list[np.ndarray] | None = None
    ) -> np.ndarray:
        if flags is None:
            raise InvalidInputError(
                f"{self.name} needs the histories' session flags to cut the session part off",
                field="flags",
            )
        starts = [session_start(f) for f in flags]
        return self.model.score(
            [h[:s] for h, s in zip(histories, starts, strict=True)],
            [f[:s] for f, s in zip(flags, starts, strict=True)],
        )


def _collect(factors: Any, size: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Spark ALS factors as float32 [size, rank] by id, and which ids have a row."""
    table = factors.toArrow()
    ids = table.column("id").to_numpy()
    flat = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.zeros((size, rank), dtype=np.float32)
    vectors[ids] = flat.reshape(len(ids), rank)
    known = np.zeros(size, dtype=bool)
    known[ids] = True
    return vectors, known


# --- reports ---------------------------------------------------------------------------------------


def describe(split: Split) -> dict[str, Any]:
    """Counts of a split for a report."""
    lengths = np.array([len(s) + 2 for s in split.train.seqs])
    return {
        "by": split.train.by,
        "sequences": len(split.train),
        "items": split.n_items,
        "interactions": int(lengths.sum()),
        "mean_length": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
        "median_length": float(np.median(lengths)) if len(lengths) else 0.0,
        "valid_repeats": _repeat_share(split.valid_history, split.valid_target),
        "test_repeats": _repeat_share(split.test_history, split.test_target),
        "test_unseen_in_training": _unseen_share(split, split.test_target),
        "train_revisit_share": round(revisit_share(split.train.seqs), 4),
        "history_candidates": split.keep_history,
        "test_with_session_part": round(
            float(np.mean([session_start(f) < len(f) for f in split.test_flags]))
            if split.test_flags
            else 0.0,
            4,
        ),
        "load": dict(split.train.stats),
    }


def _repeat_share(histories: Sequence[np.ndarray], targets: np.ndarray) -> float:
    """The share of targets that already occur in their history (repeat interactions)."""
    if len(targets) == 0:
        return 0.0
    hits = [bool(np.any(h == t)) for h, t in zip(histories, targets, strict=True)]
    return round(float(np.mean(hits)), 4)


def _unseen_share(split: Split, targets: np.ndarray) -> float:
    """The share of targets no training sequence contains (cold items for most models)."""
    if len(targets) == 0:
        return 0.0
    return round(float((_counts(split)[targets] == 0).mean()), 4)


def protocol(split: Split, k: int = 10, sampled_negatives: int = 100, seed: int = 0) -> str:
    """One paragraph that states how the numbers were made."""
    return (
        f"Leave-last-out per {split.train.by}: the last item of each sequence is the test "
        "target, the one before the validation target, the rest trains the models (test "
        "targets never reach training). Full ranking: the target against "
        + (
            "every catalogue item, the history's own included (the training sequences "
            f"revisit items: {revisit_share(split.train.seqs):.1%} of their positions repeat "
            "an earlier item)"
            if split.keep_history
            else "every catalogue item except those already in the history (a target among "
            "them counts as a miss)"
        )
        + f"; Recall@{k}, NDCG@{k}, MRR. Sampled (as in SASRec, Kang & McAuley 2018): "
        f"the target against {sampled_negatives} items drawn uniformly without replacement "
        f"from items not in the history (seed {seed}, the same draw for every model); "
        f"HR@{k}, NDCG@{k}. Ties count at their expected value under a random order."
    )


def format_table(results: Sequence[dict[str, Any]], part: str = "test") -> str:
    """A Markdown table of one part ("test" or "valid") of `evaluate_all`'s results."""
    if not results:
        return "(no models)"
    k = results[0]["k"]
    header = (
        f"| model | Recall@{k} | NDCG@{k} | MRR | HR@{k} (sampled) | NDCG@{k} (sampled) | fit s |"
    )
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        full, sampled = r[part]["full"], r[part]["sampled"]
        fit_s = r.get("fit_s")
        lines.append(
            f"| {r['model']} | {full[f'recall@{k}']:.4f} | {full[f'ndcg@{k}']:.4f} "
            f"| {full['mrr']:.4f} | {sampled[f'hr@{k}']:.4f} | {sampled[f'ndcg@{k}']:.4f} "
            f"| {'' if fit_s is None else f'{fit_s:.1f}'} |"
        )
    return "\n".join(lines)


def write_report(
    results: Sequence[dict[str, Any]], out_dir: Path, title: str, meta: dict[str, Any]
) -> list[Path]:
    """Write `evaluation.json` and `evaluation.md` into `out_dir`; returns their paths.

    `meta` is stored as it is; its "protocol", "dataset" and "counts" entries (when
    present) are also written out in the Markdown.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    doc = {"title": title, "created_at": created, "meta": meta, "results": list(results)}
    json_path = out / "evaluation.json"
    json_path.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    lines = [f"# {title}", ""]
    if "dataset" in meta:
        lines += [f"Data: {meta['dataset']}.", ""]
    counts = meta.get("counts")
    if isinstance(counts, dict):
        lines += [
            f"Counts: {counts.get('sequences')} {counts.get('by')} sequences, "
            f"{counts.get('items')} items, {counts.get('interactions')} interactions "
            f"(mean length {counts.get('mean_length')}); test targets already in their "
            f"history: {counts.get('test_repeats', 0.0):.1%}, never in training: "
            f"{counts.get('test_unseen_in_training', 0.0):.1%}.",
            "",
        ]
    if "protocol" in meta:
        lines += [f"Protocol: {meta['protocol']}", ""]
    if results:
        lines += [
            f"## Test (last item, {results[0]['test']['sequences']} sequences)",
            "",
            format_table(results, "test"),
            "",
            f"## Validation (the item before, {results[0]['valid']['sequences']} sequences)",
            "",
            format_table(results, "valid"),
            "",
            "Sampled columns use the sampled protocol and are not comparable with full ranking.",
            "",
        ]
    lines.append(f"Written {created}.")
    md_path = out / "evaluation.md"
    md_path.write_text("\n".join(lines) + "\n")
    return [json_path, md_path]


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def run_evaluation(
    events_dir: Path,
    out_dir: Path,
    models: Sequence[SequenceRecommender],
    dataset: str | None = None,
    by: str = "auto",
    min_length: int = 3,
    k: int = 10,
    sampled_negatives: int = 100,
    seed: int = 0,
    progress: Progress | None = None,
    catalog: Path | None = None,
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Load, split, fit and evaluate `models`, and write the report (what `inkling evaluate`
    runs). Returns the results and the report's paths."""
    say = progress or (lambda _: None)
    split = leave_last_out(
        load_sequences(events_dir, by=by, min_length=min_length, catalog=catalog)
    )
    counts = describe(split)
    say(
        f"[evaluate] {counts['sequences']} {counts['by']} sequences, {counts['items']} items, "
        f"{counts['interactions']} interactions"
    )
    results = evaluate_all(models, split, k, sampled_negatives, seed, progress=progress)
    meta = {
        "dataset": dataset or str(events_dir),
        "events_dir": str(events_dir),
        "counts": counts,
        "protocol": protocol(split, k, sampled_negatives, seed),
        "split": "leave-last-out",
        "k": k,
        "sampled_negatives": sampled_negatives,
        "seed": seed,
        "min_length": min_length,
    }
    return results, write_report(results, out_dir, "Offline evaluation", meta)


def chance_level(split: Split, k: int = 10, sampled_negatives: int = 100) -> dict[str, float]:
    """Test Recall@k (full) and HR@k (sampled) of a random ranking: a floor for every model."""
    targets = np.asarray(split.test_target, dtype=np.int64)
    mask = candidate_mask(split.test_history, split.n_items, split.keep_history)
    ranked = mask[np.arange(len(targets)), targets]
    candidates = np.maximum(mask.sum(axis=1), 1)
    return {
        f"recall@{k}": float(np.where(ranked, np.minimum(k / candidates, 1.0), 0.0).mean()),
        f"hr@{k}": min(k / (sampled_negatives + 1), 1.0),
    }
