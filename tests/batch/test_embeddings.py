"""Implicit ALS on a synthetic clickstream: the artifact's shape and what the vectors learnt."""

import json
from collections import Counter, defaultdict
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from batch.als import AlsConfig, train_als
from batch.generate import GeneratorConfig, write_synthetic
from inkling.errors import InvalidInputError, NotFoundError
from inkling.events.eventlog import EventLog
from inkling.events.schema import conform, validate
from inkling.models.embeddings import EmbeddingsArtifact, load_embeddings
from tests.conftest import temp_settings

pytestmark = pytest.mark.spark

GENERATOR = GeneratorConfig(users=150, items=300, sessions=800, days=5, seed=3)
# Small enough for a quick test; the generator's 20 categories fit in 16 dimensions.
CONFIG = AlsConfig(rank=16, max_iter=8, reg_param=0.05, alpha=10.0, seed=7)
WEIGHTS = {"click": 1.0, "add_to_cart": 3.0, "purchase": 5.0}
TOP = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spark):
    settings = temp_settings(tmp_path_factory.mktemp("als"))
    write_synthetic(GENERATOR, settings)
    out = settings.data_dir / "embeddings"
    artifact = train_als(spark, settings.events_dir, out, CONFIG)
    events = ds.dataset(settings.events_dir, partitioning="hive").to_table()
    return settings, out, artifact, events


def interactions(events: pa.Table) -> dict[str, dict[str, float]]:
    """Summed interaction weight per known user and item."""
    pairs: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in events.select(["user_id", "item_id", "event_type"]).to_pylist():
        if row["user_id"] is not None and row["event_type"] in WEIGHTS:
            pairs[row["user_id"]][row["item_id"]] += WEIGHTS[row["event_type"]]
    return pairs


def test_artifact_files_ids_and_shapes(trained):
    _, out, artifact, events = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "item_ids.json",
        "item_vectors.npy",
        "manifest.json",
        "user_ids.json",
        "user_vectors.npy",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".embeddings")]
    pairs = interactions(events)
    items = {item for per_user in pairs.values() for item in per_user}
    loaded = load_embeddings(out)
    assert loaded.item_ids == artifact.item_ids == sorted(items)
    assert loaded.user_ids == artifact.user_ids == sorted(pairs)
    assert loaded.item_vectors.dtype == loaded.user_vectors.dtype == np.float32
    assert loaded.item_vectors.shape == (len(items), CONFIG.rank)
    assert loaded.user_vectors.shape == (len(pairs), CONFIG.rank)
    np.testing.assert_array_equal(loaded.item_vectors, artifact.item_vectors)
    np.testing.assert_array_equal(loaded.user_vectors, artifact.user_vectors)
    assert np.isfinite(loaded.item_vectors).all() and np.abs(loaded.item_vectors).sum() > 0
    # Anonymous users are not in the model.
    anonymous = {r for r in events.column("user_id").to_pylist() if r is not None} - set(pairs)
    assert not anonymous & set(loaded.user_ids)


def test_manifest_describes_model_data_and_counts(trained):
    _, out, artifact, events = trained
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == artifact.manifest
    assert manifest["model"] == "als"
    assert manifest["config"] == {
        "rank": 16,
        "max_iter": 8,
        "reg_param": 0.05,
        "alpha": 10.0,
        "seed": 7,
    }
    assert manifest["interaction_weights"] == WEIGHTS
    used = events.filter(
        pc.and_(
            pc.is_valid(events.column("user_id")),
            pc.is_in(events.column("event_type"), pa.array(list(WEIGHTS))),
        )
    )
    pairs = interactions(events)
    assert manifest["counts"] == {
        "interactions": used.num_rows,
        "pairs": sum(len(per_user) for per_user in pairs.values()),
        "users": len(pairs),
        "items": len(artifact.item_ids),
    }
    times = used.column("timestamp")
    first = datetime.fromisoformat(manifest["data"]["first_event"])
    last = datetime.fromisoformat(manifest["data"]["last_event"])
    assert first == pc.min(times).as_py() and last == pc.max(times).as_py()
    assert first.tzinfo == UTC
    assert datetime.fromisoformat(manifest["created_at"]) > last


