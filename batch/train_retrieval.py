"""`inkling train --model retrieval`: the session-aware two-tower retrieval model, trained,
indexed, evaluated beside ALS and popularity, and published to the registry.

Steps:

1. resolve the Feast feature service `retrieval_v1` (a missing one fails before any work);
2. read the next-item training set (Feast historical retrieval, point-in-time; built with
   Spark when none exists): its `click` rows are the examples, since an add-to-cart or
   purchase row's own item is already in its session (the click came first);
3. hold out the newest `holdout_share` of the rows by time (the test rows); the model
   trains on the rest, early-stopping on their newest part (`inkling/models/two_tower.py`);
4. embed every catalogue item with the item tower and build the FAISS index by
   measurement (`inkling.models.ann`): each candidate's recall against exact search at k=100
   and at the k the server asks for, and its single-query latency; the fastest at p99
   among those reaching `min_recall` at both is built;
5. on the test rows, recall@100 and @500 (exact, whole catalogue) of the two-tower, of
   the index as served, of popularity and of ALS trained on the log before the
   held-out period, each queried the way the retrieval server queries it;
6. time the query tower per request as the server runs it (TorchScript, one thread);
7. publish model, vocabulary, item vectors, index and reports under
   `<registry>/<model_name>/<version>` and, by default, make it CURRENT.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from batch.als import AlsConfig
from batch.build_index import DEFAULT_MIN_RECALL, default_candidates, render_report
from inkling.config import Settings
from inkling.errors import InvalidInputError, NotFoundError
from inkling.events.eventlog import EventLog
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import open_store
from inkling.models.ann import IndexMeasurement, build_index, choose_index, measure_indexes
from inkling.models.embeddings import load_embeddings
from inkling.models.registry import Manifest, ModelRegistry, service_columns
from inkling.models.two_tower import (
    QueryEncoder,
    QueryFeatures,
    TwoTowerConfig,
    TwoTowerModel,
    TwoTowerVocab,
    recall_at_k,
)

FEATURE_SERVICE = "retrieval_v1"
KIND = "two-tower"
TRAINING_SET = f"next-item-{FEATURE_SERVICE}.parquet"
FALLBACK_TRAINING_SET = "next-item-ranker_v1.parquet"
"""The ranker's training set has every query feature too; used when it is the one there."""
DEFAULT_MAX_ROWS = 200_000
"""Rows of a training set built here (the demo log has about 31k interactions)."""
HOLDOUT_SHARE = 0.1
INDEX_K = 500
"""What the retrieval server asks the index for (`RetrievalSettings.ann_candidates`)."""
REPORT_K = (100, 500)
INDEX_QUERIES = 1_000
LATENCY_REQUESTS = 1_000
SERVER_SESSION_ITEMS = 5
SERVER_USER_ITEMS = 10
"""How the server builds an ALS query without a user vector (`RetrievalCore`)."""
INDEX_DIR = "index"
ITEM_VECTORS = "item_vectors.npy"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train_retrieval(
    settings: Settings,
    *,
    seconds: float,
    model_name: str = "retrieval",
    make_current: bool = True,
    registry_dir: Path | None = None,
    config: TwoTowerConfig | None = None,
    training_set: Path | None = None,
    max_rows: int | None = None,
    holdout_share: float = HOLDOUT_SHARE,
    index_k: int = INDEX_K,
    min_recall: float = DEFAULT_MIN_RECALL,
    spark: Any = None,
    progress: Callable[[str], None] = _say,
) -> tuple[Manifest, dict[str, Any]]:
    """Train, index, evaluate and publish the two-tower model; returns its manifest and
    the metrics recorded in it (`render_metrics` formats them).

    `seconds` is the training budget (it replaces `config.max_train_seconds`); the index
    is chosen at `index_k`, the depth the server asks for, and must also reach
    `min_recall` at k=100. `spark` is used only when there is no training set to read
    (one is started then if it is None).
    """
    if not 0.0 < holdout_share < 1.0:
        raise InvalidInputError(f"holdout_share must be in (0, 1), got {holdout_share}")
    began = time.perf_counter()
    store = open_store(settings)
    # Resolved first: a missing service fails before minutes of work.
    columns = service_columns(resolve_service(store, FEATURE_SERVICE))
    frame, source = load_training_rows(settings, training_set, max_rows, store=store, spark=spark)
    frame = frame.sort_values("label_timestamp", kind="stable").reset_index(drop=True)
    clicks = frame[frame["event_type"] == "click"].reset_index(drop=True)
    if len(clicks) < 10:
        raise InvalidInputError(
            f"the training set {source} has {len(clicks)} click rows; at least 10 are needed"
        )
    cutoff = clicks["label_timestamp"].iloc[int(len(clicks) * (1.0 - holdout_share))]
    train_rows = clicks[clicks["label_timestamp"] < cutoff]
    test_rows = clicks[clicks["label_timestamp"] >= cutoff]
    if len(train_rows) < 2:
        raise InvalidInputError(f"all click rows of {source} fall in the held-out period")

    cfg = replace(config or TwoTowerConfig(), max_train_seconds=seconds)
    vocab = item_vocabulary(settings, frame["item_id"].tolist(), cfg.price_buckets)
    index_of = vocab.item_index
    train_x = QueryFeatures.from_frame(vocab, cfg, train_rows)
    train_y = np.array([index_of[i] for i in train_rows["item_id"]], np.int64)
    test_x = QueryFeatures.from_frame(vocab, cfg, test_rows)
    test_y = np.array([index_of[i] for i in test_rows["item_id"]], np.int64)
    progress(
        f"[train] {len(frame)} rows from {source}: {len(train_rows)} clicks to train on "
        f"(validation: their newest {cfg.valid_share:.0%}), {len(test_rows)} held out from "
        f"{cutoff.isoformat()}; {vocab.n_items} items"
    )

    model = TwoTowerModel(vocab, cfg)
    fit_began = time.perf_counter()
    model.fit(train_x, train_y, progress=progress)
    fit_s = time.perf_counter() - fit_began
    items = model.item_vectors()
    test_q = model.query_vectors(test_x)

    rng = np.random.default_rng(cfg.seed)
    informative = np.flatnonzero(train_x.informative())
    sample = np.sort(rng.choice(informative, min(INDEX_QUERIES, len(informative)), replace=False))
    index_report, index = choose_and_build_index(
        items, model.query_vectors(train_x.take(sample)), index_k, min_recall, progress
    )
    index_markdown = index_report.pop("markdown")

    test: dict[str, Any] = {
        "rows": len(test_rows),
        "from": cutoff.isoformat(),
        "to": test_rows["label_timestamp"].max().isoformat(),
        "event_type": "click",
        "models": {},
    }
    scores = test["models"]
    scores["two_tower"] = {
        **{f"recall@{k}": recall_at_k(test_q, items, test_y, k) for k in REPORT_K},
        "queried": len(test_y),
    }
    scores["two_tower_ann"] = {
        **{f"recall@{k}": _index_recall(index, test_q, test_y, k) for k in REPORT_K},
        "queried": len(test_y),
        "index": index_report["chosen"],
    }
    scores.update(baseline_recalls(settings, test_rows, cutoff, progress))
    for name, row in scores.items():
        progress(
            f"[train] held out, {name}: "
            + ", ".join(f"recall@{k} {row[f'recall@{k}']:.4f}" for k in REPORT_K)
        )
    latency = query_tower_latency(model, test_rows.head(LATENCY_REQUESTS))
    progress(
        f"[train] query tower per request: p50 {latency['scripted']['p50_us']:.0f} µs, "
        f"p99 {latency['scripted']['p99_us']:.0f} µs (TorchScript, 1 thread)"
    )
    metrics: dict[str, Any] = {
        "fit_s": fit_s,
        "total_s": 0.0,
        "best_epoch": model.best_epoch,
        "stop_reason": model.stop_reason,
        f"valid_recall@{cfg.eval_k}": max(
            (h.get(f"valid_recall{cfg.eval_k}", 0.0) for h in model.history), default=0.0
        ),
        "test": test,
        "index": {k: v for k, v in index_report.items() if k != "candidates"},
        "query_tower": latency,
        "config": asdict(cfg),
    }
    training_data = {
        "training_set": str(source),
        "feature_service_of_rows": _service_of(source),
        "rows": len(frame),
        "click_rows": len(clicks),
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "first": frame["label_timestamp"].min().isoformat(),
        "last": frame["label_timestamp"].max().isoformat(),
        "holdout_from": cutoff.isoformat(),
        "items": vocab.n_items,
    }
    registry = ModelRegistry(registry_dir or settings.data_dir / "registry")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "artifact"
        model.save(artifact)
        model.plot_curves(artifact / "training.png")
        np.save(artifact / ITEM_VECTORS, items)
        index.save(artifact / INDEX_DIR / "index.faiss")
        (artifact / INDEX_DIR / "index_report.json").write_text(
            json.dumps(index_report, indent=1) + "\n"
        )
        (artifact / INDEX_DIR / "index_report.md").write_text(index_markdown)
        metrics["total_s"] = time.perf_counter() - began
        (artifact / "evaluation.md").write_text(render_metrics(metrics) + "\n")
        manifest = registry.publish(
            artifact,
            model=model_name,
            kind=KIND,
            feature_service=FEATURE_SERVICE,
            columns=columns,
            training_data=training_data,
            metrics=metrics,
            make_current=make_current,
        )
    progress(
        f"[train] published {model_name} {manifest.version}"
        + (" (CURRENT)" if make_current else "")
        + f" -> {registry.path(model_name, manifest.version)}"
    )
    return manifest, metrics


