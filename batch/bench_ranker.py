"""`inkling bench ranker`: the learned ranker's scoring cost on one CPU thread.

Loads the registry's CURRENT `ranker`, then scores requests of `--candidates` items
with a history of `--seq-len` items, open-loop at `--rate` for `--duration` seconds,
two ways: the eager torch model (`SasRecRecommender.score`) and its TorchScript copy.
Before timing, both are run on the same inputs and their scores compared. One thread
(`torch.set_num_threads(1)`), as one ranking worker process would use.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch

from inkling.config import Settings
from inkling.loadgen import machine_info, run_open_loop, sync_call, write_report
from inkling.models import SasRecRecommender
from inkling.registry import ModelRegistry


def run_ranker_benchmark(
    settings: Settings,
    *,
    candidates: int,
    seq_len: int,
    rate: float,
    duration_s: float,
    out: Path,
    seed: int = 0,
) -> dict[str, Path]:
    torch.set_num_threads(1)
    registry = ModelRegistry(settings.data_dir / "registry")
    manifest, path = registry.current("ranker")
    model = SasRecRecommender.load(path)
    scripted = model.scripted()
    n = model.n_items
    rng = np.random.default_rng(seed)

    def request() -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(1, n + 1, seq_len), rng.integers(1, n + 1, candidates)

    def eager() -> np.ndarray:
        history, chosen = request()
        return model.score([history])[0][chosen]

    def script() -> np.ndarray:
        history, chosen = request()
        with torch.inference_mode():
            scores = scripted(torch.from_numpy(history[-model.config.max_len :][None, :]))
        return scores[0].numpy()[chosen]

    worst = 0.0
    for _ in range(20):
        history, chosen = request()
        a = model.score([history])[0][chosen]
        with torch.inference_mode():
            b = scripted(torch.from_numpy(history[-model.config.max_len :][None, :]))[0].numpy()
        worst = max(worst, float(np.abs(a - b[chosen]).max()))

    async def measure() -> list:
        return [
            await run_open_loop(sync_call(eager), rate=rate, duration_s=duration_s, name="eager"),
            await run_open_loop(
                sync_call(script), rate=rate, duration_s=duration_s, name="torchscript"
            ),
        ]

    results = asyncio.run(measure())
    paths = write_report(
        results,
        out,
        title="inkling ranker scoring benchmark",
        config={
            "model": f"{manifest.model}:{manifest.version}",
            "n_items": n,
            "candidates": candidates,
            "seq_len": seq_len,
            "rate": rate,
            "duration_s": duration_s,
            "threads": 1,
        },
        machine=machine_info(),
        notes=[
            f"Largest score difference between eager and TorchScript on 20 requests: {worst:.2e}.",
            "Each request scores the whole catalogue in one forward pass and gathers the "
            "candidates, as the ranking server does.",
        ],
    )
    print(paths["markdown"].read_text())
    return paths
