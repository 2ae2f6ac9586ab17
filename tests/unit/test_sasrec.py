"""SASRec: learns a deterministic next-item task, is causal, padding-invariant, persists."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inkling.errors import InvalidInputError
from inkling.models import SasRecConfig, SasRecRecommender, ranks_of_targets
from inkling.models.sasrec import (
    REPEAT_SCALE,
    ItemAttributes,
    SasRecNet,
    repeat_buckets,
    session_flags,
)

N_ITEMS = 50
CYCLE = 25


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> None:
    torch.set_num_threads(1)


@dataclass
class Train:
    seqs: list[np.ndarray]
    item_ids: list[str]
    sessions: list[np.ndarray] = field(default_factory=list)
    attributes: ItemAttributes | None = None
    times: list[np.ndarray] = field(default_factory=list)


@dataclass
class Split:
    """The shape of ``batch.evaluation``'s split, without importing it."""

    train: Train
    valid_history: list[np.ndarray]
    valid_target: np.ndarray
    test_history: list[np.ndarray] = field(default_factory=list)
    test_target: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    valid_flags: list[np.ndarray] = field(default_factory=list)
    test_flags: list[np.ndarray] = field(default_factory=list)
    valid_times: list[np.ndarray] = field(default_factory=list)
    test_times: list[np.ndarray] = field(default_factory=list)


def next_in_cycle(item: int) -> int:
    """Items 1..50 form two cycles of 25 (1→2→…→25→1, 26→…→50→26)."""
    base = (item - 1) // CYCLE * CYCLE
    return base + (item - base) % CYCLE + 1


def cycle_split(n_seqs: int = 300, length: int = 20, seed: int = 0) -> Split:
    """Leave-last-out on sequences that walk a cycle from a random start."""
    rng = np.random.default_rng(seed)
    full = []
    for _ in range(n_seqs):
        seq = [int(rng.integers(1, N_ITEMS + 1))]
        while len(seq) < length:
            seq.append(next_in_cycle(seq[-1]))
        full.append(np.array(seq, dtype=np.int64))
    ids = ["<pad>", *(f"item{i}" for i in range(1, N_ITEMS + 1))]
    return Split(
        train=Train(seqs=[s[:-2] for s in full], item_ids=ids),
        valid_history=[s[:-2] for s in full],
        valid_target=np.array([s[-2] for s in full]),
        test_history=[s[:-1] for s in full],
        test_target=np.array([s[-1] for s in full]),
    )


SMALL = SasRecConfig(
    max_len=20, hidden=32, n_heads=2, batch_size=32, max_epochs=30, eval_every=3, patience=2
)


@pytest.fixture(scope="module")
def split() -> Split:
    return cycle_split()


@pytest.fixture(scope="module")
def trained(split: Split) -> SasRecRecommender:
    model = SasRecRecommender(SMALL)
    lines: list[str] = []
    model.fit(split, progress=lines.append)
    assert lines and "windows" in lines[0] and "stopped" in lines[-1]
    assert any("NDCG@10" in line for line in lines)
    return model


def full_ranking_metrics(scores: np.ndarray, split: Split) -> tuple[float, float, float]:
    """Test top-1, Recall@10 and NDCG@10 under full ranking minus the history."""
    ranks = ranks_of_targets(scores, split.test_history, split.test_target)
    ndcg = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float((ranks == 0).mean()), float((ranks < 10).mean()), float(ndcg.mean())


