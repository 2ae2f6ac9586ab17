"""FAISS inner-product indexes: accuracy, persistence, validation, choosing by measurement."""

import json

import numpy as np
import pytest

from batch.build_index import build_retrieval_index, default_candidates, ivf_lists
from inkling.errors import InvalidInputError, NotFoundError
from inkling.models.ann import (
    AnnIndex,
    IndexCandidate,
    IndexMeasurement,
    build_index,
    choose_index,
    exact_search,
    measure_indexes,
)
from inkling.models.embeddings import load_embeddings

DIM = 32


def low_rank(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """Vectors like trained embeddings: a few strong directions plus noise."""
    basis = rng.standard_normal((8, dim))
    return (rng.standard_normal((n, 8)) @ basis + 0.5 * rng.standard_normal((n, dim))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    vectors = low_rank(rng, 5_000)
    queries = low_rank(rng, 200)
    return vectors, queries


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_flat_is_exact_inner_product_search(data):
    vectors, queries = data
    scores, rows = build_index(vectors, "Flat").search(queries, 10)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert scores.shape == rows.shape == (len(queries), 10)
    np.testing.assert_array_equal(rows, brute_force(vectors, queries, 10))
    expected = np.take_along_axis(queries @ vectors.T, rows, axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_fewer_items_than_k_pads_with_minus_one(data):
    vectors, queries = data
    scores, rows = build_index(vectors[:5], "Flat").search(queries[:3], 8)
    assert (rows[:, :5] >= 0).all() and (rows[:, 5:] == -1).all()
    assert np.isneginf(scores[:, 5:]).all() and np.isfinite(scores[:, :5]).all()


def test_measured_recall_flat_exact_hnsw_high_ivf_grows_with_nprobe(data):
    vectors, queries = data
    nlist = ivf_lists(len(vectors))
    measurements = measure_indexes(
        vectors,
        queries,
        [
            "Flat",
            IndexCandidate("HNSW32", ef_search=128),
            IndexCandidate(f"IVF{nlist},Flat", nprobe=2),
            IndexCandidate(f"IVF{nlist},Flat", nprobe=nlist // 4),
        ],
        k=100,
    )
    by_label = {m.label: m for m in measurements}
    assert list(by_label) == [
        "Flat",
        "HNSW32 efSearch=128",
        f"IVF{nlist},Flat nprobe=2",
        f"IVF{nlist},Flat nprobe={nlist // 4}",
    ]
    assert by_label["Flat"].recall == 1.0
    assert by_label["HNSW32 efSearch=128"].recall >= 0.9
    few, many = (
        by_label[f"IVF{nlist},Flat nprobe=2"],
        by_label[f"IVF{nlist},Flat nprobe={nlist // 4}"],
    )
    assert few.recall < many.recall
    assert few.build_s == many.build_s  # one build serves every nprobe
    for m in measurements:
        assert m.n_queries == len(queries) and m.k == 100 and m.n_vectors == len(vectors)
        assert 0 < m.p50_us <= m.p99_us and m.mean_us > 0 and m.memory_bytes > 0
    # The 5,000 float32 vectors dominate every index; HNSW adds its graph on top.
    assert (
        by_label["HNSW32 efSearch=128"].memory_bytes
        > by_label["Flat"].memory_bytes
        >= 5_000 * DIM * 4
    )


def test_hnsw_recall_against_brute_force_at_k_100(data):
    vectors, queries = data
    _, rows = build_index(vectors, "HNSW32", ef_search=128).search(queries, 100)
    truth = brute_force(vectors, queries, 100)
    recall = np.mean([len(set(r) & set(t)) / 100 for r, t in zip(rows, truth, strict=True)])
    assert recall >= 0.9


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        ("HNSW32", {"ef_search": 64}),
        ("IVF50,Flat", {"nprobe": 7}),
        ("IVF50,SQ8", {"nprobe": 5}),
        ("IVF50,Flat", {"nprobe": 7, "mips_to_l2": True}),
    ],
)
def test_save_and_load_give_identical_results(tmp_path, data, spec, params):
    vectors, queries = data
    index = build_index(vectors, spec, metadata={"source": "test"}, **params)
    index.save(tmp_path / "index.faiss")
    described = json.loads((tmp_path / "index.json").read_text())
    assert described["spec"] == spec and described["metric"] == "inner_product"
    assert described["size"] == len(vectors) and described["dim"] == DIM
    loaded = AnnIndex.load(tmp_path / "index.faiss")
    assert loaded.label == index.label
    assert (loaded.spec, loaded.nprobe, loaded.ef_search) == (
        spec,
        params.get("nprobe"),
        params.get("ef_search"),
    )
    assert loaded.dim == DIM and (loaded.max_norm is not None) == ("mips_to_l2" in params)
    assert loaded.metadata == {"source": "test"}
    before, after = index.search(queries, 50), loaded.search(queries, 50)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "index.json"]
    # Permissions follow the umask like any new file (a server may run as another user).
    probe = tmp_path.parent / f"{tmp_path.name}-probe"
    probe.write_text("")
    for name in ("index.faiss", "index.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == probe.stat().st_mode & 0o777


def test_load_of_a_missing_index_names_the_file(tmp_path):
    with pytest.raises(NotFoundError, match=r"index\.faiss"):
        AnnIndex.load(tmp_path / "index.faiss")


def test_load_refuses_a_description_that_does_not_match_the_index(tmp_path, data):
    vectors, _ = data
    build_index(vectors[:100], "Flat").save(tmp_path / "index.faiss")
    described = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**described, "size": 99}))
    with pytest.raises(InvalidInputError, match="100 vectors"):
        AnnIndex.load(tmp_path / "index.faiss")


