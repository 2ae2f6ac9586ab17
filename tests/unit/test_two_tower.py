"""Two-tower retrieval: learns a planted pattern, applies logQ, persists, refuses bad input,
and answers the retrieval core's ANN source."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import inkling.models.two_tower as tt
from inkling.errors import InvalidInputError, NotFoundError
from inkling.models.ann import build_index
from inkling.models.two_tower import (
    QueryFeatures,
    TwoTowerConfig,
    TwoTowerModel,
    TwoTowerVocab,
    in_batch_logits,
    recall_at_k,
)
from inkling.serving.stages import ANN, ItemTable
from retrieval_server.core import RetrievalCore, RetrievalLimits, RetrievalRequest, TwoTowerSpace

N_ITEMS = 120
N_CATEGORIES = 6
QUICK = TwoTowerConfig(
    dim=16, id_dim=16, category_dim=8, price_dim=4, hidden=32, batch_size=128,
    max_epochs=20, patience=3, max_train_seconds=30, lr=3e-3, dropout=0.0, eval_k=1, seed=3,
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> None:
    torch.set_num_threads(1)


def _vocab(n: int = N_ITEMS) -> TwoTowerVocab:
    ids = [f"i{k}" for k in range(n)]
    return TwoTowerVocab.build(
        ids, [f"c{k % N_CATEGORIES}" for k in range(n)], [1.0 + k for k in range(n)]
    )


def _planted(n_rows: int, seed: int = 0) -> tuple[dict[str, list[Any]], list[str]]:
    """The clicked item is always the 'partner' (+1) of the session's newest item."""
    rng = np.random.default_rng(seed)
    columns: dict[str, list[Any]] = {
        "session_recent_items": [],
        "user_last_items": [],
        "user_top_categories": [],
        "user_top_category_weights": [],
        "session_intent_category": [],
    }
    targets = []
    for _ in range(n_rows):
        newest = int(rng.integers(N_ITEMS))
        older = [f"i{x}" for x in rng.integers(N_ITEMS, size=int(rng.integers(0, 4)))]
        columns["session_recent_items"].append([*older, f"i{newest}"])  # newest last
        columns["user_last_items"].append(None if rng.random() < 0.5 else ["i1", "i2"])
        columns["user_top_categories"].append(["c1", "c2"])
        columns["user_top_category_weights"].append([0.7, 0.3])
        columns["session_intent_category"].append(f"c{newest % N_CATEGORIES}")
        targets.append(f"i{(newest + 1) % N_ITEMS}")
    return columns, targets


def _encode(vocab: TwoTowerVocab, config: TwoTowerConfig, columns: dict[str, list[Any]]):
    return QueryFeatures.from_columns(vocab, config, **columns)


@pytest.fixture(scope="module")
def trained() -> tuple[TwoTowerModel, QueryFeatures, np.ndarray]:
    vocab = _vocab()
    columns, targets = _planted(4_000)
    features = _encode(vocab, QUICK, columns)
    index = vocab.item_index
    y = np.array([index[t] for t in targets])
    model = TwoTowerModel(vocab, QUICK)
    lines: list[str] = []
    model.fit(features, y, progress=lines.append)
    assert any("valid recall@1 " in line for line in lines)
    assert "stopped" in lines[-1]
    return model, features, y


def test_learns_a_planted_next_item_pattern_far_above_chance(trained):
    model, _, _ = trained
    columns, targets = _planted(500, seed=9)  # fresh rows
    features = _encode(model.vocab, QUICK, columns)
    y = np.array([model.vocab.item_index[t] for t in targets])
    recall1 = recall_at_k(model.query_vectors(features), model.item_vectors(), y, 1)
    assert recall1 > 0.8, recall1  # chance: 1 / 120
    assert model.history and model.best_epoch >= 1


def test_item_and_query_vectors_are_unit_length(trained):
    model, features, _ = trained
    np.testing.assert_allclose(np.linalg.norm(model.item_vectors(), axis=1), 1.0, atol=1e-5)
    q = model.query_vectors(features.take(np.arange(50)))
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)


