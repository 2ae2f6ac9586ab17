"""Ranker configurations at equal wall-clock: test metrics and learning curves.

    python -m bench.ranker_quality --data-dir DIR --dataset ml-100k --seconds 600 \\
        --config today:loss=full --config logq:loss=logq,ffn=swiglu --parallel 2

Reads the event log (and catalogue) of an inkling data directory, or draws the
synthetic log of `bench.ranker_train` (``--synthetic-items``), makes the
leave-last-out split `inkling evaluate` makes, and trains one SASRec per
``--config`` (``name:field=value,...`` over `SasRecConfig`'s fields, each on top of
the defaults) with the same time budget (`max_train_seconds`), early stopping on
validation NDCG@10 as always. Runs go to ``--parallel`` spawned processes with
``--threads`` torch threads each, so configurations that run side by side share the
machine alike. Most popular and ItemKNN are scored first, on their own, for scale.

Writes ``quality.json``, ``quality.md`` (test Recall@10 / NDCG@10 / MRR under full
ranking and the sampled-100 protocol, each run's epochs and seconds per epoch) and
``curves.png`` (validation NDCG@10 and Recall@10 against wall-clock seconds since
training began, evaluation time included) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.harness.report import machine_info
from inkling.errors import InvalidInputError
from inkling.models.sasrec import SasRecConfig


def parse_config(spec: str) -> tuple[str, dict[str, Any]]:
    """``name:field=value,field=value`` → (name, overrides typed like the field)."""
    name, _, body = spec.partition(":")
    if not name.strip():
        raise InvalidInputError(f"--config {spec!r}: give it a name, as name:field=value")
    return name.strip(), SasRecConfig.parse_overrides(body)


def _split(source: dict[str, Any]) -> Any:
    """The leave-last-out split of an inkling data directory's event log, or of
    `bench.ranker_train.synthetic_sequences` (``synthetic_items`` set)."""
    import numpy as np

    from batch.evaluation import PAD, Sequences, leave_last_out, load_sequences

    if source.get("synthetic_items"):
        from bench.ranker_train import synthetic_sequences

        n_items = int(source["synthetic_items"])
        seqs = synthetic_sequences(n_items, int(source["synthetic_users"]), 40.0, seed=0)
        used = np.unique(np.concatenate(seqs))  # items nobody saw are not in the vocabulary
        remap = np.zeros(n_items + 1, dtype=np.int64)
        remap[used] = np.arange(1, len(used) + 1)
        return leave_last_out(
            Sequences(
                item_ids=[PAD, *(f"i{i}" for i in used)],
                keys=[f"u{n}" for n in range(len(seqs))],
                seqs=[remap[s] for s in seqs],
                by="user",
            )
        )
    data_dir = Path(source["data_dir"])
    sequences = load_sequences(
        data_dir / "events", by=source["by"], catalog=data_dir / "catalog" / "items.parquet"
    )
    return leave_last_out(sequences)


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in its own process."""
    import torch

    from batch.evaluation import evaluate
    from inkling.models import SasRecRecommender

    torch.set_num_threads(job["threads"])
    torch.set_num_interop_threads(1)
    split = _split(job["source"])
    config = SasRecConfig(**{**job["values"], "max_train_seconds": job["seconds"]})
    model = SasRecRecommender(config, name=job["name"])
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, file=sys.stderr, flush=True)

    began = time.perf_counter()
    model.fit(split.without_test(), progress=say)
    fit_s = time.perf_counter() - began
    result = evaluate(model, split)
    return {
        "name": job["name"],
        "overrides": job["values"],
        "config": asdict(config),
        "loss": config.resolved_loss(split.n_items),
        "fit_s": fit_s,
        "epochs": len(model.epoch_losses),
        "best_epoch": model.best_epoch,
        "s_per_epoch": sum(model.epoch_seconds) / max(len(model.epoch_seconds), 1),
        "positions_per_s": sum(model.epoch_examples) / max(sum(model.epoch_seconds), 1e-9),
        "history": model.history,
        "test": result["test"],
        "valid": result["valid"],
        "log": lines,
    }


def _baselines(split: Any) -> list[dict[str, Any]]:
    from batch.evaluation import ItemKNN, MostPopular, evaluate_all

    return [
        {"name": r["model"], "test": r["test"], "fit_s": r["fit_s"]}
        for r in evaluate_all([MostPopular(), ItemKNN()], split)
    ]


