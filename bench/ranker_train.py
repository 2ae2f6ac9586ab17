"""`inkling bench ranker --train`: the ranker's training throughput per loss and catalogue.

For each catalogue size (default 3k, 24k and 100k items) a synthetic sequence log is
drawn (:func:`synthetic_sequences`: Zipf-popular items, each user walking within a
few taste clusters), cut into the training windows `SasRecRecommender.fit` would
train on, and each loss of `SasRecConfig.loss` is timed on the same windows: a
fresh network and optimiser, `--warmup` steps untimed, then `--steps` timed steps
through the same loader thread and `train_step` as `fit`. Reported per (catalogue,
loss): trained positions per second, seconds per step, and seconds per epoch as
(batches in an epoch) × (seconds per step), since a full epoch of the full softmax
at 100k items would take many minutes. Threads are set once for the whole run
(`--threads` intra-op, one inter-op).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness.report import machine_info
from inkling.errors import InvalidInputError
from inkling.models.sasrec import (
    Objective,
    SasRecConfig,
    SasRecNet,
    train_step,
    training_batches,
    training_windows,
)

LOSSES = ("full", "uniform", "logq", "gbce")


def synthetic_sequences(
    n_items: int, n_users: int, mean_length: float, seed: int = 0
) -> list[np.ndarray]:
    """Item sequences (indices 1..n_items) of ``n_users`` users.

    Items fall into clusters of 50 in order of a Zipf(1.1)-like popularity; each user
    has three clusters and each step stays in the user's current cluster with
    probability 0.8 (else jumps to another of the three), picking an item within it
    by popularity. Lengths are geometric with the given mean, at least 3.
    """
    if n_items < 100 or n_users < 1:
        raise InvalidInputError("synthetic_sequences needs at least 100 items and 1 user")
    rng = np.random.default_rng(seed)
    n_clusters = n_items // 50
    cluster_of = rng.permutation(np.arange(n_items) % n_clusters)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.1
    members = [np.flatnonzero(cluster_of == c) for c in range(n_clusters)]
    weights = [popularity[m] / popularity[m].sum() for m in members]
    cluster_mass = np.array([popularity[m].sum() for m in members])
    cluster_mass /= cluster_mass.sum()
    out = []
    for _ in range(n_users):
        length = max(3, int(rng.geometric(1.0 / mean_length)))
        taste = rng.choice(n_clusters, size=3, replace=False, p=cluster_mass)
        current = taste[0]
        seq = np.empty(length, dtype=np.int64)
        for j in range(length):
            if rng.random() > 0.8:
                current = taste[rng.integers(3)]
            seq[j] = 1 + members[current][rng.choice(len(members[current]), p=weights[current])]
        out.append(seq)
    return out


@dataclass
class Throughput:
    n_items: int
    loss: str
    described: str
    windows: int
    batches_per_epoch: int
    steps: int
    positions_per_s: float
    s_per_step: float
    s_per_epoch: float
    final_loss: float


def time_loss(
    windows: np.ndarray, flags: np.ndarray, n_items: int, cfg: SasRecConfig, warmup: int, steps: int
) -> Throughput:
    """Train ``warmup + steps`` steps on ``windows`` with ``cfg`` and time the last ``steps``."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    counts = np.bincount(windows.ravel(), minlength=n_items + 1).astype(np.float32)
    net = SasRecNet(n_items, cfg)
    objective = Objective(cfg, n_items, counts, torch.device("cpu"))
    optimizer = torch.optim.Adam([*net.parameters(), *objective.parameters()], lr=cfg.lr)
    net.train()
    order = rng.permutation(len(windows))[: (warmup + steps) * cfg.batch_size]
    batches = training_batches(windows, flags, order, cfg, torch.device("cpu"))
    positions, loss, done = 0, float("nan"), 0
    began = time.perf_counter()
    for n, batch in enumerate(batches):
        if n == warmup:
            began, positions, done = time.perf_counter(), 0, 0
        loss, trained = train_step(net, optimizer, objective, batch)
        positions += trained
        done += 1
    elapsed = time.perf_counter() - began
    per_epoch = -(-len(windows) // cfg.batch_size)
    return Throughput(
        n_items=n_items,
        loss=cfg.loss,
        described=objective.describe(),
        windows=len(windows),
        batches_per_epoch=per_epoch,
        steps=done,
        positions_per_s=positions / elapsed,
        s_per_step=elapsed / done,
        s_per_epoch=per_epoch * elapsed / done,
        final_loss=loss,
    )


def run_training_benchmark(
    *,
    catalogues: list[int],
    losses: list[str],
    users: int,
    mean_length: float,
    steps: int,
    warmup: int,
    threads: int,
    out: Path,
    config: SasRecConfig | None = None,
    say: Any = print,
) -> Path:
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown or not losses:
        raise InvalidInputError(f"losses are {', '.join(LOSSES)}; got {losses}", field="losses")
    if steps < 1 or warmup < 0:
        raise InvalidInputError("steps must be >= 1 and warmup >= 0", field="steps")
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set once in this process
        torch.set_num_interop_threads(1)
    base = config or SasRecConfig()
    rows: list[Throughput] = []
    for n_items in catalogues:
        began = time.perf_counter()
        seqs = synthetic_sequences(n_items, users, mean_length, seed=base.seed)
        windows, flags = training_windows(seqs, None, base.max_len, base.all_windows)
        say(
            f"[bench] {n_items} items: {len(seqs)} users, {sum(map(len, seqs))} events, "
            f"{len(windows)} windows (drawn in {time.perf_counter() - began:.1f} s)"
        )
        for loss in losses:
            row = time_loss(windows, flags, n_items, replace(base, loss=loss), warmup, steps)
            rows.append(row)
            say(
                f"[bench] {n_items:>7} items {loss:>7}: {row.positions_per_s:10.0f} positions/s, "
                f"{row.s_per_step:.3f} s/step, {row.s_per_epoch:7.1f} s/epoch"
            )
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "title": "inkling ranker training throughput",
        "machine": machine_info(),
        "threads": {
            "intra_op": torch.get_num_threads(),
            "inter_op": torch.get_num_interop_threads(),
        },
        "config": asdict(base),
        "data": {"users": users, "mean_length": mean_length, "generator": "synthetic_sequences"},
        "rows": [asdict(r) for r in rows],
    }
    (out / "train-throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    full = {r.n_items: r.s_per_epoch for r in rows if r.loss == "full"}
    lines = [
        "| items | loss | positions/s | s/step | s/epoch | × faster than full |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        speedup = f"{full[r.n_items] / r.s_per_epoch:.1f}" if r.n_items in full else ""
        lines.append(
            f"| {r.n_items:,} | {r.described} | {r.positions_per_s:,.0f} | {r.s_per_step:.3f} | "
            f"{r.s_per_epoch:.1f} | {speedup} |"
        )
    table = "\n".join(lines)
    (out / "train-throughput.md").write_text(
        f"# Ranker training throughput\n\n{table}\n\n"
        f"{steps} timed steps after {warmup} untimed, batch {base.batch_size}, max_len "
        f"{base.max_len}, hidden {base.hidden}; {torch.get_num_threads()} intra-op thread(s), "
        f"one inter-op; loader thread prefetch {base.prefetch}; "
        "s/epoch = batches per epoch × s/step.\n"
    )
    say(table)
    return out / "train-throughput.md"
