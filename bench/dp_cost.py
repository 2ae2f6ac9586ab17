"""What differential privacy costs the popularity source: Recall@100, exact vs DP counts.

Run: ``python -m bench.dp_cost [--datasets ml-100k,diginetica] [--draws 10] [--out DIR]``.

Each data set of `../shared/datasets` is imported into a temporary data directory with
the project's importer, loaded as sequences and split leave-last-out by
`batch.evaluation` (per user, or per session when most interactions are anonymous, as
`inkling evaluate` does), and every variant of the popularity source below is fitted
on the training part and scored there by `batch.evaluation.evaluate` with k = 100:
full ranking of the test target against every item not in its history.

Variants
    `exact`: `MostPopular`, each item's training interactions, repeats included (the
    counts `item_pop_7d` would hold over the training period).
    `distinct`: the units (sequence keys) that interacted with each item, no bound,
    no noise: what counting people instead of events costs.
    `bounded`: the same with each unit bounded to k items, no noise: what the bound
    costs (its selection is random; repeated over the draws).
    `laplace` / `gaussian`: the bounded counts released by `inkling.privacy`'s
    mechanism at (ε, 0) / (ε, `--delta`), rounded and clamped at 0 as
    `inkling export popularity` writes them; the popularity source ranks by them.

Sweeps
    ε over `--epsilons` at the bound `--bound` (the `[privacy]` default), and the bound
    over `--bounds` at ε = 1, each DP cell repeated `--draws` times. OpenDP draws its
    noise from its own CSPRNG and cannot be seeded, so draws are independent and a
    rerun reproduces the distribution, not the digits; the bound's selection is seeded
    with the draw number.

Beside Recall@100 each row gives the overlap of its top 100 with the exact top 100.
Caveats, also in the report: the key set is the items of the kept sequences (derived
from the data, standing in for a public catalogue), and the privacy unit is the
sequence key, so for session-split data the guarantee is per session.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from batch.evaluation import (
    MostPopular,
    Progress,
    Split,
    chance_level,
    describe,
    evaluate,
    leave_last_out,
    load_sequences,
)
from batch.importers import import_file
from bench.harness.report import machine_info
from inkling.config import PROJECT_ROOT
from inkling.errors import InvalidInputError, NotFoundError
from inkling.privacy.noisy_counts import CountMechanism, bound_contributions, count_mechanism
from inkling.privacy.settings import PrivacySettings

DATASETS_DIR = PROJECT_ROOT.parent / "shared" / "datasets"
DATASETS = {
    "ml-100k": ("ml-100k/ml-100k.inter", "recbole"),
    "diginetica": ("diginetica-sample/train-item-views.csv", "diginetica"),
}
K = 100


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class UnitPopularity:
    """The popularity source over per-unit counts: each training sequence is one unit
    (its user or session); an item's score is the number of units that interacted
    with it, bounded to `max_items` items per unit, released through `mechanism`
    (rounded, clamped at 0) when one is given. A `SequenceRecommender`."""

    def __init__(
        self,
        name: str,
        max_items: int,
        mechanism: CountMechanism | None = None,
        seed: int | None = None,
    ) -> None:
        self.name = name
        self.max_items = max_items
        self.mechanism = mechanism
        self.seed = seed
        self.popularity: np.ndarray | None = None

    def fit(self, split: Split, progress: Progress | None = None) -> None:
        seqs = split.train.seqs
        units = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
        keys = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        # Keys 1..n_items are the catalogue; 0 is padding and never occurs.
        bounded = bound_contributions(
            units, keys, split.n_items + 1, self.max_items, np.random.default_rng(self.seed)
        )
        counts = bounded.counts
        if self.mechanism is not None:
            counts = np.r_[0, np.maximum(self.mechanism.release(counts[1:]), 0)]
        self.popularity = counts.astype(np.float32)

    def score(
        self, histories: list[np.ndarray], flags: list[np.ndarray] | None = None
    ) -> np.ndarray:
        if self.popularity is None:
            raise InvalidInputError(f"{self.name} is not fitted")
        return np.broadcast_to(self.popularity, (len(histories), len(self.popularity))).copy()


@dataclass(frozen=True)
class Cell:
    """One variant at one setting, over its draws."""

    dataset: str
    sweep: str
    variant: str
    epsilon: float | None
    delta: float | None
    bound: int | None
    recall: list[float]
    overlap: list[float]

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "sweep": self.sweep,
            "variant": self.variant,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "bound": self.bound,
            "draws": len(self.recall),
            f"recall@{K}": _stats(self.recall),
            f"top{K}_overlap_with_exact": _stats(self.overlap),
        }


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def _top(scores: np.ndarray, k: int) -> set[int]:
    """The k best items (column 0, padding, excluded); ties broken by index."""
    order = np.lexsort((np.arange(len(scores) - 1), -scores[1:]))
    return {int(i) + 1 for i in order[:k]}


def load_split(name: str, root: Path) -> Split:
    """Import data set `name` into `root` with the project's importer; split it."""
    if name not in DATASETS:
        raise InvalidInputError(
            f"--datasets takes {', '.join(DATASETS)}; got {name!r}", field="datasets"
        )
    relative, fmt = DATASETS[name]
    source = DATASETS_DIR / relative
    if not source.exists():
        raise NotFoundError(f"data set {source} is absent (expected ../shared/datasets)")
    import_file(source, fmt, root / "events", root / "catalog")
    return leave_last_out(load_sequences(root / "events", by="auto"))