def _table(rows: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> str:
    first = rows[0]["test"]["full"]["ndcg@10"] if rows else None
    out = [
        "| model | loss | epochs (best) | s/epoch | Recall@10 | NDCG@10 | MRR | "
        "sampled HR@10 | sampled NDCG@10 | NDCG@10 vs first |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in baselines:
        t = b["test"]
        out.append(
            f"| {b['name']} | | | | {t['full']['recall@10']:.4f} | {t['full']['ndcg@10']:.4f} | "
            f"{t['full']['mrr']:.4f} | {t['sampled']['hr@10']:.4f} | "
            f"{t['sampled']['ndcg@10']:.4f} | |"
        )
    for r in rows:
        t = r["test"]
        change = (t["full"]["ndcg@10"] / first - 1) * 100 if first else 0.0
        out.append(
            f"| {r['name']} | {r['loss']} | {r['epochs']} ({r['best_epoch']}) | "
            f"{r['s_per_epoch']:.1f} | {t['full']['recall@10']:.4f} | "
            f"{t['full']['ndcg@10']:.4f} | {t['full']['mrr']:.4f} | {t['sampled']['hr@10']:.4f} | "
            f"{t['sampled']['ndcg@10']:.4f} | {change:+.1f} % |"
        )
    return "\n".join(out)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Validation NDCG@10 and Recall@10 of each run against wall-clock seconds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_ndcg, ax_recall = fig.subplots(1, 2)
    for r in rows:
        seconds = [h["elapsed_s"] for h in r["history"]]
        ax_ndcg.plot(
            seconds, [h["valid_ndcg10"] for h in r["history"]], "o-", ms=3, label=r["name"]
        )
        ax_recall.plot(seconds, [h["valid_recall10"] for h in r["history"]], "o-", ms=3)
    ax_ndcg.set(title=f"{title}: validation NDCG@10", xlabel="wall-clock s", ylabel="NDCG@10")
    ax_recall.set(title="validation Recall@10", xlabel="wall-clock s", ylabel="Recall@10")
    ax_ndcg.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="an inkling data directory (events/, catalog/)")
    p.add_argument(
        "--synthetic-items", type=int,
        help="instead of --data-dir: bench.ranker_train's synthetic log over this many items",
    )  # fmt: skip
    p.add_argument("--synthetic-users", type=int, default=5000, help="users of the synthetic log")
    p.add_argument("--dataset", required=True, help="the data's name in the report")
    p.add_argument("--by", default="auto", choices=["auto", "user", "session"])
    p.add_argument("--seconds", type=float, default=600.0, help="training budget per run")
    p.add_argument(
        "--config", action="append", required=True,
        help="name:field=value,... over SasRecConfig (repeat; the first is the reference)",
    )  # fmt: skip
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", required=True, help="report directory")
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.config]
    names = [n for n, _ in configs]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"--config names must differ: {names}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (args.data_dir is None) == (args.synthetic_items is None):
        raise InvalidInputError("give --data-dir or --synthetic-items (one of them)")
    source = {
        "data_dir": args.data_dir, "by": args.by,
        "synthetic_items": args.synthetic_items, "synthetic_users": args.synthetic_users,
    }  # fmt: skip
    from batch.evaluation import protocol

    split = _split(source)
    print(
        f"[quality] {args.dataset}: {len(split.train.seqs)} sequences, {split.n_items} items",
        file=sys.stderr,
    )
    baselines = _baselines(split)
    jobs = [
        {"name": name, "values": values, "seconds": args.seconds, "threads": args.threads}
        | {"source": source}
        for name, values in configs
    ]
    began = time.perf_counter()
    # A fresh process per run: torch's thread settings can be made once per process.
    with multiprocessing.get_context("spawn").Pool(args.parallel, maxtasksperchild=1) as pool:
        rows = pool.map(_run, jobs, chunksize=1)
    report = {
        "dataset": args.dataset,
        "seconds": args.seconds,
        "parallel": args.parallel,
        "threads_per_run": args.threads,
        "machine": machine_info(),
        "wall_s": time.perf_counter() - began,
        "protocol": protocol(split),
        "baselines": baselines,
        "runs": rows,
    }
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    table = _table(rows, baselines)
    (out / "quality.md").write_text(
        f"# {args.dataset}: ranker configurations at {args.seconds:g} s each\n\n{table}\n\n"
        f"Test part, full ranking unless 'sampled' (100 negatives). {args.parallel} runs at a "
        f"time, {args.threads} torch thread(s) each.\n\n{report['protocol']}\n"
    )
    plot_curves(rows, out / "curves.png", args.dataset)
    print(table)
    print(f"report: {out / 'quality.md'}; curves: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
