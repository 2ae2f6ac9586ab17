"""The ranker's inference forms agree with eager torch; the server picks checked ONNX."""

from pathlib import Path

import numpy as np
import pytest
import torch

from inkling.errors import InvalidInputError
from inkling.models import SasRecConfig, SasRecRecommender
from inkling.models.inference import (
    FORMS,
    ONNX_FILE,
    TOLERANCE,
    build_form,
    largest_difference,
    pad,
    random_inputs,
    serving_form,
    write_checked_onnx,
)
from inkling.models.sasrec import ItemAttributes, SasRecNet


@pytest.fixture(scope="module")
def model() -> SasRecRecommender:
    torch.manual_seed(0)
    m = SasRecRecommender(SasRecConfig(max_len=12, hidden=16, n_heads=2))
    m.item_ids = ["<pad>", *(f"i{k}" for k in range(1, 41))]
    m.attributes = ItemAttributes.build(
        [None, *("ab"[k % 2] for k in range(40))], [None, *(float(k) for k in range(40))]
    )
    net = SasRecNet(40, m.config, m.attributes.n_categories, m.attributes.n_price_buckets)
    net.item_cat.copy_(torch.from_numpy(m.attributes.categories))
    net.item_price.copy_(torch.from_numpy(m.attributes.price_buckets))
    m.net = net.eval()
    return m


def test_pad_keeps_the_newest_and_checks_lengths() -> None:
    items, flags = pad(np.array([5, 6, 7]), np.array([1, 0, 1]), 5)
    assert items.tolist() == [[0, 0, 5, 6, 7]] and flags.tolist() == [[0, 0, 1, 0, 1]]
    items, _ = pad(np.arange(1, 10), np.ones(9, int), 4)
    assert items.tolist() == [[6, 7, 8, 9]]
    with pytest.raises(InvalidInputError, match="3 items but 2 flags"):
        pad(np.array([1, 2, 3]), np.array([1, 1]), 5)


def test_every_form_scores_like_eager_torch(model, tmp_path: Path) -> None:
    inputs = random_inputs(model, count=26)
    eager = build_form(model, "eager")
    # The padded forward agrees with the model's own (unpadded) scoring.
    items, flags = np.array([3, 9, 4]), np.array([1, 0, 1])
    np.testing.assert_allclose(
        eager(*pad(items, flags, 12))[1:], model.score([items], [flags])[0][1:], atol=1e-5
    )
    for name in FORMS[1:]:
        assert largest_difference(eager, build_form(model, name, tmp_path), inputs) < TOLERANCE
    with pytest.raises(InvalidInputError, match="form must be one of"):
        build_form(model, "tensorrt")


def test_checked_onnx_is_what_the_server_scores_through(model, tmp_path: Path) -> None:
    path, message = write_checked_onnx(model, tmp_path)
    assert path == tmp_path / ONNX_FILE and path.is_file() and "checked" in message
    form, name = serving_form(model, tmp_path)
    assert name == "onnxruntime"
    items, flags = pad(np.array([1, 2, 3]), np.array([1, 1, 1]), 12)
    np.testing.assert_allclose(
        form(items, flags)[1:], build_form(model, "eager")(items, flags)[1:], atol=TOLERANCE
    )
    # Without the file the server falls back to TorchScript.
    assert serving_form(model, tmp_path / "elsewhere")[1] == "torchscript"


def test_an_untrained_model_cannot_be_exported(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not trained"):
        build_form(SasRecRecommender(), "eager")
    path, message = write_checked_onnx(SasRecRecommender(), tmp_path)
    assert path is None and "failed" in message and not (tmp_path / ONNX_FILE).exists()