def measure(
    name: str,
    split: Split,
    epsilons: Sequence[float],
    bounds: Sequence[int],
    bound: int,
    delta: float,
    draws: int,
) -> tuple[list[Cell], dict[str, Any]]:
    """Every cell of both sweeps on one split, and the split's counts."""
    exact = MostPopular()
    exact.fit(split.without_test())
    if exact.popularity is None:
        raise InvalidInputError("most_popular did not fit")
    exact_top = _top(exact.popularity, K)
    longest = max(len(s) for s in split.train.seqs)
    cells: list[Cell] = []

    def run(sweep: str, variant: str, eps: float | None, dlt: float | None, k: int | None,
            make: Any, repeat: int) -> None:  # fmt: skip
        recall, overlap = [], []
        for draw in range(repeat):
            model = make(draw)
            model.fit(split.without_test())
            result = evaluate(model, split, k=K)
            recall.append(result["test"]["full"][f"recall@{K}"])
            overlap.append(len(_top(model.popularity, K) & exact_top) / K)
        cells.append(Cell(name, sweep, variant, eps, dlt, k, recall, overlap))
        c = cells[-1].summary()[f"recall@{K}"]
        _progress(
            f"{name} {sweep} {variant} eps={eps} delta={dlt} k={k}: "
            f"recall@{K} {c['mean']:.4f} ± {c['sd']:.4f}"
        )

    run("reference", "exact", None, None, None, lambda _: exact, 1)
    run("reference", "distinct", None, None, None,
        lambda _: UnitPopularity("distinct", longest), 1)  # fmt: skip
    for eps in epsilons:
        for variant, dlt in (("laplace", 0.0), ("gaussian", delta)):
            mechanism = count_mechanism(eps, dlt, bound)
            run("epsilon", variant, eps, dlt, bound,
                lambda d, m=mechanism: UnitPopularity(m.name, bound, m, seed=d), draws)  # fmt: skip
    for k in bounds:
        run("bound", "bounded", None, None, k,
            lambda d, k=k: UnitPopularity("bounded", k, seed=d), draws)  # fmt: skip
        mechanism = count_mechanism(1.0, 0.0, k)
        run("bound", "laplace", 1.0, 0.0, k,
            lambda d, k=k, m=mechanism: UnitPopularity("laplace", k, m, seed=d), draws)  # fmt: skip
    counts = describe(split)
    counts["chance_recall@100"] = chance_level(split, k=K)[f"recall@{K}"]
    return cells, counts


