"""`inkling bench ranker`: the learned ranker's scoring cost per inference form, one thread.

Loads the registry's CURRENT `ranker`, then scores requests of `--candidates` items
with a history of `--seq-len` items, open-loop at `--rate` for `--duration` seconds,
in each form of `inkling.models.inference`: eager torch, TorchScript, `torch.export`
and ONNX Runtime. Before timing, every form scores the same inputs as eager torch
and the largest difference is reported. One thread (`torch.set_num_threads(1)`,
one ONNX Runtime intra-op thread), as one ranking worker process would use.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness.loadgen import run_open_loop, sync_call
from bench.harness.report import machine_info, write_report
from inkling.config import Settings
from inkling.models import SasRecRecommender
from inkling.models.inference import FORMS, build_form, largest_difference, pad, random_inputs
from inkling.models.registry import ModelRegistry


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
    n, max_len = model.n_items, model.config.max_len
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        forms, build_s = {}, {}
        for name in FORMS:
            began = time.perf_counter()
            forms[name] = build_form(model, name, Path(tmp))
            build_s[name] = time.perf_counter() - began
        checks = random_inputs(model, count=2 * (max_len + 1), seed=seed)
        for name in FORMS[1:]:
            worst = largest_difference(forms["eager"], forms[name], checks)
            notes.append(
                f"{name}: built in {build_s[name]:.1f} s; largest score difference from eager "
                f"torch over {len(checks)} inputs (every length 0..{max_len}): {worst:.2e}."
            )

        def call(form_name: str):  # type: ignore[no-untyped-def]
            form = forms[form_name]

            def score() -> np.ndarray:
                history = rng.integers(1, n + 1, seq_len)
                flags = rng.integers(0, 2, seq_len)
                chosen = rng.integers(1, n + 1, candidates)
                return form(*pad(history, flags, max_len))[chosen]

            return score

        async def measure() -> list:
            return [
                await run_open_loop(
                    sync_call(call(name)), rate=rate, duration_s=duration_s, name=name
                )
                for name in FORMS
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
            "max_len": max_len,
            "rate": rate,
            "duration_s": duration_s,
            "threads": 1,
        },
        machine=machine_info(),
        notes=[
            *notes,
            "Each request scores the whole catalogue in one forward pass over a history "
            f"left-padded to {max_len} and gathers the candidates, as the ranking server does.",
        ],
    )
    print(paths["markdown"].read_text())
    return paths