def test_float64_and_integer_inputs_are_accepted_as_float32(data):
    vectors, queries = data
    index = build_index(vectors.astype(np.float64), "Flat")
    a = index.search(queries.astype(np.float64), 5)[1]
    np.testing.assert_array_equal(a, index.search(queries, 5)[1])
    assert index.search(np.ones((1, DIM), dtype=np.int64), 3)[1].shape == (1, 3)


def test_no_queries_give_empty_results(data):
    vectors, _ = data
    scores, rows = build_index(vectors, "Flat").search(np.empty((0, DIM), np.float32), 4)
    assert scores.shape == rows.shape == (0, 4)


def bad_vector_cases() -> list[tuple[object, str]]:
    nan = np.ones((10, 4), np.float32)
    nan[3, 2] = np.nan
    inf = np.ones((10, 4))
    inf[7, 0] = 1e300  # finite as float64, infinite as float32
    return [
        (np.ones(10, np.float32), "2-D"),
        (np.ones((2, 3, 4), np.float32), "2-D"),
        (np.empty((0, 4), np.float32), "empty"),
        (np.empty((4, 0), np.float32), "empty"),
        (np.array([["a", "b"]]), "real numbers"),
        (nan, "non-finite values .* row 3"),
        (inf, "non-finite values .* row 7"),
    ]


@pytest.mark.parametrize(("vectors", "message"), bad_vector_cases())
def test_bad_vectors_are_refused(vectors, message):
    with pytest.raises(InvalidInputError, match=message):
        build_index(vectors, "Flat")


def test_bad_searches_are_refused(data):
    vectors, queries = data
    index = build_index(vectors, "Flat")
    with pytest.raises(InvalidInputError, match="k must be positive"):
        index.search(queries, 0)
    with pytest.raises(InvalidInputError, match="dimension 31, the index has 32"):
        index.search(queries[:, :31], 5)
    with pytest.raises(InvalidInputError, match="2-D"):
        index.search(queries[0], 5)
    bad = queries[:2].copy()
    bad[1, 0] = np.inf
    with pytest.raises(InvalidInputError, match="queries holds 1 non-finite"):
        index.search(bad, 5)
    with pytest.raises(InvalidInputError, match="dimension"):
        measure_indexes(vectors, queries[:, :8], ["Flat"])
    with pytest.raises(InvalidInputError, match="k must be positive"):
        measure_indexes(vectors, queries, ["Flat"], k=-1)
    with pytest.raises(InvalidInputError, match="rounds and repeats"):
        measure_indexes(vectors, queries, ["Flat"], repeats=0)


@pytest.mark.parametrize(
    ("spec", "params", "message"),
    [
        ("NoSuchIndex", {}, "not a FAISS index_factory string"),
        ("Flat", {"nprobe": 4}, "nprobe does not apply"),
        ("IVF16,Flat", {"ef_search": 4}, "efSearch does not apply"),
        ("IVF16,Flat", {"nprobe": 17}, "exceeds the 16 lists"),
        ("HNSW32", {"ef_search": 0}, "efSearch must be positive"),
        ("IVF20000,Flat", {}, "only 5000 vectors"),
    ],
)
def test_bad_specs_and_parameters_are_refused(data, spec, params, message):
    with pytest.raises(InvalidInputError, match=message):
        build_index(data[0], spec, **params)