def _service_of(path: Path) -> str:
    name = Path(path).stem
    return name.split("-", 2)[-1] if name.startswith("next-item-") else "unknown"


def load_training_rows(
    settings: Settings,
    path: Path | None = None,
    max_rows: int | None = None,
    *,
    store: Any = None,
    spark: Any = None,
) -> tuple[pd.DataFrame, Path]:
    """The next-item training rows: `path`, else `<training_dir>/next-item-retrieval_v1.parquet`,
    else the ranker's (`next-item-ranker_v1.parquet`, a superset of the query features),
    else one built now with Spark from `retrieval_v1` (Feast historical retrieval)."""
    if path is not None:
        if not Path(path).is_file():
            raise NotFoundError(f"training set {path} does not exist")
        return pd.read_parquet(path), Path(path)
    for name in (TRAINING_SET, FALLBACK_TRAINING_SET):
        candidate = settings.training_dir / name
        if candidate.is_file():
            return pd.read_parquet(candidate), candidate
    from batch.spark import build_session
    from batch.training_set import build_training_set

    _say(f"[train] no training set in {settings.training_dir}: building {TRAINING_SET}")
    if spark is None:
        spark = build_session(settings.spark_master, settings.spark_conf, "inkling-train-retrieval")
    built = build_training_set(
        spark,
        store if store is not None else open_store(settings),
        settings.events_dir,
        settings.training_dir,
        kind="next-item",
        feature_service=FEATURE_SERVICE,
        max_rows=max_rows or DEFAULT_MAX_ROWS,
    )
    return built.frame, built.path