def test_in_batch_logits_subtract_log_q_per_column_and_mask_repeated_targets():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, generator=g)
    v = torch.randn(4, 8, generator=g)
    targets = torch.tensor([3, 5, 3, 7])
    log_q = torch.log(torch.tensor([0.1, 0.1, 0.1, 0.4, 0.1, 0.2, 0.05, 0.05]))
    plain = in_batch_logits(q, v, targets, 0.5, None)
    corrected = in_batch_logits(q, v, targets, 0.5, log_q)
    np.testing.assert_allclose(plain[0, 1].item(), float(q[0] @ v[1] / 0.5), rtol=1e-6)
    finite = torch.isfinite(plain)
    diff = (corrected - plain)[finite]
    expected = (-log_q[targets]).unsqueeze(0).expand(4, 4)[finite]
    torch.testing.assert_close(diff, expected)
    # Rows 0 and 2 share item 3: neither is the other's negative, each keeps its own column.
    assert torch.isinf(plain[0, 2]) and torch.isinf(plain[2, 0])
    assert torch.isfinite(plain.diagonal()).all()


def test_fit_applies_log_q_from_target_frequencies_unless_disabled(monkeypatch):
    seen: list[torch.Tensor | None] = []
    real = tt.in_batch_logits

    def spy(queries, items, targets, temperature, log_q):
        seen.append(log_q)
        return real(queries, items, targets, temperature, log_q)

    monkeypatch.setattr(tt, "in_batch_logits", spy)
    vocab = _vocab()
    columns, _ = _planted(200)
    features = _encode(vocab, QUICK, columns)
    y = np.array([1] * 150 + [2] * 50)  # item 1 three times as frequent as item 2
    one_epoch = TwoTowerConfig(**{**QUICK.__dict__, "max_epochs": 1, "valid_share": 0.0})
    TwoTowerModel(vocab, one_epoch).fit(features, y)
    assert seen and all(x is not None for x in seen)
    log_q = seen[0]
    assert log_q is not None
    np.testing.assert_allclose(float(log_q[1]), np.log(150 / 200), rtol=1e-5)
    np.testing.assert_allclose(float(log_q[2]), np.log(50 / 200), rtol=1e-5)
    seen.clear()
    off = TwoTowerConfig(**{**one_epoch.__dict__, "logq_correction": False})
    TwoTowerModel(vocab, off).fit(features, y)
    assert seen and all(x is None for x in seen)


def test_save_load_round_trip_gives_equal_vectors_and_the_scripted_encoder_agrees(
    trained, tmp_path: Path
):
    model, features, _ = trained
    model.save(tmp_path / "m")
    model.plot_curves(tmp_path / "m" / "training.png")
    loaded = TwoTowerModel.load(tmp_path / "m")
    sample = features.take(np.arange(100))
    np.testing.assert_array_equal(loaded.query_vectors(sample), model.query_vectors(sample))
    np.testing.assert_array_equal(loaded.item_vectors(), model.item_vectors())
    assert loaded.vocab.item_ids == model.vocab.item_ids
    assert loaded.best_epoch == model.best_epoch and loaded.history == model.history
    assert (tmp_path / "m" / "training.png").stat().st_size > 0

    user = {"user_top_categories": ["c1"], "user_top_category_weights": [1.0],
            "user_last_items": ["i4", "i5"]}  # fmt: skip
    session = {"session_recent_items": ["i7", "i9"], "session_intent_category": "c3"}
    scripted = loaded.encoder(scripted=True).encode(user, session)
    eager = model.encoder(scripted=False).encode(user, session)
    assert scripted is not None and eager is not None
    np.testing.assert_allclose(scripted, eager, atol=1e-6)
    # The serving encoder and the batch encoding agree on the same rows.
    batch = model.query_vectors(
        _encode(model.vocab, QUICK, {
            "session_recent_items": [session["session_recent_items"]],
            "user_last_items": [user["user_last_items"]],
            "user_top_categories": [user["user_top_categories"]],
            "user_top_category_weights": [user["user_top_category_weights"]],
            "session_intent_category": [session["session_intent_category"]],
        })
    )  # fmt: skip
    np.testing.assert_allclose(batch[0], eager, atol=1e-6)