def test_learns_the_cycles_far_above_popularity(trained: SasRecRecommender, split: Split) -> None:
    # Histories (18 items) never cover a cycle (25), so excluding them leaves the
    # target among ~32 items: only the exact successor earns NDCG@10 near 1.
    assert trained.history and trained.best_epoch > 0
    assert max(h["valid_ndcg10"] for h in trained.history) > 0.95
    top1, recall, ndcg = full_ranking_metrics(trained.score(split.test_history), split)
    counts = np.bincount(np.concatenate(split.train.seqs), minlength=N_ITEMS + 1)
    popularity = np.tile(counts.astype(np.float32), (len(split.test_target), 1))
    assert top1 > 0.9 and recall > 0.95 and ndcg > 0.95
    # Popularity: ~0.16 top-1, ~0.54 Recall@10 (one cycle happens to be more popular).
    _, pop_recall, pop_ndcg = full_ranking_metrics(popularity, split)
    assert recall > pop_recall + 0.3 and ndcg > pop_ndcg + 0.5
    scores = trained.score(split.test_history[:3])
    assert scores.dtype == np.float32 and scores.shape == (3, N_ITEMS + 1)
    assert np.isneginf(scores[:, 0]).all()


def test_fit_never_reads_the_test_part(split: Split) -> None:
    class NoTest:
        train = split.train
        valid_history = split.valid_history
        valid_target = split.valid_target
        valid_flags = split.valid_flags

        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"fit read {name}")

    cfg = SasRecConfig(max_len=8, hidden=16, max_epochs=2, eval_every=1)
    SasRecRecommender(cfg).fit(NoTest())


def test_training_is_reproducible(split: Split) -> None:
    cfg = SasRecConfig(max_len=8, hidden=16, max_epochs=2, eval_every=1, seed=3)
    a, b = SasRecRecommender(cfg), SasRecRecommender(cfg)
    a.fit(split)
    b.fit(split)
    assert a.epoch_losses == b.epoch_losses
    np.testing.assert_array_equal(a.score(split.test_history), b.score(split.test_history))


def test_causal(trained: SasRecRecommender) -> None:
    net = trained.net
    assert net is not None
    seq = torch.tensor([[0, 0, 3, 4, 5, 1, 2, 3]])
    changed = seq.clone()
    changed[0, 6] = 40
    flags = torch.ones_like(seq)
    with torch.no_grad():
        a, b = net.encode(seq, flags), net.encode(changed, flags)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_left_padding_does_not_change_scores(trained: SasRecRecommender) -> None:
    net = trained.net
    assert net is not None
    items = [7, 8, 9, 10, 6]
    with torch.no_grad():
        scores = [
            net(torch.tensor([[0] * pad + items]), torch.tensor([[1] * (pad + len(items))]))
            for pad in (0, 3, SMALL.max_len - len(items))
        ]
    for other in scores[1:]:
        torch.testing.assert_close(other[:, 1:], scores[0][:, 1:], atol=1e-5, rtol=0)
    # Batched with a longer row, a short history scores as it does alone.
    batch = trained.score([np.array(items), np.arange(1, 16)])
    np.testing.assert_allclose(batch[0], trained.score([np.array(items)])[0], atol=1e-5)


def test_long_history_keeps_the_newest(trained: SasRecRecommender) -> None:
    long = np.concatenate([np.arange(11, 41), np.array([1, 2, 3])])
    np.testing.assert_array_equal(trained.score([long]), trained.score([long[-SMALL.max_len :]]))


def test_empty_history_gets_popularity_prior(trained: SasRecRecommender) -> None:
    scores = trained.score([np.zeros(0, dtype=np.int64)])
    assert np.isfinite(scores[0, 1:]).all()
    assert trained.net is not None
    np.testing.assert_allclose(scores[0, 1:], trained.net.prior[1:].numpy())


def test_rejects_out_of_range_items(trained: SasRecRecommender) -> None:
    with pytest.raises(InvalidInputError):
        trained.score([np.array([1, N_ITEMS + 1])])


def test_save_load_round_trip(trained: SasRecRecommender, split: Split, tmp_path: Path) -> None:
    trained.save(tmp_path / "sasrec")
    loaded = SasRecRecommender.load(tmp_path / "sasrec")
    assert loaded.name == trained.name and loaded.item_ids == trained.item_ids
    assert loaded.config == trained.config and loaded.history == trained.history
    np.testing.assert_array_equal(
        loaded.score(split.test_history), trained.score(split.test_history)
    )