def item_vocabulary(
    settings: Settings, extra_item_ids: Sequence[str], price_buckets: int
) -> TwoTowerVocab:
    """Every item of the catalogue, the offline item features and `extra_item_ids`, with its
    category and price: the catalogue's first, else the item's latest feature row.

    Training rows' own item columns are null on an item's first day, so they are not used.
    """
    attributes: dict[str, tuple[str | None, float | None]] = {}

    def add(ids: Sequence[Any], categories: Sequence[Any], prices: Sequence[Any]) -> None:
        for item, category, price in zip(ids, categories, prices, strict=True):
            if isinstance(item, str) and item and item not in attributes:
                known_price = price is not None and not pd.isna(price)
                attributes[item] = (
                    category if isinstance(category, str) else None,
                    float(price) if known_price else None,
                )

    catalogue = settings.catalog_dir / "items.parquet"
    if catalogue.is_file():
        items = pd.read_parquet(catalogue, columns=["item_id", "category", "price"])
        add(items["item_id"].tolist(), items["category"].tolist(), items["price"].tolist())
    features = settings.features_dir / "item_features"
    if features.exists():
        import pyarrow.dataset as ds

        table = ds.dataset(str(features), format="parquet").to_table(
            columns=["item_id", "event_timestamp", "item_category", "item_price"]
        )
        latest = (
            table.to_pandas()
            .sort_values("event_timestamp", kind="stable")
            .drop_duplicates("item_id", keep="last")
        )
        add(
            latest["item_id"].tolist(),
            latest["item_category"].tolist(),
            latest["item_price"].tolist(),
        )
    extra = [str(i) for i in extra_item_ids if i is not None]
    add(extra, [None] * len(extra), [None] * len(extra))
    ids = sorted(attributes)
    return TwoTowerVocab.build(
        ids, [attributes[i][0] for i in ids], [attributes[i][1] for i in ids], price_buckets
    )