def category_hit_rate(
    artifact: EmbeddingsArtifact, ranking: np.ndarray, user_top: dict[str, set[str]], category
) -> float:
    """Share of each user's top-ranked items that fall in the user's true top categories."""
    hits = [
        np.isin(category[ranking[row][:TOP]], list(user_top[user])).mean()
        for row, user in enumerate(artifact.user_ids)
    ]
    return float(np.mean(hits))


def test_vectors_learn_the_users_tastes(trained):
    settings, _, artifact, events = trained
    catalogue = pq.read_table(settings.catalog_dir / "items.parquet").to_pylist()
    item_category = {r["item_id"]: r["category"] for r in catalogue}
    category = np.array([item_category[i] for i in artifact.item_ids])
    users = pq.read_table(settings.catalog_dir / "users.parquet").to_pylist()
    user_top = {r["user_id"]: set(r["true_top_categories"]) for r in users}
    pairs = interactions(events)
    scores = artifact.user_vectors @ artifact.item_vectors.T

    # Chance: the share of the modelled items that are in the user's top categories.
    shares = Counter(category.tolist())
    chance = np.mean(
        [sum(shares[c] for c in user_top[u]) / len(category) for u in artifact.user_ids]
    )
    als = category_hit_rate(artifact, np.argsort(-scores, axis=1), user_top, category)
    popularity = Counter(i for per_user in pairs.values() for i in per_user)
    by_popularity = np.argsort([-popularity[i] for i in artifact.item_ids], kind="stable")
    popular = category_hit_rate(
        artifact, np.tile(by_popularity, (len(artifact.user_ids), 1)), user_top, category
    )
    assert als >= 1.7 * chance
    # Best sellers already beat chance (popular categories are popular tastes); ALS is personal.
    assert als >= 1.2 * popular

    # Items the user never touched: ALS still leans towards the user's tastes.
    column = {item: n for n, item in enumerate(artifact.item_ids)}
    unseen = scores.copy()
    for row, user in enumerate(artifact.user_ids):
        unseen[row, [column[i] for i in pairs[user]]] = -np.inf
    assert category_hit_rate(artifact, np.argsort(-unseen, axis=1), user_top, category) >= (
        1.2 * chance
    )

    # The factors reconstruct the interactions: touched items outrank untouched ones.
    auc = []
    for row, user in enumerate(artifact.user_ids):
        touched = np.zeros(len(artifact.item_ids), dtype=bool)
        touched[[column[i] for i in pairs[user]]] = True
        ranks = np.argsort(np.argsort(scores[row])) + 1
        n_pos, n_neg = touched.sum(), (~touched).sum()
        auc.append((ranks[touched].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    assert np.mean(auc) >= 0.9


def test_no_interactions_is_invalid_input_and_keeps_the_old_artifact(tmp_path, spark):
    settings = temp_settings(tmp_path)
    t = datetime(2026, 10, 1, 9, tzinfo=UTC)
    rows = [
        # Known users who only browse, and an anonymous shopper: nothing to learn from.
        ("e1", "u1", "s1", None, "page_view", t),
        ("e2", "u1", "s1", "A", "item_view", t),
        ("e3", None, "s2", "A", "click", t),
        ("e4", None, "s2", "A", "purchase", t),
    ]
    names = ["event_id", "user_id", "session_id", "item_id", "event_type", "timestamp"]
    table = pa.Table.from_pylist([dict(zip(names, r, strict=True)) for r in rows])
    result = validate(conform(table))
    assert result.rejected == []
    EventLog(settings.events_dir).append(result.valid)
    out = tmp_path / "embeddings"
    out.mkdir()
    (out / "marker").write_text("previous artifact")
    with pytest.raises(InvalidInputError, match="no interactions"):
        train_als(spark, settings.events_dir, out, CONFIG)
    assert (out / "marker").read_text() == "previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "embeddings", "feature_repo"]
    with pytest.raises(NotFoundError, match="does not exist"):
        train_als(spark, tmp_path / "no-log", out, CONFIG)


def test_config_is_validated():
    with pytest.raises(InvalidInputError, match="rank"):
        AlsConfig(rank=0)
    with pytest.raises(InvalidInputError, match="alpha"):
        AlsConfig(alpha=-1.0)