def markdown(cells: Sequence[Cell], meta: dict[str, Any]) -> str:
    lines = [
        f"# Differential privacy: Recall@{K} of the popularity source",
        "",
        f"Generated {meta['created_at']} by `{meta['command']}` in {meta['seconds']:.0f} s.",
        "",
        meta["protocol"],
        "",
    ]
    for dataset, counts in meta["datasets"].items():
        lines += [
            f"## {dataset}",
            "",
            f"{counts['sequences']} {counts['by']} sequences (the privacy unit), "
            f"{counts['items']} items, {counts['interactions']} interactions; chance "
            f"Recall@{K} {counts['chance_recall@100']:.4f}.",
            "",
            f"| sweep | variant | ε | δ | k | draws | Recall@{K} mean | sd | min | max "
            f"| top-{K} overlap with exact |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for cell in (c for c in cells if c.dataset == dataset):
            s = cell.summary()
            r, o = s[f"recall@{K}"], s[f"top{K}_overlap_with_exact"]
            lines.append(
                f"| {cell.sweep} | {cell.variant} | {_cell(cell.epsilon)} | {_cell(cell.delta)} "
                f"| {_cell(cell.bound)} | {s['draws']} | {r['mean']:.4f} | {r['sd']:.4f} "
                f"| {r['min']:.4f} | {r['max']:.4f} | {o['mean']:.2f} |"
            )
        lines.append("")
    lines += ["Notes:", "", *(f"- {n}" for n in meta["notes"]), "", "![recall](recall.png)", ""]
    return "\n".join(lines)


def _cell(value: float | int | None) -> str:
    return "–" if value is None else f"{value:g}"


def plot(
    cells: Sequence[Cell], datasets: Sequence[str], chance: dict[str, float], path: Path
) -> None:
    """Per data set: Recall@100 against ε (left) and against the bound at ε = 1 (right),
    mean ± sd over draws, with the no-noise references and chance as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(datasets), 2, figsize=(11, 3.6 * len(datasets)), squeeze=False, constrained_layout=True
    )
    for row, dataset in zip(axes, datasets, strict=True):
        own = [c for c in cells if c.dataset == dataset]
        refs = {c.variant: statistics.fmean(c.recall) for c in own if c.sweep == "reference"}
        for ax, sweep, x_of, label in (
            (row[0], "epsilon", lambda c: c.epsilon, "ε (log scale)"),
            (row[1], "bound", lambda c: c.bound, "k: items per unit (log scale), ε = 1"),
        ):
            for variant, colour in (
                ("laplace", "tab:blue"), ("gaussian", "tab:orange"), ("bounded", "tab:green")
            ):  # fmt: skip
                series = [c for c in own if c.sweep == sweep and c.variant == variant]
                if not series:
                    continue
                xs = [x_of(c) for c in series]
                means = [statistics.fmean(c.recall) for c in series]
                sds = [statistics.stdev(c.recall) if len(c.recall) > 1 else 0 for c in series]
                name = {"bounded": "bounded, no noise", "gaussian": "gaussian (δ > 0)"}
                ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, color=colour,
                            label=name.get(variant, variant))  # fmt: skip
            for variant, style in (("exact", "-"), ("distinct", ":")):
                if variant in refs:
                    ax.axhline(refs[variant], color="black", linestyle=style,
                               label=f"{variant} (no noise)")  # fmt: skip
            ax.axhline(chance[dataset], color="grey", linestyle="--", label="chance")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(f"test Recall@{K}")
            ax.set_title(f"{dataset}: by {sweep}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Path]:
    started = time.perf_counter()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    epsilons = _numbers(args.epsilons, float, "epsilons")
    bounds = _numbers(args.bounds, int, "bounds")
    if args.draws < 2:
        raise InvalidInputError(f"--draws must be at least 2, got {args.draws}", field="draws")
    machine = machine_info()
    cells: list[Cell] = []
    counts: dict[str, Any] = {}
    for name in datasets:
        with tempfile.TemporaryDirectory(prefix=f"dp-{name}-") as tmp:
            _progress(f"importing {name} ...")
            split = load_split(name, Path(tmp))
        found, counts[name] = measure(
            name, split, epsilons, bounds, args.bound, args.delta, args.draws
        )
        cells += found
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.dp_cost", *args.argv]),
        "seconds": time.perf_counter() - started,
        "config": {k: v for k, v in vars(args).items() if k != "argv"},
        "machine": machine,
        "datasets": counts,
        "protocol": (
            "Leave-last-out (batch.evaluation): each sequence's last item is the test "
            "target; the popularity source is fitted on the training part and ranks every "
            f"item not in the target's history (full ranking), Recall@{K} on the test part. "
            "DP variants release the training part's bounded per-unit counts through "
            "inkling.privacy (OpenDP), rounded and clamped at 0, as the export does."
        ),
        "notes": [
            "OpenDP's noise cannot be seeded: each DP cell is `draws` independent "
            "releases (mean, sd, min, max over them); the bound's selection is seeded "
            "by draw.",
            "exact counts events (repeats included) like item_pop_7d; distinct counts "
            "units; bounded keeps a random k distinct items per unit; laplace/gaussian "
            "add noise to bounded.",
            "The privacy unit is the sequence key (user, or session when the split is by "
            "session); the key set is the items of the kept sequences, standing in for a "
            "public catalogue (for data whose catalogue is derived from events, that set "
            "is not protected).",
            "The bound sweep picks no k: choosing k from private data spends privacy too; "
            "the [privacy] default was set without it.",
        ],
    }
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "recall.png"}
    document = {**meta, "cells": [c.summary() for c in cells], "raw": [c.__dict__ for c in cells]}
    paths["json"].write_text(json.dumps(document, indent=1) + "\n")
    paths["markdown"].write_text(markdown(cells, meta))
    chance = {name: c["chance_recall@100"] for name, c in counts.items()}
    plot(cells, datasets, chance, paths["plot"])
    return paths


def _numbers(text: str, kind: type, flag: str) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidInputError(f"--{flag} takes comma separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise InvalidInputError(f"--{flag} takes positive numbers, got {text!r}", field=flag)
    return values


def build_parser() -> argparse.ArgumentParser:
    default_bound = PrivacySettings().max_items_per_user
    p = argparse.ArgumentParser(prog="python -m bench.dp_cost", description=__doc__.split("\n")[0])
    p.add_argument(
        "--datasets", default="ml-100k,diginetica",
        help=f"comma separated, of {', '.join(DATASETS)} (default: both)",
    )  # fmt: skip
    p.add_argument(
        "--epsilons", default="0.1,0.5,1,2,5", help="the ε sweep (default 0.1,0.5,1,2,5)"
    )
    p.add_argument(
        "--bound", type=int, default=default_bound,
        help=f"items per unit in the ε sweep (default {default_bound}, the [privacy] default)",
    )  # fmt: skip
    p.add_argument(
        "--bounds", default="1,3,10,30,100", help="the bound sweep at ε = 1 (default 1,3,10,30,100)"
    )
    p.add_argument(
        "--delta", type=float, default=1e-6, help="δ of the gaussian rows (default 1e-6)"
    )
    p.add_argument("--draws", type=int, default=10, help="releases per DP cell (default 10)")
    p.add_argument(
        "--out", default="data/bench/privacy", help="report directory (default data/bench/privacy)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        paths = run(args)
    except (InvalidInputError, NotFoundError) as e:
        print(f"bench.dp_cost: error: {e}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text())
    print(f"report: {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