def test_candidate_labels_parse_back():
    for candidate in [
        IndexCandidate("Flat"),
        IndexCandidate("HNSW32", ef_search=128),
        IndexCandidate("IVF256,SQ8", nprobe=16),
        IndexCandidate("IVF256,Flat", nprobe=8, mips_to_l2=True),
    ]:
        assert IndexCandidate.parse(candidate.label) == candidate
    assert IndexCandidate("IVF8,Flat", 2, None, True).label == "IVF8,Flat nprobe=2 mips_to_l2"
    with pytest.raises(InvalidInputError, match="nprobe=N, efSearch=N or mips_to_l2"):
        IndexCandidate.parse("HNSW32 ef=3")


def unequal_norms(rng: np.random.Generator, n: int) -> np.ndarray:
    """Like ALS item vectors: a few items with long vectors, a long tail of short ones."""
    return low_rank(rng, n) * rng.lognormal(-3.0, 1.2, size=(n, 1)).astype(np.float32)


def test_mips_to_l2_returns_inner_products_and_rescues_ivf_on_unequal_norms():
    rng = np.random.default_rng(3)
    vectors, queries = unequal_norms(rng, 5_000), low_rank(rng, 200)
    exact = build_index(vectors, "Flat", mips_to_l2=True)
    assert exact.faiss_index.d == DIM + 1 and exact.dim == DIM
    scores, rows = exact.search(queries, 20)
    np.testing.assert_array_equal(rows, brute_force(vectors, queries, 20))
    expected = np.take_along_axis(queries @ vectors.T, rows, axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

    nlist = ivf_lists(len(vectors))
    plain, lifted = measure_indexes(
        vectors,
        queries,
        [
            IndexCandidate(f"IVF{nlist},Flat", nprobe=nlist // 5),
            IndexCandidate(f"IVF{nlist},Flat", nprobe=nlist // 5, mips_to_l2=True),
        ],
        k=100,
    )
    assert lifted.recall >= 0.95 and lifted.recall >= plain.recall + 0.15


def test_measuring_a_candidate_twice_is_refused(data):
    vectors, queries = data
    with pytest.raises(InvalidInputError, match="repeat"):
        measure_indexes(
            vectors, queries, ["HNSW32 efSearch=64", IndexCandidate("HNSW32", None, 64)]
        )


def measured(label: str, recall: float, p99_us: float, memory: int = 1_000) -> IndexMeasurement:
    c = IndexCandidate.parse(label)
    return IndexMeasurement(
        spec=c.spec, nprobe=c.nprobe, ef_search=c.ef_search, mips_to_l2=c.mips_to_l2, n_vectors=1000, dim=8, k=100,
        n_queries=10, build_s=0.1, recall=recall, mean_us=p99_us / 2, p50_us=p99_us / 2,
        p99_us=p99_us, memory_bytes=memory,
    )  # fmt: skip


def test_choose_index_takes_the_fastest_accurate_enough():
    flat = measured("Flat", 1.0, 900)
    hnsw_fast = measured("HNSW32 efSearch=64", 0.93, 80)
    hnsw = measured("HNSW32 efSearch=128", 0.97, 150)
    ivf = measured("IVF100,Flat nprobe=10", 0.96, 120)
    candidates = [flat, hnsw_fast, hnsw, ivf]
    assert choose_index(candidates) == ivf
    assert choose_index(candidates, min_recall=0.9) == hnsw_fast
    assert choose_index(candidates, min_recall=0.97) == hnsw
    assert choose_index(candidates, min_recall=1.0) == flat
    assert choose_index([flat, hnsw_fast]) == flat  # Flat always qualifies


def test_choose_index_breaks_ties_by_memory_and_refuses_when_none_qualifies():
    big = measured("IVF100,Flat nprobe=10", 0.99, 100, memory=4_000)
    small = measured("IVF100,SQ8 nprobe=10", 0.98, 100, memory=1_000)
    assert choose_index([big, small]) == small
    with pytest.raises(InvalidInputError, match=r"best is IVF100,Flat nprobe=10 at 0\.9900"):
        choose_index([big, small], min_recall=0.995)
    with pytest.raises(InvalidInputError, match="no index measurements"):
        choose_index([])
    with pytest.raises(InvalidInputError, match="min_recall"):
        choose_index([big], min_recall=0.0)


def test_default_candidates_scale_with_the_catalogue_and_k():
    small = default_candidates(500)
    assert [c.label for c in small] == [
        "Flat",
        "HNSW32 efSearch=100",
        "HNSW32 efSearch=200",
        "HNSW32 efSearch=400",
    ]
    large = default_candidates(100_000)
    nlist = ivf_lists(100_000)
    assert nlist == 1265
    ivf = [c for c in large if c.spec == f"IVF{nlist},Flat"]
    assert [c.nprobe for c in ivf] == [25, 63, 126, 253]
    assert [c.nprobe for c in large if c.spec == f"IVF{nlist},SQ8"] == [126, 253]
    assert all(c.mips_to_l2 == c.spec.startswith("IVF") for c in large)
    deep = default_candidates(100_000, k=500)
    assert [c.ef_search for c in deep if c.spec == "HNSW32"] == [500, 1000, 2000]
    assert [c.nprobe for c in deep if c.spec == f"IVF{nlist},Flat"] == [126, 316, 632, 1265]
    assert ivf_lists(3_000) == 219 and ivf_lists(40) == 5


def write_embeddings_files(root, items: np.ndarray, users: np.ndarray) -> list[str]:
    root.mkdir(parents=True)
    item_ids = [f"i{n}" for n in range(len(items))]
    np.save(root / "item_vectors.npy", items)
    np.save(root / "user_vectors.npy", users)
    (root / "item_ids.json").write_text(json.dumps(item_ids))
    (root / "user_ids.json").write_text(json.dumps([f"u{n}" for n in range(len(users))]))
    (root / "manifest.json").write_text(
        json.dumps({"model": "als", "created_at": "2026-10-08T00:00:00+00:00"})
    )
    return item_ids


def test_build_retrieval_index_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(5)
    items, users = low_rank(rng, 3_000, 16), low_rank(rng, 400, 16)
    item_ids = write_embeddings_files(tmp_path / "emb", items, users)
    assert load_embeddings(tmp_path / "emb").item_ids == item_ids

    report = build_retrieval_index(tmp_path / "emb", tmp_path / "index", max_queries=300)

    out = tmp_path / "index"
    assert sorted(p.name for p in out.iterdir()) == [
        "index.faiss",
        "index.json",
        "index_report.json",
        "index_report.md",
        "item_ids.json",
    ]
    assert json.loads((out / "index_report.json").read_text()) == report
    assert report["n_items"] == 3_000 and report["dim"] == 16
    assert report["queries"] == {"source": "user_vectors", "count": 300, "seed": 0}
    assert report["timing"] == {"threads": 1, "rounds": 10, "repeats": 3}
    labels = [c["label"] for c in report["candidates"]]
    assert labels == [c.label for c in default_candidates(3_000)]
    chosen = next(c for c in report["candidates"] if c["label"] == report["chosen"])
    accurate = [c for c in report["candidates"] if c["recall"] >= 0.95]
    assert chosen["p99_us"] == min(c["p99_us"] for c in accurate)

    table = (out / "index_report.md").read_text()
    assert f"| **chosen** | `{report['chosen']}` |" in table
    assert table.count("**chosen**") == 1
    assert sum(line.startswith("|") and "`" in line for line in table.splitlines()) == len(labels)

    index = AnnIndex.load(out / "index.faiss")
    assert index.spec == report["index"]["spec"] and index.size == 3_000
    assert json.loads((out / "item_ids.json").read_text()) == item_ids
    queries = users[:20]
    _, rows = index.search(queries, 100)
    truth = exact_search(items, queries, 100)
    assert np.mean([len(set(r) & set(t)) / 100 for r, t in zip(rows, truth, strict=True)]) >= 0.9
    assert "[index] chosen:" in capsys.readouterr().err

    # A second build replaces the directory as a whole and leaves no temporaries beside it.
    build_retrieval_index(tmp_path / "emb", out, specs=["Flat"], max_queries=50)
    assert AnnIndex.load(out / "index.faiss").spec == "Flat"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "index"]


def test_build_retrieval_index_refuses_inconsistent_embeddings(tmp_path):
    rng = np.random.default_rng(6)
    write_embeddings_files(tmp_path / "emb", low_rank(rng, 50, 8), low_rank(rng, 10, 4))
    with pytest.raises(InvalidInputError, match="item vectors have dimension 8, user vectors 4"):
        build_retrieval_index(tmp_path / "emb", tmp_path / "index")
    with pytest.raises(NotFoundError, match=r"lacks item_vectors\.npy"):
        build_retrieval_index(tmp_path / "nothing", tmp_path / "index")
    assert not (tmp_path / "index").exists()