def choose_and_build_index(
    items: np.ndarray,
    queries: np.ndarray,
    k: int,
    min_recall: float,
    progress: Callable[[str], None] = _say,
) -> tuple[dict[str, Any], Any]:
    """Measure the default candidates at k=100 and at `k`, build the fastest at p99 (at `k`)
    whose recall against exact search reaches `min_recall` at both."""
    candidates = default_candidates(len(items), k)
    say = lambda line: progress(f"[index] {line}")  # noqa: E731
    at: dict[int, list[IndexMeasurement]] = {}
    for depth in sorted({100, k}):
        at[depth] = measure_indexes(
            items, queries, candidates, min(depth, len(items)), progress=say
        )
    shallow, deep = at[100], at[k]
    accurate = [d for s, d in zip(shallow, deep, strict=True) if s.recall >= min_recall]
    chosen = choose_index(accurate or deep, min_recall)
    chosen_100 = shallow[deep.index(chosen)]
    started = time.perf_counter()
    index = build_index(
        items,
        chosen.spec,
        nprobe=chosen.nprobe,
        ef_search=chosen.ef_search,
        mips_to_l2=chosen.mips_to_l2,
        metadata={"model": KIND, "item_ids": "vocab.json"},
    )
    build_s = time.perf_counter() - started
    progress(
        f"[index] chosen: {chosen.label}: recall@100 {chosen_100.recall:.4f} (p99 "
        f"{chosen_100.p99_us:.0f} µs), recall@{k} {chosen.recall:.4f} (p99 {chosen.p99_us:.0f} µs)"
    )
    report: dict[str, Any] = {
        "n_items": len(items),
        "dim": int(items.shape[1]),
        "k": k,
        "min_recall": min_recall,
        "queries": {"source": "two-tower query vectors of training rows", "count": len(queries)},
        "timing": {"threads": 1, "rounds": 10, "repeats": 3},
        "chosen": chosen.label,
        "recall@100": chosen_100.recall,
        "p50_us@100": chosen_100.p50_us,
        "p99_us@100": chosen_100.p99_us,
        f"recall@{k}": chosen.recall,
        f"p50_us@{k}": chosen.p50_us,
        f"p99_us@{k}": chosen.p99_us,
        "build_s": build_s,
        "candidates": {str(d): [m.to_dict() for m in ms] for d, ms in at.items()},
    }
    tables = [render_report({**report, "k": d}, ms, ms[deep.index(chosen)]) for d, ms in at.items()]
    report["markdown"] = (
        f"Chosen at k={k} among the candidates reaching recall ≥ {min_recall} at both k=100 "
        f"and k={k}.\n\n" + "\n".join(tables)
    )
    return report, index


