"""Approximate nearest-neighbour search over item embeddings with FAISS (inner product).

The retrieval server scores items by the dot product of a query embedding with each
item embedding, so every index here answers maximum-inner-product queries. An index
is named by a FAISS `index_factory` string (`Flat`, `HNSW32`, `IVF1024,Flat`,
`IVF1024,SQ8`, ...) plus its search-time parameters (`nprobe` for IVF, `efSearch` for
HNSW) and whether it reduces the search to L2 (`mips_to_l2`).

Why the reduction: collaborative-filtering vectors have very unequal norms (ALS gives
tail items near-zero vectors), and IVF's clusters then miss most of the true top
inner products (recall@100 0.69 at nprobe = 10 % of the lists on ALS vectors). Giving
every item one more coordinate, sqrt(M² - |x|²) with M the largest norm, and every
query a 0 there turns the largest inner product into the smallest L2 distance
(Bachrach et al., RecSys 2014), and IVF's clusters work again (0.97 at the same
nprobe). HNSW does better on the plain inner product, so it is an option per index.

`measure_indexes` compares candidates the way the server uses them: one query per
call on one thread, recall@k against exact search; `choose_index` takes the lowest
p99 latency among those that are accurate enough.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from inkling.errors import InvalidInputError, NotFoundError

FORMAT_VERSION = 1
METRIC = "inner_product"
MIPS_TO_L2 = "mips_to_l2"
# Single-query latency is noisy for the first calls (page faults, cold caches).
WARMUP_QUERIES = 20


@dataclass(frozen=True)
class IndexCandidate:
    """A FAISS factory string with the search parameters to measure it at."""

    spec: str
    nprobe: int | None = None
    ef_search: int | None = None
    mips_to_l2: bool = False

    @property
    def label(self) -> str:
        params = [f"nprobe={self.nprobe}"] if self.nprobe is not None else []
        params += [f"efSearch={self.ef_search}"] if self.ef_search is not None else []
        params += [MIPS_TO_L2] if self.mips_to_l2 else []
        return " ".join([self.spec, *params])

    @classmethod
    def parse(cls, text: str) -> IndexCandidate:
        """Read a label such as `IVF1024,Flat nprobe=32 mips_to_l2` or `HNSW32 efSearch=128`."""
        spec, *params = text.split()
        values: dict[str, int] = {}
        for param in params:
            match = re.fullmatch(r"(nprobe|efSearch)=(\d+)", param)
            if match is None and param != MIPS_TO_L2:
                raise InvalidInputError(
                    f"index candidate {text!r}: expected nprobe=N, efSearch=N or {MIPS_TO_L2}, "
                    f"got {param!r}"
                )
            if match is not None:
                values[match.group(1)] = int(match.group(2))
        return cls(
            spec,
            nprobe=values.get("nprobe"),
            ef_search=values.get("efSearch"),
            mips_to_l2=MIPS_TO_L2 in params,
        )


@dataclass(frozen=True)
class IndexMeasurement:
    """How one candidate did: build time, recall@k against exact search and latency."""

    spec: str
    nprobe: int | None
    ef_search: int | None
    mips_to_l2: bool
    n_vectors: int
    dim: int
    k: int
    n_queries: int
    build_s: float
    recall: float
    """Mean over queries of |approximate top-k ∩ exact top-k| / min(k, n_vectors)."""
    mean_us: float
    p50_us: float
    p99_us: float
    memory_bytes: int
    """Size of the serialized index, close to what it occupies in memory."""

    @property
    def candidate(self) -> IndexCandidate:
        return IndexCandidate(self.spec, self.nprobe, self.ef_search, self.mips_to_l2)

    @property
    def label(self) -> str:
        return self.candidate.label

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, **asdict(self)}


class AnnIndex:
    """A FAISS index answering inner-product queries, and the search parameters it runs with.

    `max_norm` is set when the index searches by L2 over items lifted to equal norm
    (see the module docstring); scores still come back as inner products.
    """

    def __init__(
        self,
        index: faiss.Index,
        spec: str,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        max_norm: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        expected = faiss.METRIC_L2 if max_norm is not None else faiss.METRIC_INNER_PRODUCT
        if index.metric_type != expected:
            raise InvalidInputError(
                f"index {spec!r} must use {'L2' if max_norm is not None else 'inner-product'} "
                "similarity"
            )
        self._index = index
        self.spec = spec
        self.max_norm = max_norm
        self.metadata = dict(metadata or {})
        self.nprobe: int | None = None
        self.ef_search: int | None = None
        self.set_search_params(nprobe=nprobe, ef_search=ef_search)

    @property
    def dim(self) -> int:
        """The dimension of the vectors it was built on and takes as queries."""
        return int(self._index.d) - (1 if self.max_norm is not None else 0)

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def faiss_index(self) -> faiss.Index:
        return self._index

    @property
    def label(self) -> str:
        return IndexCandidate(
            self.spec, self.nprobe, self.ef_search, self.max_norm is not None
        ).label

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set `nprobe` (IVF) or `efSearch` (HNSW); None leaves FAISS's current value."""
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
            if value is None:
                continue
            if value < 1:
                raise InvalidInputError(f"{name} must be positive, got {value}")
            ivf = _ivf_of(self._index)
            if name == "nprobe" and ivf is not None and value > ivf.nlist:
                raise InvalidInputError(
                    f"nprobe {value} exceeds the {ivf.nlist} lists of {self.spec!r}"
                )
            try:
                space.set_index_parameter(self._index, name, value)
            except RuntimeError as e:
                raise InvalidInputError(f"{name} does not apply to index {self.spec!r}") from e
        self.nprobe = nprobe if nprobe is not None else self.nprobe
        self.ef_search = ef_search if ef_search is not None else self.ef_search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product: scores [q, k] float32 and rows [q, k] int64.

        Where fewer than k items are found, rows are -1 and their scores -inf.
        """
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}")
        q = as_vectors(queries, "queries", dim=self.dim, allow_empty=True)
        if self.max_norm is None:
            scores, rows = self._index.search(q, k)
            scores = scores.astype(np.float32, copy=False)
        else:
            lifted = np.hstack([q, np.zeros((len(q), 1), dtype=np.float32)])
            distances, rows = self._index.search(lifted, k)
            # |q' - x'|² = |q|² + M² - 2 q·x: undo it to return the inner product.
            square = np.einsum("ij,ij->i", q, q, dtype=np.float64)[:, None]
            scores = ((square + self.max_norm**2 - distances) / 2).astype(np.float32)
        rows = rows.astype(np.int64, copy=False)
        scores[rows < 0] = -np.inf
        return scores, rows

    def save(self, path: Path | str) -> None:
        """Write the index to `path` and its description to the same name with `.json`."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        description = {
            "format_version": FORMAT_VERSION,
            "spec": self.spec,
            "metric": METRIC,
            "dim": self.dim,
            "size": self.size,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "mips_to_l2_max_norm": self.max_norm,
            "faiss_version": faiss.__version__,
            "metadata": self.metadata,
        }
        with _atomic_path(target) as tmp:
            faiss.write_index(self._index, str(tmp))
        with _atomic_path(_sidecar(target)) as tmp:
            tmp.write_text(json.dumps(description, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> AnnIndex:
        source = Path(path)
        sidecar = _sidecar(source)
        for required in (source, sidecar):
            if not required.exists():
                raise NotFoundError(f"ANN index file {required} does not exist")
        try:
            description = json.loads(sidecar.read_text())
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{sidecar} is not valid JSON: {e}") from e
        if description.get("format_version") != FORMAT_VERSION:
            raise InvalidInputError(
                f"{sidecar} has format_version {description.get('format_version')!r}, "
                f"expected {FORMAT_VERSION}"
            )
        try:
            index = faiss.read_index(str(source))
        except RuntimeError as e:
            raise InvalidInputError(f"{source} is not a readable FAISS index") from e
        loaded = cls(
            index,
            description["spec"],
            nprobe=description.get("nprobe"),
            ef_search=description.get("ef_search"),
            max_norm=description.get("mips_to_l2_max_norm"),
            metadata=description.get("metadata"),
        )
        if (loaded.dim, loaded.size) != (description["dim"], description["size"]):
            raise InvalidInputError(
                f"{source} holds {loaded.size} vectors of dimension {loaded.dim}, but {sidecar} "
                f"says {description['size']} of dimension {description['dim']}"
            )
        return loaded


def as_vectors(
    values: np.ndarray, name: str, *, dim: int | None = None, allow_empty: bool = False
) -> np.ndarray:
    """`values` as a C-contiguous float32 [n, d] matrix, or InvalidInputError saying why not."""
    array = np.asarray(values)
    if array.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D array [n, d], got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InvalidInputError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.shape[1] == 0 or (array.shape[0] == 0 and not allow_empty):
        raise InvalidInputError(f"{name} is empty (shape {array.shape})")
    if dim is not None and array.shape[1] != dim:
        raise InvalidInputError(f"{name} have dimension {array.shape[1]}, the index has {dim}")
    with np.errstate(over="ignore"):
        matrix = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(matrix)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise InvalidInputError(
            f"{name} holds {int((~finite).sum())} non-finite values (NaN, inf or beyond "
            f"float32), the first in row {row}"
        )
    return matrix


def build_index(
    vectors: np.ndarray,
    spec: str,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    mips_to_l2: bool = False,
    metadata: dict[str, Any] | None = None,
) -> AnnIndex:
    """Build the `spec` index over `vectors` (row i is item i), training it first if needed."""
    matrix = as_vectors(vectors, "vectors")
    n = len(matrix)
    max_norm: float | None = None
    metric = faiss.METRIC_INNER_PRODUCT
    if mips_to_l2:
        square = np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64)
        max_norm = float(np.sqrt(square.max()))
        lift = np.sqrt(np.maximum(max_norm**2 - square, 0.0)).astype(np.float32)
        matrix = np.hstack([matrix, lift[:, None]])
        metric = faiss.METRIC_L2
    try:
        index = faiss.index_factory(matrix.shape[1], spec, metric)
    except RuntimeError as e:
        raise InvalidInputError(f"{spec!r} is not a FAISS index_factory string") from e
    ivf = _ivf_of(index)
    if ivf is not None:
        if ivf.nlist > n:
            raise InvalidInputError(
                f"index {spec!r} has {ivf.nlist} lists but there are only {n} vectors to train on"
            )
        # Small catalogues are clustered on every point; FAISS's "please provide at least
        # 39 points per centroid" warning says nothing actionable for them.
        ivf.cp.min_points_per_centroid = 1
    if not index.is_trained:
        index.train(matrix)
    index.add(matrix)
    return AnnIndex(
        index, spec, nprobe=nprobe, ef_search=ef_search, max_norm=max_norm, metadata=metadata
    )


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The true top-k rows by inner product (IndexFlatIP), -1 padded."""
    return build_index(vectors, "Flat").search(queries, k)[1]


def measure_indexes(
    vectors: np.ndarray,
    queries: np.ndarray,
    specs: Sequence[IndexCandidate | str],
    k: int = 100,
    *,
    rounds: int = 10,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[IndexMeasurement]:
    """Build each candidate and time single-query searches on one thread, as a server runs.

    Candidates that share a factory string (and `mips_to_l2`) share one build and its
    build time. The queries are split into `rounds` slices and every round runs every
    candidate on its slice, so a burst of load from elsewhere on the machine lands on
    all candidates alike instead of on whichever ran at the time. The whole pass runs
    `repeats` times and each query's latency is its fastest: the search's own cost,
    its query-dependent tail included, without the pauses of being descheduled by other
    processes. `specs` may be `IndexCandidate`s or labels that `IndexCandidate.parse` reads.
    """
    if k <= 0:
        raise InvalidInputError(f"k must be positive, got {k}")
    if rounds < 1 or repeats < 1:
        raise InvalidInputError(f"rounds and repeats must be at least 1, got {rounds}, {repeats}")
    matrix = as_vectors(vectors, "vectors")
    q = as_vectors(queries, "queries", dim=matrix.shape[1])
    candidates = [c if isinstance(c, IndexCandidate) else IndexCandidate.parse(c) for c in specs]
    if not candidates:
        raise InvalidInputError("no index candidates to measure")
    if len(set(candidates)) != len(candidates):
        raise InvalidInputError("the index candidates repeat one another")
    say = progress or (lambda _: None)
    built: dict[tuple[str, bool], tuple[AnnIndex, float, int]] = {}
    rows = {c: np.empty((len(q), k), dtype=np.int64) for c in candidates}
    latencies = {c: np.full(len(q), np.inf) for c in candidates}
    with _threads(1):
        truth = exact_search(matrix, q, k)
        for c in candidates:
            key = (c.spec, c.mips_to_l2)
            if key not in built:
                start = time.perf_counter()
                ann = build_index(matrix, c.spec, mips_to_l2=c.mips_to_l2)
                build_s = time.perf_counter() - start
                memory = int(faiss.serialize_index(ann.faiss_index).size)
                built[key] = (ann, build_s, memory)
                say(f"built {ann.label} over {len(matrix)} vectors in {build_s:.1f}s")
            ann = built[key][0]
            ann.set_search_params(nprobe=c.nprobe, ef_search=c.ef_search)
            for i in range(min(WARMUP_QUERIES, len(q))):
                ann.search(q[i : i + 1], k)
        say(
            f"timing {len(candidates)} candidates on {len(q)} single queries, "
            f"{repeats} passes of {rounds} rounds"
        )
        for _ in range(repeats):
            for chunk in np.array_split(np.arange(len(q)), rounds):
                for c in candidates:
                    ann = built[(c.spec, c.mips_to_l2)][0]
                    ann.set_search_params(nprobe=c.nprobe, ef_search=c.ef_search)
                    _time_single_queries(ann, q, chunk, k, rows[c], latencies[c])
    results = []
    for c in candidates:
        _, build_s, memory = built[(c.spec, c.mips_to_l2)]
        lat = latencies[c]
        m = IndexMeasurement(
            spec=c.spec,
            nprobe=c.nprobe,
            ef_search=c.ef_search,
            mips_to_l2=c.mips_to_l2,
            n_vectors=len(matrix),
            dim=matrix.shape[1],
            k=k,
            n_queries=len(q),
            build_s=build_s,
            recall=_recall(rows[c], truth),
            mean_us=float(lat.mean()),
            p50_us=float(np.percentile(lat, 50)),
            p99_us=float(np.percentile(lat, 99)),
            memory_bytes=memory,
        )
        say(f"{m.label}: recall@{k} {m.recall:.4f}, p50 {m.p50_us:.0f}µs, p99 {m.p99_us:.0f}µs")
        results.append(m)
    return results


def choose_index(
    measurements: Sequence[IndexMeasurement], min_recall: float = 0.95
) -> IndexMeasurement:
    """The lowest p99 latency among candidates with recall >= min_recall.

    Ties go to the smaller index. Exact search (`Flat`) always qualifies, so include it
    to be sure of an answer; without a qualifying candidate this raises.
    """
    if not 0.0 < min_recall <= 1.0:
        raise InvalidInputError(f"min_recall must be within (0, 1], got {min_recall}")
    if not measurements:
        raise InvalidInputError("no index measurements to choose from")
    accurate = [m for m in measurements if m.recall >= min_recall]
    if not accurate:
        best = max(measurements, key=lambda m: m.recall)
        raise InvalidInputError(
            f"no index candidate reaches recall {min_recall}: the best is {best.label} at "
            f"{best.recall:.4f}; add Flat (exact search) to the candidates"
        )
    return min(accurate, key=lambda m: (m.p99_us, m.memory_bytes, m.label))


def _time_single_queries(
    ann: AnnIndex,
    queries: np.ndarray,
    which: np.ndarray,
    k: int,
    rows: np.ndarray,
    latencies: np.ndarray,
) -> None:
    clock = time.perf_counter_ns
    for i in which:
        query = queries[i : i + 1]
        start = clock()
        _, found = ann.search(query, k)
        latencies[i] = min(latencies[i], (clock() - start) / 1000.0)
        rows[i] = found[0]


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [
        len(np.intersect1d(f[f >= 0], t[t >= 0], assume_unique=True)) / max(int((t >= 0).sum()), 1)
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits))


def _ivf_of(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


@contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` that replaces it when the block succeeds."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