def test_query_features_are_newest_first_truncated_and_drop_unknown_items():
    vocab = _vocab(10)
    config = TwoTowerConfig(session_len=3, history_len=2, top_categories=2)
    f = QueryFeatures.from_columns(
        vocab, config,
        session_recent_items=[["i1", "nope", "i2", "i3", "i4"], None],
        user_last_items=[np.array(["i5", "i6", "i7"], dtype=object), float("nan")],
        user_top_categories=[["c1", "c-unknown", "c2"], None],
        user_top_category_weights=[[0.5, float("nan")], None],
        session_intent_category=["c2", None],
    )  # fmt: skip
    idx, cat = vocab.item_index, vocab.category_index
    assert f.session[0].tolist() == [idx["i4"], idx["i3"], idx["i2"]]
    assert f.history[0].tolist() == [idx["i7"], idx["i6"]]
    assert f.top_categories[0].tolist() == [cat["c1"], tt.UNKNOWN_CATEGORY]
    assert f.top_weights[0].tolist() == [0.5, 0.0]
    assert f.intent.tolist() == [cat["c2"], tt.UNKNOWN_CATEGORY]
    assert f.informative().tolist() == [True, False]
    assert f.session[1].tolist() == [0, 0, 0]


def test_the_encoder_appends_request_items_as_newest_and_says_none_when_nothing_is_known(trained):
    model, _, _ = trained
    encoder = model.encoder()
    assert encoder.encode(None, None) is None
    assert encoder.encode({"user_last_items": ["unknown-item"]}, {}) is None
    f = encoder.features(None, {"session_recent_items": ["i1", "i2"]}, request_items=["i3"])
    idx = model.vocab.item_index
    assert f.session[0, :3].tolist() == [idx["i3"], idx["i2"], idx["i1"]]
    only_request = encoder.encode(None, None, ["i3"])
    assert only_request is not None and only_request.shape == (QUICK.dim,)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"batch_size": 1}, "batch_size"),
        ({"dim": 0}, "dim"),
        ({"valid_share": 1.0}, "valid_share"),
        ({"dropout": 1.0}, "dropout"),
        ({"max_train_seconds": 0.0}, "max_train_seconds"),
    ],
)
def test_bad_config_is_refused_naming_the_field(changes, field):
    with pytest.raises(InvalidInputError, match=field) as info:
        TwoTowerConfig(**changes)
    assert info.value.field == field


def test_bad_training_inputs_raise_clear_errors():
    vocab = _vocab()
    columns, _ = _planted(20)
    features = _encode(vocab, QUICK, columns)
    model = TwoTowerModel(vocab, QUICK)
    with pytest.raises(InvalidInputError, match=r"item indices in 1\.\.120"):
        model.fit(features, np.array([0] * 20))
    with pytest.raises(InvalidInputError, match=r"item indices in 1\.\.120"):
        model.fit(features, np.array([121] * 20))
    with pytest.raises(InvalidInputError, match=r"train\.session has shape"):
        model.fit(features, np.ones(19, dtype=np.int64))
    with pytest.raises(InvalidInputError, match="1-d integer"):
        model.fit(features, np.ones(20, dtype=np.float64))
    with pytest.raises(InvalidInputError, match="both valid and valid_targets"):
        model.fit(features, np.ones(20, dtype=np.int64), valid=features)
    with pytest.raises(InvalidInputError, match="not trained"):
        model.item_vectors()
    with pytest.raises(InvalidInputError, match="user_last_items has 1 rows"):
        QueryFeatures.from_columns(vocab, QUICK, **{**columns, "user_last_items": [None]})
    with pytest.raises(InvalidInputError, match="expected a list feature"):
        QueryFeatures.from_columns(vocab, QUICK, **{**columns, "session_recent_items": ["i1"] * 20})
    frame = pd.DataFrame({k: v for k, v in columns.items() if k != "session_intent_category"})
    with pytest.raises(InvalidInputError, match="lack the query features session_intent_category"):
        QueryFeatures.from_frame(vocab, QUICK, frame)
    with pytest.raises(InvalidInputError, match="must align"):
        TwoTowerVocab.build(["a", "b"], ["c"], [1.0, 2.0])
    with pytest.raises(InvalidInputError, match="repeat"):
        TwoTowerVocab.build(["a", "a"], ["c", "c"], [1.0, 2.0])