def test_scripted_equals_eager(trained: SasRecRecommender, split: Split, tmp_path: Path) -> None:
    net = trained.net
    assert net is not None
    module = trained.scripted()
    module.save(str(tmp_path / "sasrec.ts"))
    reloaded = torch.jit.load(str(tmp_path / "sasrec.ts"))
    seqs = torch.tensor([[0, 0, 0, 1, 2], [4, 5, 1, 2, 3], [0, 0, 0, 0, 0]])
    flags = torch.tensor([[0, 0, 0, 1, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        eager = net(seqs, flags)
        torch.testing.assert_close(module(seqs, flags), eager, atol=1e-5, rtol=0)
        torch.testing.assert_close(reloaded(seqs, flags), eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("loss", "layers", "described"),
    [
        ("uniform", {}, "sampled softmax (20 uniform negatives)"),
        ("logq", {"ffn": "swiglu"}, "logQ-corrected softmax (in-batch + 20 sampled"),
        ("gbce", {"gated_residual": True}, "gBCE (20 uniform negatives, t=0.75"),
        ("full", {"norm": "post"}, "full softmax"),
        ("full", {"repeat": True}, "full softmax"),
        ("logq", {"repeat": True}, "logQ-corrected softmax (in-batch + 20 sampled"),
        ("gbce", {"repeat": True}, "gBCE (20 uniform negatives, t=0.75"),
    ],
)
def test_each_loss_and_layer_trains_and_exports_to_onnx_equal_to_eager(
    split: Split, tmp_path: Path, loss: str, layers: dict[str, object], described: str
) -> None:
    from inkling.models.inference import (
        TOLERANCE,
        build_form,
        largest_difference,
        onnx_session_form,
        random_inputs,
        write_checked_onnx,
    )

    cfg = SasRecConfig(
        max_len=20, hidden=32, batch_size=32, max_epochs=12, eval_every=4, patience=2,
        loss=loss, n_negatives=20, **layers,  # type: ignore[arg-type]
    )  # fmt: skip
    model = SasRecRecommender(cfg)
    lines: list[str] = []
    model.fit(split, progress=lines.append)
    assert f"loss {described}" in lines[0]
    assert max(h["valid_recall10"] for h in model.history) > 0.8
    assert len(model.epoch_seconds) == len(model.epoch_examples) == len(model.epoch_losses)
    assert all(n > 0 for n in model.epoch_examples)
    path, message = write_checked_onnx(model, tmp_path)
    assert path is not None, message
    inputs = random_inputs(model, count=2 * (cfg.max_len + 1))
    eager = build_form(model, "eager")
    assert largest_difference(eager, onnx_session_form(path), inputs) < TOLERANCE
    reloaded = SasRecRecommender.load(model.save(tmp_path / "saved"))
    assert reloaded.config.loss == loss and reloaded.epoch_examples == model.epoch_examples
    assert largest_difference(eager, build_form(reloaded, "eager"), inputs) == 0.0


def test_auto_loss_switches_at_the_configured_catalogue_size() -> None:
    cfg = SasRecConfig(full_softmax_max_items=100)
    assert cfg.resolved_loss(100) == "full" and cfg.resolved_loss(101) == "logq"
    assert SasRecConfig(loss="gbce").resolved_loss(10**6) == "gbce"
    for bad in ({"loss": "bpr"}, {"ffn": "gelu"}, {"norm": "sandwich"}, {"gbce_t": 1.5}):
        with pytest.raises(InvalidInputError, match=next(iter(bad))):
            SasRecConfig(**bad)  # type: ignore[arg-type]


def test_weights_saved_before_the_ffn_rename_still_load(
    trained: SasRecRecommender, tmp_path: Path
) -> None:
    directory = trained.save(tmp_path / "old")
    state = torch.load(directory / "model.pt", weights_only=True)
    old = {
        k.replace(".ffn.inner.", ".ffn.0.").replace(".ffn.outer.", ".ffn.3."): v
        for k, v in state.items()
    }
    assert any(".ffn.0." in k for k in old)
    torch.save(old, directory / "model.pt")
    loaded = SasRecRecommender.load(directory)
    history = [np.array([1, 2, 3])]
    np.testing.assert_array_equal(loaded.score(history), trained.score(history))


@pytest.mark.parametrize(
    ("missing", "settings", "absent"),
    [
        ("repeat", {"repeat": False}, "repeat_bias"),
        ("repeat_context", {"repeat": True, "repeat_context": False}, "repeat_gate"),
    ],
)
def test_a_model_saved_before_a_repeat_setting_loads_without_it(
    split: Split, tmp_path: Path, missing: str, settings: dict[str, bool], absent: str
) -> None:
    import json

    model = SasRecRecommender(replace(SMALL, max_epochs=1, **settings))
    model.fit(split)
    directory = model.save(tmp_path / "old")
    meta = json.loads((directory / "config.json").read_text())
    del meta["config"][missing]
    (directory / "config.json").write_text(json.dumps(meta))
    loaded = SasRecRecommender.load(directory)
    assert {f: getattr(loaded.config, f) for f in settings} == settings
    assert loaded.net is not None and getattr(loaded.net, absent) is None
    np.testing.assert_array_equal(loaded.score(split.test_history), model.score(split.test_history))


def test_the_loader_thread_stops_when_training_stops_early(split: Split) -> None:
    import threading

    from inkling.models.sasrec import training_batches, training_windows

    windows, flags = training_windows(split.train.seqs, None, 20, True)
    cfg = SasRecConfig(batch_size=8, prefetch=2)
    order = np.arange(len(windows))
    eager = list(
        training_batches(windows, flags, order, SasRecConfig(batch_size=8, prefetch=0), "cpu")
    )
    batches = training_batches(windows, flags, order, cfg, torch.device("cpu"))
    first = next(batches)
    for a, b in zip(first, eager[0], strict=True):
        torch.testing.assert_close(a, b)
    batches.close()  # what an early stop (or an exception) does
    assert not any(t.name == "sasrec-loader" for t in threading.enumerate())
    threaded = list(training_batches(windows, flags, order, cfg, torch.device("cpu")))
    assert len(threaded) == len(eager) == -(-len(windows) // 8)
    for got, want in zip(threaded, eager, strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


def test_plot_curves_writes_png(trained: SasRecRecommender, tmp_path: Path) -> None:
    path = trained.plot_curves(tmp_path / "curves" / "sasrec.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ranks_exclude_the_history_or_keep_it_but_never_look_at_the_target() -> None:
    scores = np.array([[0.0, 5.0, 4.0, 3.0, 2.0]], dtype=np.float32)
    # Item 1 (best) is in the history and excluded; target 3 ranks behind 2 only.
    assert ranks_of_targets(scores, [np.array([1])], np.array([3])).tolist() == [1]
    # A target in the excluded history is a miss (rank n), not a free candidate.
    assert ranks_of_targets(scores, [np.array([1, 3])], np.array([3])).tolist() == [4]
    # Keeping the history, the seen target competes with everything: 1 and 2 above it.
    kept = ranks_of_targets(scores, [np.array([1, 3])], np.array([3]), keep_history=True)
    assert kept.tolist() == [2]
    # Ties count against the target: a constant scorer ranks it last.
    flat = np.zeros((1, 5), dtype=np.float32)
    assert ranks_of_targets(flat, [np.array([], dtype=np.int64)], np.array([2])).tolist() == [3]


def test_config_validation_and_names() -> None:
    with pytest.raises(InvalidInputError):
        SasRecConfig(hidden=30, n_heads=4)
    with pytest.raises(InvalidInputError):
        SasRecConfig(max_len=0)
    assert SasRecRecommender().name == "sasrec"
    assert SasRecRecommender(name="ranker").name == "ranker"
    assert isinstance(SasRecNet(3, SasRecConfig(hidden=8)), torch.nn.Module)


OPENER = N_ITEMS  # every session opens with this item; inside a session items walk cycle 1..25


def session_split(n_seqs: int = 400, seed: int = 1) -> Split:
    """Sequences of sessions (2 to 6 items): each opens with OPENER, then walks the cycle
    from a random item. Whether the next item is OPENER or the successor of the last
    one is known only from the session boundary, which the flags carry."""
    rng = np.random.default_rng(seed)
    seqs, sessions = [], []
    for _ in range(n_seqs):
        items: list[int] = []
        codes: list[int] = []
        for session in range(6):
            items.append(OPENER)
            items.append(int(rng.integers(1, CYCLE + 1)))
            for _ in range(int(rng.integers(0, 5))):
                items.append(next_in_cycle(items[-1]))
            codes += [session] * (len(items) - len(codes))
        seqs.append(np.array(items, dtype=np.int64))
        sessions.append(np.array(codes, dtype=np.int64))
    flags = [session_flags(s) for s in sessions]
    ids = ["<pad>", *(f"item{i}" for i in range(1, N_ITEMS + 1))]
    return Split(
        train=Train([s[:-2] for s in seqs], ids, [s[:-2] for s in sessions]),
        valid_history=[s[:-2] for s in seqs],
        valid_target=np.array([s[-2] for s in seqs]),
        test_history=[s[:-1] for s in seqs],
        test_target=np.array([s[-1] for s in seqs]),
        valid_flags=[f[:-1] for f in flags],
        test_flags=flags,
    )


def test_session_flags_tell_a_continuation_from_a_new_session() -> None:
    split = session_split()
    # Test targets that continue a session are the successor of the last item; a
    # target opening a session is OPENER. Only the flags tell which is due.
    cfg = SasRecConfig(max_len=20, hidden=32, batch_size=32, max_epochs=15, eval_every=5)
    with_flags = SasRecRecommender(cfg)
    with_flags.fit(split)
    without = SasRecRecommender(SasRecConfig(**{**cfg.__dict__, "session_flags": False}))
    without.fit(split)

    # Continuations: test rows whose history does not end on OPENER (the item after
    # OPENER is random). Openers: the same histories cut where their last session
    # began, so the newest flag is 0 and the item due is OPENER.
    rows = [i for i, h in enumerate(split.test_history) if h[-1] != OPENER]
    starts = [len(f) - 1 - int(np.flatnonzero(f[::-1] == 0)[0]) for f in split.test_flags]
    cases = {
        "continue": (
            [split.test_history[i] for i in rows],
            [split.test_flags[i] for i in rows],
            split.test_target[rows],
        ),
        "open": (
            [h[: s + 1] for h, s in zip(split.test_history, starts, strict=True)],
            [f[: s + 1] for f, s in zip(split.test_flags, starts, strict=True)],
            np.full(len(starts), OPENER),
        ),
    }

    def top1(model: SasRecRecommender, case: str) -> float:
        histories, flags, targets = cases[case]
        return float((model.score(histories, flags).argmax(axis=1) == targets).mean())

    assert len(rows) > 200
    # (Continuations reach 0.88-1.0 across seeds in 15 epochs; openers 1.0.)
    assert top1(with_flags, "continue") > 0.85 and top1(with_flags, "open") > 0.95
    # Without flags the model cannot tell the two apart: it is wrong on one or the other.
    assert top1(without, "continue") + top1(without, "open") < 1.6


def test_item_attributes_codes_and_price_buckets() -> None:
    a = ItemAttributes.build(
        [None, "shoes", "bags", None, "shoes"], [None, 10.0, 200.0, 50.0, None], n_price_buckets=2
    )
    assert a.category_names == ["", "bags", "shoes"]
    assert a.categories.tolist() == [0, 2, 1, 0, 2]
    assert a.price_edges == [50.0]
    assert a.price_buckets.tolist() == [0, 1, 2, 1, 0]  # unknown price → 0
    assert a.n_price_buckets == 3
    with pytest.raises(InvalidInputError, match="prices"):
        ItemAttributes.build([None, "a"], [None])


def test_attributes_are_trained_saved_and_loaded(split: Split, tmp_path: Path) -> None:
    # Category = which cycle an item belongs to: shared structure the model can use.
    cats = [None, *("first" if i <= CYCLE else "second" for i in range(1, N_ITEMS + 1))]
    prices = [None, *(float(i) for i in range(1, N_ITEMS + 1))]
    attributes = ItemAttributes.build(cats, prices)
    with_attrs = Split(
        train=Train(split.train.seqs, split.train.item_ids, attributes=attributes),
        valid_history=split.valid_history,
        valid_target=split.valid_target,
    )
    cfg = SasRecConfig(max_len=8, hidden=16, max_epochs=2, eval_every=1)
    model = SasRecRecommender(cfg)
    model.fit(with_attrs)
    assert model.net is not None and model.attributes is attributes
    assert model.net.cat_emb.weight[1:].abs().sum() > 0  # the category table was trained
    model.save(tmp_path / "m")
    loaded = SasRecRecommender.load(tmp_path / "m")
    assert loaded.attributes is not None
    assert loaded.attributes.category_names == attributes.category_names
    np.testing.assert_array_equal(loaded.attributes.price_buckets, attributes.price_buckets)
    np.testing.assert_array_equal(
        loaded.score(split.test_history[:5]), model.score(split.test_history[:5])
    )
    # Attributes over another catalogue are refused.
    short = ItemAttributes.build(cats[:10], prices[:10])
    bad = Split(
        train=Train(split.train.seqs, split.train.item_ids, attributes=short),
        valid_history=split.valid_history,
        valid_target=split.valid_target,
    )
    with pytest.raises(InvalidInputError, match="attributes cover 9 items"):
        SasRecRecommender(cfg).fit(bad)


def test_scored_through_another_vocabulary_it_ranks_the_same(
    trained: SasRecRecommender, split: Split
) -> None:
    """`inkling retrain` evaluates the model in service on a newer split, whose item
    indices differ: `OnVocabulary` must give each item the score it has natively."""
    from batch.retrain import OnVocabulary

    names = split.train.item_ids
    shuffled = ["<pad>", *reversed(names[1:]), "brand-new-item"]
    index = {name: i for i, name in enumerate(shuffled)}
    newer = Split(
        train=Train(seqs=[], item_ids=shuffled),
        valid_history=[],
        valid_target=np.zeros(0, np.int64),
    )
    histories = split.test_history[:20]
    moved = [np.array([index[names[i]] for i in h], dtype=np.int64) for h in histories]
    adapter = OnVocabulary(trained, newer, "in service")  # type: ignore[arg-type]
    theirs = adapter.score(moved)
    native = trained.score(histories)
    for name in names[1:]:
        np.testing.assert_allclose(theirs[:, index[name]], native[:, names.index(name)], rtol=1e-5)
    assert (theirs[:, index["brand-new-item"]] < native[:, 1:].min()).all()


def test_gap_codes_are_log2_buckets_of_the_seconds_between_items() -> None:
    from inkling.models.sasrec import GAP_BUCKETS, gap_buckets, pack_time_gaps

    codes = gap_buckets(np.array([100, 100, 101, 104, 100 + 86_400, 50, 10**12]))
    # first: 0; 0 s: 1; 1 s: 2; 3 s: 3; a day: 1 + ⌊log2 86401⌋ = 17; backwards: 1; capped.
    assert codes.tolist() == [0, 1, 2, 3, 17, 1, GAP_BUCKETS - 1]
    assert pack_time_gaps(np.array([1, 0, 1]), np.array([0, 5, 5])).tolist() == [1, 6, 3]
    with pytest.raises(InvalidInputError, match="2 flags but 3 times"):
        pack_time_gaps(np.array([1, 0]), np.array([0, 5, 5]))


def gap_split(n_seqs: int = 300, length: int = 16, seed: int = 0) -> Split:
    """The item after item j is j + 1 when j came seconds after its predecessor and
    j + 2 when it came a day after: only the gaps tell which."""
    rng = np.random.default_rng(seed)
    seqs, times = [], []
    for _ in range(n_seqs):
        gaps = rng.choice([5, 86_400], size=length)
        gaps[0] = 5
        items = [int(rng.integers(1, N_ITEMS + 1))]
        for j in range(1, length):
            step = 1 if gaps[j - 1] == 5 else 2
            items.append((items[-1] - 1 + step) % N_ITEMS + 1)
        seqs.append(np.array(items, dtype=np.int64))
        times.append(np.cumsum(gaps).astype(np.int64))
    ids = ["<pad>", *(f"i{k}" for k in range(1, N_ITEMS + 1))]
    return Split(
        train=Train([s[:-2] for s in seqs], ids, times=[t[:-2] for t in times]),
        valid_history=[s[:-2] for s in seqs],
        valid_target=np.array([s[-2] for s in seqs]),
        test_history=[s[:-1] for s in seqs],
        test_target=np.array([s[-1] for s in seqs]),
        valid_times=[t[:-2] for t in times],
        test_times=[t[:-1] for t in times],
    )


def test_time_gaps_let_the_model_use_the_time_between_items() -> None:
    split = gap_split()
    cfg = SasRecConfig(max_len=16, hidden=32, batch_size=32, max_epochs=30, eval_every=5, lr=3e-3)
    timed = SasRecRecommender(SasRecConfig(**{**cfg.__dict__, "time_gaps": True}))
    timed.fit(split)
    plain = SasRecRecommender(cfg)
    plain.fit(split)
    assert timed.reads_times and not plain.reads_times

    def top1(model: SasRecRecommender, times: list[np.ndarray] | None) -> float:
        scores = model.score(split.test_history, None, times)
        return float((scores.argmax(axis=1) == split.test_target).mean())

    assert top1(timed, split.test_times) > 0.9
    assert top1(plain, None) < 0.7  # half of the targets are a coin toss without times
    with pytest.raises(InvalidInputError, match="needs the training sequences' times"):
        SasRecRecommender(SasRecConfig(time_gaps=True, max_epochs=1)).fit(cycle_split(20))


def test_the_time_budget_ends_training_mid_epoch_then_evaluates(split: Split) -> None:
    model = SasRecRecommender(
        SasRecConfig(max_len=20, hidden=16, batch_size=8, max_train_seconds=1e-9)
    )
    lines: list[str] = []
    model.fit(split, progress=lines.append)
    # One step of one epoch (8 windows of at most 20 positions), then one evaluation.
    assert len(model.epoch_losses) == 1 and 0 < model.epoch_examples[0] <= 8 * 20
    assert len(model.history) == 1 and "time budget" in lines[-1]


def test_repeat_scores_go_to_each_items_newest_occurrence_by_distance() -> None:
    assert repeat_buckets(10).tolist() == [0, 1, 2, 2, 3, 3, 3, 3, 4, 4]
    net = SasRecNet(10, SasRecConfig(max_len=8, hidden=16, repeat_context=False)).eval()
    plain = SasRecNet(10, SasRecConfig(max_len=8, hidden=16, repeat=False)).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k != "repeat_bias"})
    assert net.repeat_bias is not None
    with torch.no_grad():
        net.repeat_bias.copy_(torch.arange(1.0, 10.0) / REPEAT_SCALE)  # bucket b scores b + 1
    seqs = torch.tensor([[0, 0, 3, 5, 3, 7, 5, 2]])
    weights = net.repeat_weights(seqs, net.encode(seqs, torch.ones_like(seqs)))[0]
    # From the newest position: 3 last seen 3 back (bucket 2), 7 2 back (bucket 2), 5 one
    # back (bucket 1), 2 at the newest position itself (bucket 0); older copies and
    # padding score nothing.
    assert weights[-1].tolist() == [0, 0, 0, 0, 3, 3, 2, 1]
    assert weights[4].tolist() == [0, 0, 0, 2, 1, 0, 0, 0]  # causal: only positions <= 4
    with torch.no_grad():
        added = (net(seqs, torch.ones_like(seqs)) - plain(seqs, torch.ones_like(seqs)))[0, 1:]
    assert added.tolist() == pytest.approx([0, 1, 3, 0, 2, 0, 3, 0, 0, 0], abs=1e-5)
    assert "repeat_codes" not in net.state_dict()  # derived, not saved


def test_repeat_context_adds_the_hidden_states_bucket_score_and_the_count_score() -> None:
    net = SasRecNet(10, SasRecConfig(max_len=8, hidden=4, n_heads=1, repeat_context=True)).eval()
    assert net.repeat_bias is not None and net.repeat_gate is not None
    assert net.count_bias is not None
    with torch.no_grad():
        net.repeat_gate.zero_()
        net.repeat_gate[:, 0] = torch.arange(1.0, 10.0)  # bucket b: (b + 1) × hidden[..., 0]
        net.count_bias.copy_(torch.tensor([0.0, 10.0, 100.0]) / REPEAT_SCALE)
    seqs = torch.tensor([[0, 0, 3, 5, 3, 7, 5, 2]])
    hidden = torch.zeros(1, 8, 4)
    hidden[0, :, 0] = 1.0
    hidden[0, 4, 0] = 2.0
    weights = net.repeat_weights(seqs, hidden)[0]
    # From the newest position: 3 (3 back, bucket 2, seen twice: +10), 7 (2 back,
    # bucket 2), 5 (1 back, bucket 1, seen twice: +10), 2 (the newest, bucket 0).
    assert weights[-1].tolist() == pytest.approx([0, 0, 0, 0, 13, 3, 12, 1])
    # At position 4 the hidden state is 2: 5 (1 back) 2 × 2, 3 (newest, twice) 2 × 1 + 10.
    assert weights[4].tolist() == pytest.approx([0, 0, 0, 4, 12, 0, 0, 0])
    # Serving adds them from the encoder's own output at the newest position.
    flags = torch.ones_like(seqs)
    with torch.no_grad():
        own = net.repeat_weights(seqs, net.encode(seqs, flags))[0, -1]
        expected = (net.encode(seqs, flags)[0, -1] @ net.item_table().t()).index_add(
            0, seqs[0], own
        )
        scores = net(seqs, flags)[0]
    assert scores[1:].tolist() == pytest.approx(expected[1:].tolist(), abs=1e-5)
    assert own[4] != 0  # the hidden-state term is live


@pytest.mark.parametrize("context", [False, True])
def test_the_repeat_scores_learn_how_far_back_users_return(context: bool) -> None:
    # Each sequence shows three random items, then shows them again in the same order:
    # every item after the third is the one three positions back.
    rng = np.random.default_rng(0)
    n_items = 200
    full = [np.tile(rng.choice(np.arange(1, n_items + 1), 3, replace=False), 4) for _ in range(400)]
    ids = ["<pad>", *(f"item{i}" for i in range(1, n_items + 1))]
    split = Split(
        train=Train(seqs=[s[:-2] for s in full], item_ids=ids),
        valid_history=[s[:-2] for s in full],
        valid_target=np.array([s[-2] for s in full]),
        valid_flags=[np.ones(len(s) - 2, dtype=np.int64) for s in full],
    )
    model = SasRecRecommender(
        replace(SMALL, repeat=True, repeat_context=context, max_epochs=6, eval_every=3)
    )
    model.fit(split)
    assert model.keep_history  # the training sequences revisit items
    net = model.net
    assert net is not None and net.repeat_bias is not None
    # The repeat scores each history item gets from the newest position, as served:
    # 3 back (bucket 2) holds the answer; the newest item (bucket 0) never is.
    histories = torch.as_tensor(np.stack(split.valid_history))
    with torch.no_grad():
        flags = torch.ones_like(histories)
        scores = net.repeat_weights(histories, net.encode(histories, flags))[:, -1].mean(0)
    assert float(scores[-3]) > max(float(scores[-2]), float(scores[-1]) + 1.0)
    assert model.history[-1]["valid_recall10"] > 0.9
