"""SASRec: learns a deterministic next-item task, is causal, padding-invariant, persists."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from inkling.errors import InvalidInputError
from inkling.models import SasRecConfig, SasRecRecommender, ranks_of_targets
from inkling.models.sasrec import SasRecNet

N_ITEMS = 50
CYCLE = 25


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> None:
    torch.set_num_threads(1)


@dataclass
class Train:
    seqs: list[np.ndarray]
    item_ids: list[str]


@dataclass
class Split:
    """The shape of ``batch.evaluation``'s split, without importing it."""

    train: Train
    valid_history: list[np.ndarray]
    valid_target: np.ndarray
    test_history: list[np.ndarray] = field(default_factory=list)
    test_target: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


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
    with torch.no_grad():
        a, b = net.encode(seq), net.encode(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_left_padding_does_not_change_scores(trained: SasRecRecommender) -> None:
    net = trained.net
    assert net is not None
    items = [7, 8, 9, 10, 6]
    with torch.no_grad():
        scores = [
            net(torch.tensor([[0] * pad + items])) for pad in (0, 3, SMALL.max_len - len(items))
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
    with torch.no_grad():
        eager = net(seqs)
        torch.testing.assert_close(module(seqs), eager, atol=1e-5, rtol=0)
        torch.testing.assert_close(reloaded(seqs), eager, atol=1e-5, rtol=0)


def test_sampled_softmax_path_trains(split: Split) -> None:
    cfg = SasRecConfig(
        max_len=20, hidden=32, batch_size=32, max_epochs=12, eval_every=4, patience=2,
        full_softmax_max_items=10, n_negatives=20,
    )  # fmt: skip
    model = SasRecRecommender(cfg)
    lines: list[str] = []
    model.fit(split, progress=lines.append)
    assert "sampled softmax" in lines[0]
    assert max(h["valid_recall10"] for h in model.history) > 0.8


def test_plot_curves_writes_png(trained: SasRecRecommender, tmp_path: Path) -> None:
    path = trained.plot_curves(tmp_path / "curves" / "sasrec.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ranks_exclude_history_but_not_the_target() -> None:
    scores = np.array([[0.0, 5.0, 4.0, 3.0, 2.0]], dtype=np.float32)
    # Item 1 (best) is in the history and excluded; target 3 was seen too but stays.
    ranks = ranks_of_targets(scores, [np.array([1, 3])], np.array([3]))
    assert ranks.tolist() == [1]
    # Ties count against the target: a constant scorer ranks it last.
    flat = np.zeros((1, 5), dtype=np.float32)
    assert ranks_of_targets(flat, [np.array([], dtype=np.int64)], np.array([2])).tolist() == [3]


def test_config_validation_and_names() -> None:
    with pytest.raises(InvalidInputError):
        SasRecConfig(hidden=30, n_heads=4)
    with pytest.raises(InvalidInputError):
        SasRecConfig(max_len=0)
    assert SasRecRecommender().name == "sasrec"
    assert SasRecRecommender(SasRecConfig(variant="history-only")).name == "sasrec-history-only"
    assert isinstance(SasRecNet(3, SasRecConfig(hidden=8)), torch.nn.Module)