def _index_recall(index: Any, queries: np.ndarray, targets: np.ndarray, k: int) -> float:
    if not len(targets):
        return 0.0
    _, rows = index.search(queries, min(k, index.size))
    return float(((rows + 1) == targets[:, None]).any(axis=1).mean())


def _newest_first(value: Any, n: int) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [str(x) for x in reversed(list(value))][:n]


def baseline_recalls(
    settings: Settings,
    test_rows: pd.DataFrame,
    cutoff: pd.Timestamp,
    progress: Callable[[str], None] = _say,
) -> dict[str, dict[str, Any]]:
    """Popularity and ALS on the same held-out rows, from the log before `cutoff`.

    `als` is implicit ALS (Hu et al., `AlsConfig`'s hyperparameters and the embeddings
    job's interaction weights) fitted here in numpy on the interactions before the
    held-out period. `als_deployed` is the embeddings job's artifact as the server
    would use it, when there is one; it is labelled when it was trained on events of
    the held-out period, which makes it look better than it would be.
    """
    from batch.features import AFFINITY_WEIGHTS

    log = EventLog(settings.events_dir).read(["user_id", "item_id", "event_type", "timestamp"])
    interactions = pc.is_in(log.column("event_type"), pa.array(list(AFFINITY_WEIGHTS)))
    early = pc.less(
        log.column("timestamp"),
        pa.scalar(cutoff.to_pydatetime(), log.schema.field("timestamp").type),
    )
    before = log.filter(pc.and_(interactions, early)).to_pandas()
    targets = test_rows["item_id"].astype(str).to_numpy()
    out: dict[str, dict[str, Any]] = {}
    counts = before["item_id"].value_counts()
    top = counts.index.to_numpy()
    out["most_popular"] = {
        **{f"recall@{k}": float(np.isin(targets, top[:k]).mean()) for k in REPORT_K},
        "queried": len(targets),
    }

    known = before[before["user_id"].notna()]
    weights = known["event_type"].map(AFFINITY_WEIGHTS).astype(np.float64)
    pairs = (
        pd.DataFrame({"user_id": known["user_id"], "item_id": known["item_id"], "w": weights})
        .groupby(["user_id", "item_id"], sort=True)["w"]
        .sum()
        .reset_index()
    )
    if len(pairs):
        config = AlsConfig()
        began = time.perf_counter()
        user_ids = pairs["user_id"].astype("category")
        item_ids = pairs["item_id"].astype("category")
        users, items = implicit_als(
            user_ids.cat.codes.to_numpy(),
            item_ids.cat.codes.to_numpy(),
            pairs["w"].to_numpy(),
            len(user_ids.cat.categories),
            len(item_ids.cat.categories),
            config,
        )
        progress(
            f"[train] ALS baseline: rank {config.rank}, {config.max_iter} iterations over "
            f"{len(pairs)} pairs before {cutoff.isoformat()} in {time.perf_counter() - began:.1f}s"
        )
        out["als"] = {
            **als_recalls(
                list(user_ids.cat.categories),
                users,
                list(item_ids.cat.categories),
                items,
                test_rows,
            ),
            "trained_through": before["timestamp"].max().isoformat(),
        }
    deployed = settings.models_dir / "als"
    if deployed.is_dir():
        try:
            emb = load_embeddings(deployed)
        except (NotFoundError, InvalidInputError) as e:
            progress(f"[train] ALS artifact {deployed} not compared: {e}")
        else:
            last = str(emb.manifest.get("data", {}).get("last_event", ""))
            leaked = bool(last) and pd.Timestamp(last) >= cutoff
            out["als_deployed"] = {
                **als_recalls(
                    emb.user_ids, emb.user_vectors, emb.item_ids, emb.item_vectors, test_rows
                ),
                "trained_through": last,
                "saw_heldout_period": leaked,
            }
    return out