def test_loading_a_missing_or_mismatched_model_fails_clearly(trained, tmp_path: Path):
    with pytest.raises(NotFoundError, match=r"two_tower\.pt"):
        TwoTowerModel.load(tmp_path / "nothing")
    model, _, _ = trained
    model.save(tmp_path / "m")
    other = TwoTowerVocab.build(["x", "y"], ["c", "c"], [1.0, 2.0])
    (tmp_path / "m" / "vocab.json").write_text(__import__("json").dumps(other.to_json()))
    with pytest.raises(InvalidInputError, match="does not fit its vocabulary"):
        TwoTowerModel.load(tmp_path / "m")


def test_price_buckets_and_unknown_categories():
    vocab = TwoTowerVocab.build(
        ["a", "b", "c", "d"], ["x", None, "unknown", "y"], [1.0, None, 100.0, float("nan")], 2
    )
    assert vocab.categories == ("x", "y")
    assert vocab.item_category.tolist() == [2, 1, 1, 3]
    assert vocab.item_price_bucket.tolist() == [1, 0, 2, 0]
    assert TwoTowerVocab.from_json(vocab.to_json()).item_ids == vocab.item_ids


class _Rows:
    def __init__(self, rows: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.rows = rows

    async def read(self, view_name: str, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        return [self.rows.get((view_name, k)) for k in keys]


def test_the_retrieval_core_queries_the_two_tower_space_with_the_rows_it_read(trained):
    model, _, _ = trained
    ids = list(model.vocab.item_ids)
    table = ItemTable.build(
        ids, ["c"] * len(ids), np.arange(len(ids), dtype=float),
        np.ones(len(ids), bool), np.zeros(len(ids), bool),
    )  # fmt: skip
    index = build_index(model.item_vectors(), "Flat")
    space = TwoTowerSpace.build("retrieval", "v7", index, ids, model.encoder(), table)
    rows = _Rows(
        {("session_features", "s1"): {"session_recent_items": ["i10"],
                                      "session_intent_category": "c4"}}
    )  # fmt: skip
    core = RetrievalCore(lambda: table, rows, lambda: space, RetrievalLimits(ann_candidates=5))
    result = asyncio.run(core.retrieve(RetrievalRequest("", "s1", num_candidates=5)))
    assert result.model_version == "retrieval:v7"
    assert result.index_version == "two-tower-v7"
    found = table.ids[result.candidates.rows].tolist()
    assert set(result.candidates.sources.tolist()) == {ANN}
    assert "i11" in found  # the planted partner of the session's newest item
    # A request with nothing the model knows gets no ANN query: popularity answers.
    empty = asyncio.run(core.retrieve(RetrievalRequest("", "nobody", num_candidates=5)))
    assert ANN not in set(empty.candidates.sources.tolist())


def test_the_als_baseline_recovers_block_structure():
    from batch.als import AlsConfig
    from batch.train_retrieval import implicit_als

    rng = np.random.default_rng(0)
    rows, cols = [], []
    for user in range(20):
        block = range(0, 5) if user < 10 else range(5, 10)
        for item in rng.choice(list(block), size=3, replace=False):
            rows.append(user)
            cols.append(int(item))
    users, items = implicit_als(
        np.array(rows), np.array(cols), np.ones(len(rows)), 20, 10, AlsConfig(rank=2, seed=1)
    )
    top = np.argsort(-(users @ items.T), axis=1)[:, :5]
    assert all(set(top[u]) == set(range(5)) for u in range(10))
    assert all(set(top[u]) == set(range(5, 10)) for u in range(10, 20))
