"""Build the retrieval server's FAISS index from item embeddings, choosing its kind by measurement.

Candidates are measured on the catalogue's own vectors with the users' vectors as
queries (single queries, one thread, recall@k against exact search); the fastest
at p99 among those reaching the recall target is built and saved.

Written to `out_dir`: `index.faiss` and `index.json` (`inkling.models.ann.AnnIndex.save`),
`item_ids.json` (the item id of each index row, so the index never depends on a
later retrain of the embeddings), `index_report.json` and `index_report.md`; the directory
is replaced as a whole, so a reader never pairs an index with another build's ids.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from inkling.errors import InvalidInputError
from inkling.models.ann import (
    IndexCandidate,
    IndexMeasurement,
    build_index,
    choose_index,
    measure_indexes,
)
from inkling.models.embeddings import atomic_directory, load_embeddings

DEFAULT_K = 100
DEFAULT_MIN_RECALL = 0.95
MAX_QUERIES = 2_000
TIMING = {"threads": 1, "rounds": 10, "repeats": 3}
# Below this many items exact search is about as fast as anything and IVF lists get tiny.
IVF_MIN_ITEMS = 1_000


def ivf_lists(n_items: int) -> int:
    """The usual IVF list count, about 4·sqrt(n), with at least 8 items per list."""
    return max(1, min(round(4 * math.sqrt(n_items)), n_items // 8))


def default_candidates(n_items: int, k: int = DEFAULT_K) -> list[IndexCandidate]:
    """Candidates that cover catalogues from a few thousand to a few hundred thousand items.

    Exact search (always accurate, O(n) per query); HNSW32 on the inner product with
    efSearch k, 2k and 4k (efSearch is the search's candidate list, and below k the
    tail of the top k is left to chance); IVF with ~4·sqrt(n) lists, reduced to L2
    (`mips_to_l2`, without which IVF misses most top inner products of ALS vectors),
    probing 2 % to 20 % of the lists at k=100 and proportionally more for deeper k, and
    the same with 8-bit scalar quantisation (a quarter of the memory) at the deeper probes.
    """
    if k < 1:
        raise InvalidInputError(f"k must be positive, got {k}")
    candidates = [
        IndexCandidate("Flat"),
        *(IndexCandidate("HNSW32", ef_search=ef) for ef in (k, 2 * k, 4 * k)),
    ]
    if n_items >= IVF_MIN_ITEMS:
        nlist = ivf_lists(n_items)
        depth = max(1.0, k / DEFAULT_K)
        probes = sorted(
            {min(nlist, max(1, round(nlist * share * depth))) for share in (0.02, 0.05, 0.1, 0.2)}
        )
        for spec, use in ((f"IVF{nlist},Flat", probes), (f"IVF{nlist},SQ8", probes[-2:])):
            candidates += [IndexCandidate(spec, nprobe=p, mips_to_l2=True) for p in use]
    return candidates


def build_retrieval_index(
    embeddings_dir: Path | str,
    out_dir: Path | str,
    specs: Sequence[IndexCandidate | str] | None = None,
    *,
    k: int = DEFAULT_K,
    min_recall: float = DEFAULT_MIN_RECALL,
    max_queries: int = MAX_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure the candidates (default: `default_candidates`), build the chosen one, save it.

    Set `k` to the number of candidates the server asks the index for: recall and
    latency depend on it.

    Returns the report also written to `index_report.json`.
    """
    if max_queries < 1:
        raise InvalidInputError(f"max_queries must be at least 1, got {max_queries}")
    embeddings = load_embeddings(embeddings_dir)
    items, users = embeddings.item_vectors, embeddings.user_vectors
    if len(items) == 0:
        raise InvalidInputError(f"the embeddings at {embeddings_dir} hold no item vectors")
    if len(users) == 0:
        raise InvalidInputError(
            f"the embeddings at {embeddings_dir} hold no user vectors to measure recall with"
        )
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(users), size=min(max_queries, len(users)), replace=False))
    queries = users[sample]
    candidates = list(specs) if specs is not None else default_candidates(len(items), k)
    _progress(
        f"measuring {len(candidates)} candidates over {len(items)} items x {items.shape[1]} dims "
        f"with {len(queries)} user queries, k={k}"
    )
    measurements = measure_indexes(
        items,
        queries,
        candidates,
        k,
        rounds=TIMING["rounds"],
        repeats=TIMING["repeats"],
        progress=_progress,
    )
    chosen = choose_index(measurements, min_recall)
    _progress(f"chosen: {chosen.label}")

    started = time.perf_counter()
    index = build_index(
        items,
        chosen.spec,
        nprobe=chosen.nprobe,
        ef_search=chosen.ef_search,
        mips_to_l2=chosen.mips_to_l2,
        metadata={
            "embeddings_dir": str(embeddings_dir),
            "embeddings_created_at": embeddings.manifest.get("created_at"),
            "model": embeddings.manifest.get("model"),
            "item_ids": "item_ids.json",
        },
    )
    build_s = time.perf_counter() - started
    out = Path(out_dir)
    report = {
        "created_at": datetime.now(UTC).isoformat(),
        "embeddings_dir": str(embeddings_dir),
        "n_items": len(items),
        "dim": int(items.shape[1]),
        "k": k,
        "min_recall": min_recall,
        "queries": {"source": "user_vectors", "count": len(queries), "seed": seed},
        "timing": TIMING,
        "chosen": chosen.label,
        "index": {
            "path": str(out / "index.faiss"),
            "spec": chosen.spec,
            "nprobe": chosen.nprobe,
            "ef_search": chosen.ef_search,
            "mips_to_l2": chosen.mips_to_l2,
            "build_s": build_s,
        },
        "candidates": [m.to_dict() for m in measurements],
    }
    with atomic_directory(out) as tmp:
        index.save(tmp / "index.faiss")
        (tmp / "item_ids.json").write_text(json.dumps(embeddings.item_ids))
        (tmp / "index_report.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "index_report.md").write_text(render_report(report, measurements, chosen))
    _progress(f"wrote {out / 'index.faiss'} and {out / 'index_report.md'}")
    return report


def render_report(
    report: dict[str, Any], measurements: Sequence[IndexMeasurement], chosen: IndexMeasurement
) -> str:
    """The measurements as a Markdown table, the chosen candidate marked."""
    k = report["k"]
    lines = [
        "# Retrieval index",
        "",
        f"{report['n_items']} items × {report['dim']} dims, inner product; "
        f"{report['queries']['count']} user vectors as queries, one query per search on one "
        f"thread; recall@{k} against exact search. Chosen: the lowest p99 with recall@{k} "
        f"≥ {report['min_recall']}. Candidates are timed in interleaved rounds so that load "
        f"from elsewhere falls on all of them alike, in {report['timing']['repeats']} passes, "
        "each query's latency its fastest. `mips_to_l2`: the inner-product search runs as L2 over items lifted to "
        "equal norm by one extra coordinate.",
        "",
        f"| | index | recall@{k} | p50 µs | p99 µs | mean µs | build s | memory MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in measurements:
        mark = "**chosen**" if m == chosen else ""
        lines.append(
            f"| {mark} | `{m.label}` | {m.recall:.4f} | {m.p50_us:.0f} | {m.p99_us:.0f} | "
            f"{m.mean_us:.0f} | {m.build_s:.2f} | {m.memory_bytes / 1e6:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _progress(message: str) -> None:
    print(f"[index] {message}", file=sys.stderr, flush=True)