def als_recalls(
    user_ids: Sequence[str],
    user_vectors: np.ndarray,
    item_ids: Sequence[str],
    item_vectors: np.ndarray,
    rows: pd.DataFrame,
) -> dict[str, Any]:
    """Recall@k of ALS vectors queried as `retrieval_server.core.EmbeddingSpace.query` does:
    the user's vector, else the mean of the session's newest items, else of the user's
    last items; a row with none of these retrieves nothing (counted as a miss)."""
    user_row = {u: i for i, u in enumerate(user_ids)}
    item_row = {x: i for i, x in enumerate(item_ids)}
    vectors = np.asarray(item_vectors, np.float64)
    hits = {k: 0 for k in REPORT_K}
    queried = 0
    for user, session, history, target in zip(
        rows["user_id"], rows["session_recent_items"], rows["user_last_items"], rows["item_id"],
        strict=True,
    ):  # fmt: skip
        query = None
        if isinstance(user, str) and user in user_row:
            query = np.asarray(user_vectors[user_row[user]], np.float64)
        else:
            for seen in (
                _newest_first(session, SERVER_SESSION_ITEMS),
                _newest_first(history, SERVER_USER_ITEMS),
            ):
                found = [item_row[i] for i in seen if i in item_row]
                if found:
                    query = vectors[found].mean(axis=0)
                    break
        if query is None:
            continue
        queried += 1
        t = item_row.get(str(target))
        if t is None:
            continue
        scores = vectors @ query
        rank = int((scores > scores[t]).sum())
        for k in REPORT_K:
            hits[k] += rank < k
    n = max(len(rows), 1)
    return {**{f"recall@{k}": hits[k] / n for k in REPORT_K}, "queried": queried}


