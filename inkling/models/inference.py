"""The ranker's inference forms: eager torch, TorchScript, `torch.export` and ONNX Runtime.

Every form takes one request's input left-padded to a fixed ``[1, max_len]`` (the
model's output does not depend on left padding) and returns the catalogue's scores
``[n_items + 1]`` as float32. A fixed shape lets `torch.export` and ONNX specialise
the graph; one request is one row because the ranking server scores one request
per call.

`inkling bench ranker` measures all four on one thread and checks that they agree
with eager torch. ONNX Runtime was the fastest there (see the README's numbers),
so `inkling train` writes ``model.onnx`` beside the weights after checking that its
scores equal the eager model's (:data:`TOLERANCE`), and the ranking server scores
through it; without the file (or without onnxruntime) it uses TorchScript.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from inkling.errors import InvalidInputError

if TYPE_CHECKING:
    from inkling.models.sasrec import SasRecRecommender

FORMS = ("eager", "torchscript", "torch.export", "onnxruntime")
ONNX_FILE = "model.onnx"
TOLERANCE = 1e-4
"""Largest absolute score difference from eager torch that counts as equal."""

Form = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(items int64 [1, max_len], flags int64 [1, max_len]) → float32 scores [n_items + 1]."""


def pad(items: np.ndarray, flags: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The newest ``max_len`` items and flags, left-padded with 0 to ``[1, max_len]``."""
    items = np.asarray(items, dtype=np.int64)[-max_len:]
    flags = np.asarray(flags, dtype=np.int64)[-max_len:]
    if len(items) != len(flags):
        raise InvalidInputError(f"{len(items)} items but {len(flags)} flags", field="flags")
    out_items = np.zeros((1, max_len), dtype=np.int64)
    out_flags = np.zeros((1, max_len), dtype=np.int64)
    if len(items):
        out_items[0, max_len - len(items) :] = items
        out_flags[0, max_len - len(items) :] = flags
    return out_items, out_flags


def _example(model: SasRecRecommender) -> tuple[torch.Tensor, torch.Tensor]:
    n = model.config.max_len
    items = torch.arange(n, dtype=torch.int64) % model.n_items + 1
    return items[None, :], (torch.arange(n, dtype=torch.int64) % 2)[None, :]


def _cpu_net(model: SasRecRecommender) -> torch.nn.Module:
    net = model.net
    if net is None:
        raise InvalidInputError(f"{model.name} is not trained; nothing to export")
    return copy.deepcopy(net).cpu().eval()


def export_onnx(model: SasRecRecommender, path: Path) -> Path:
    """Write the scoring forward as ONNX (fixed input ``[1, max_len]``) to ``path``."""
    net = _cpu_net(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter logs a warning per torchvision operator it cannot register; none is used.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                net, _example(model), dynamo=True, verbose=False, input_names=["items", "flags"]
            )
    finally:
        quiet.setLevel(level)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path))
    return path


def onnx_session_form(path: Path, threads: int = 1) -> Form:
    """An ONNX Runtime session on ``path`` with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(items: np.ndarray, flags: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {names[0]: items, names[1]: flags})[0][0])

    return run


def build_form(model: SasRecRecommender, form: str, workdir: Path | None = None) -> Form:
    """One inference form of a trained model. ``workdir`` holds the ONNX file (a
    ``model.onnx`` already there is used as it is)."""
    if form not in FORMS:
        raise InvalidInputError(f"form must be one of {', '.join(FORMS)}; got {form!r}", "form")
    net = _cpu_net(model)
    if form == "eager":

        def eager(items: np.ndarray, flags: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return net(torch.from_numpy(items), torch.from_numpy(flags))[0].numpy()

        return eager
    if form == "torchscript":
        module = model.scripted()

        def script(items: np.ndarray, flags: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(items), torch.from_numpy(flags))[0].numpy()

        return script
    if form == "torch.export":
        exported = torch.export.export(net, _example(model)).module()

        def export(items: np.ndarray, flags: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return exported(torch.from_numpy(items), torch.from_numpy(flags))[0].numpy()

        return export
    if workdir is None:
        raise InvalidInputError("the onnxruntime form needs a workdir for model.onnx", "workdir")
    path = workdir / ONNX_FILE
    if not path.is_file():
        export_onnx(model, path)
    return onnx_session_form(path)


def largest_difference(
    reference: Form, other: Form, inputs: Sequence[tuple[np.ndarray, np.ndarray]]
) -> float:
    """Largest absolute score difference (padding column excluded) over ``inputs``."""
    worst = 0.0
    for items, flags in inputs:
        a, b = reference(items, flags)[1:], other(items, flags)[1:]
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def random_inputs(
    model: SasRecRecommender, count: int = 20, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Padded inputs of every length from 0 to ``max_len`` (cycled), random items and flags."""
    rng = np.random.default_rng(seed)
    n, out = model.config.max_len, []
    for k in range(count):
        length = k % (n + 1)
        out.append(pad(rng.integers(1, model.n_items + 1, length), rng.integers(0, 2, length), n))
    return out


def write_checked_onnx(model: SasRecRecommender, directory: Path) -> tuple[Path | None, str]:
    """Export ``model.onnx`` into ``directory`` and keep it only if its scores equal the
    eager model's; returns (path or None, what happened)."""
    path = directory / ONNX_FILE
    try:
        export_onnx(model, path)
        worst = largest_difference(
            build_form(model, "eager"), onnx_session_form(path), random_inputs(model)
        )
    except Exception as exc:  # an exporter or runtime failure leaves TorchScript serving
        path.unlink(missing_ok=True)
        return None, f"ONNX export failed ({type(exc).__name__}: {exc}); serving TorchScript"
    if worst > TOLERANCE:
        path.unlink()
        return None, f"ONNX scores differ by {worst:.2e} > {TOLERANCE}; serving TorchScript"
    return path, f"ONNX export checked (largest difference {worst:.2e})"


def serving_form(model: SasRecRecommender, directory: Path) -> tuple[Form, str]:
    """What the ranking server scores through: ONNX Runtime when ``directory`` holds a
    checked ``model.onnx`` and onnxruntime imports, else TorchScript."""
    path = directory / ONNX_FILE
    if path.is_file():
        try:
            return onnx_session_form(path), "onnxruntime"
        except ImportError:
            pass
    return build_form(model, "torchscript"), "torchscript"