def implicit_als(
    rows: np.ndarray,
    cols: np.ndarray,
    weights: np.ndarray,
    n_rows: int,
    n_cols: int,
    config: AlsConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Implicit ALS as Spark ML computes it: confidence c = 1 + alpha·w for observed pairs,
    preference 1; each row solves (YᵀY + Yᵀ(C−I)Y + reg·n_row·I) x = Yᵀ C p."""
    rng = np.random.default_rng(config.seed)
    scale = 1.0 / np.sqrt(config.rank)
    x = rng.normal(0, scale, (n_rows, config.rank))
    y = rng.normal(0, scale, (n_cols, config.rank))
    conf = 1.0 + config.alpha * np.asarray(weights, np.float64)
    by_row = _grouped(rows, cols, conf, n_rows)
    by_col = _grouped(cols, rows, conf, n_cols)
    for _ in range(config.max_iter):
        x = _als_half(y, *by_row, config.reg_param)
        y = _als_half(x, *by_col, config.reg_param)
    return x.astype(np.float32), y.astype(np.float32)


def _grouped(
    owner: np.ndarray, other: np.ndarray, conf: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(owner, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))])
    return indptr, np.asarray(other)[order], conf[order]


def _als_half(
    fixed: np.ndarray, indptr: np.ndarray, indices: np.ndarray, conf: np.ndarray, reg: float
) -> np.ndarray:
    rank = fixed.shape[1]
    gram = fixed.T @ fixed
    eye = np.eye(rank)
    out = np.zeros((len(indptr) - 1, rank))
    for r in range(len(indptr) - 1):
        a, b = indptr[r], indptr[r + 1]
        if a == b:
            continue
        f = fixed[indices[a:b]]
        c = conf[a:b]
        lhs = gram + (f.T * (c - 1.0)) @ f + reg * (b - a) * eye
        out[r] = np.linalg.solve(lhs, (f * c[:, None]).sum(axis=0))
    return out


def query_tower_latency(model: TwoTowerModel, rows: pd.DataFrame) -> dict[str, Any]:
    """Per-request latency of the serving encoder (rows → features → vector), one request
    at a time on one thread, TorchScript and eager; the fastest of 3 passes per request.

    A tight loop keeps weights and code in the CPU caches: inside a serving process,
    between the other stages of a request, the same call measured 2-3x this.
    """
    users = [
        {
            "user_top_categories": r.user_top_categories,
            "user_top_category_weights": r.user_top_category_weights,
            "user_last_items": r.user_last_items,
        }
        for r in rows.itertuples()
    ]
    sessions = [
        {
            "session_recent_items": r.session_recent_items,
            "session_intent_category": r.session_intent_category,
        }
        for r in rows.itertuples()
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, Any] = {"requests": len(users), "threads": 1}
    try:
        for name, encoder in (
            ("scripted", model.encoder(scripted=True)),
            ("eager", model.encoder(scripted=False)),
        ):
            out[name] = _time_encoder(encoder, users, sessions)
    finally:
        torch.set_num_threads(threads)
    return out


def _time_encoder(
    encoder: QueryEncoder, users: list[dict[str, Any]], sessions: list[dict[str, Any]]
) -> dict[str, float]:
    for u, s in zip(users[:20], sessions[:20], strict=True):
        encoder.encode(u, s)
    best = np.full(len(users), np.inf)
    clock = time.perf_counter_ns
    for _ in range(3):
        for i, (u, s) in enumerate(zip(users, sessions, strict=True)):
            start = clock()
            encoder.encode(u, s)
            best[i] = min(best[i], (clock() - start) / 1000.0)
    if not len(best):
        return {"p50_us": 0.0, "p99_us": 0.0, "mean_us": 0.0}
    return {
        "p50_us": float(np.percentile(best, 50)),
        "p99_us": float(np.percentile(best, 99)),
        "mean_us": float(best.mean()),
    }


def render_metrics(metrics: dict[str, Any]) -> str:
    """The held-out comparison, the index and the query tower as Markdown."""
    test = metrics["test"]
    ks = [
        int(key.split("@")[1]) for key in test["models"]["two_tower"] if key.startswith("recall@")
    ]
    lines = [
        f"Held-out rows: {test['rows']} clicks from {test['from']} to {test['to']} (the newest "
        "by time; never trained on). Recall = share of rows whose clicked item is in the "
        "top k of the whole catalogue; a row a source cannot query counts as a miss.",
        "",
        "| source | " + " | ".join(f"recall@{k}" for k in ks) + " | rows queried | note |",
        "| --- | " + " | ".join("---:" for _ in ks) + " | ---: | --- |",
    ]
    notes = {
        "two_tower": "exact search",
        "two_tower_ann": "through the chosen index",
        "most_popular": "interactions before the held-out period",
        "als": "implicit ALS fitted on the log before the held-out period",
        "als_deployed": "the embeddings job's artifact",
    }
    for name, row in test["models"].items():
        note = notes.get(name, "")
        if row.get("saw_heldout_period"):
            note += " — trained on the held-out period too: optimistic"
        if name == "two_tower_ann":
            note += f" ({row['index']})"
        lines.append(
            f"| {name} | "
            + " | ".join(f"{row[f'recall@{k}']:.4f}" for k in ks)
            + f" | {row['queried']} | {note} |"
        )
    index = metrics["index"]
    k = index["k"]
    qt = metrics["query_tower"]
    lines += [
        "",
        f"Index: `{index['chosen']}` over {index['n_items']} items × {index['dim']}: recall@100 "
        f"{index['recall@100']:.4f} vs exact (p99 {index['p99_us@100']:.0f} µs per query), "
        f"recall@{k} {index[f'recall@{k}']:.4f} (p99 {index[f'p99_us@{k}']:.0f} µs).",
        f"Query tower per request (features → vector, 1 thread, tight loop): TorchScript p50 "
        f"{qt['scripted']['p50_us']:.0f} µs, p99 {qt['scripted']['p99_us']:.0f} µs; eager p50 "
        f"{qt['eager']['p50_us']:.0f} µs, p99 {qt['eager']['p99_us']:.0f} µs.",
        f"Training: {metrics['fit_s']:.1f} s, best epoch {metrics['best_epoch']} "
        f"({metrics['stop_reason']}); whole job {metrics['total_s']:.1f} s.",
    ]
    return "\n".join(lines)
