"""The model registry: immutable versions, an atomic CURRENT pointer, manifest checks."""

from datetime import timedelta

import pytest
from feast.value_type import ValueType

from inkling.errors import ConfigurationError, InvalidInputError, NotFoundError
from inkling.feature_store.columns import FeatureColumn, ServiceColumns, ViewColumns
from inkling.models.registry import ModelRegistry, check_feature_service, service_columns


def _service(*features: tuple[str, str, ValueType]) -> ServiceColumns:
    views: dict[str, list[FeatureColumn]] = {}
    for view, name, kind in features:
        views.setdefault(view, []).append(FeatureColumn(name, kind, b"\0\0\0\0"))
    return ServiceColumns(
        service="ranker_v1",
        project="inkling",
        views=tuple(
            ViewColumns(v, v, "item_id", tuple(fs), timedelta(days=1)) for v, fs in views.items()
        ),
    )


LIVE = _service(
    ("item_features", "item_pop_7d", ValueType.INT64),
    ("item_features", "item_category", ValueType.STRING),
)


def _artifact(tmp_path, text="weights"):
    d = tmp_path / f"artifact-{text}"
    d.mkdir()
    (d / "model.bin").write_text(text)
    return d


def test_publish_versions_and_move_the_current_pointer(tmp_path):
    reg = ModelRegistry(tmp_path / "registry")
    columns = service_columns(LIVE)
    a = reg.publish(_artifact(tmp_path, "a"), model="ranker", kind="baseline",
                    feature_service="ranker_v1", columns=columns, version="v1",
                    metrics={"ndcg@10": 0.1}, make_current=True)  # fmt: skip
    assert a.files == ["model.bin"] and a.columns == columns
    reg.publish(_artifact(tmp_path, "b"), model="ranker", kind="baseline",
                feature_service="ranker_v1", columns=columns, version="v2")  # fmt: skip
    assert reg.versions("ranker") == ["v1", "v2"]
    manifest, path = reg.current("ranker")
    assert manifest.version == "v1" and (path / "model.bin").read_text() == "a"
    reg.set_current("ranker", "v2")
    assert reg.current_version("ranker") == "v2"
    assert reg.current("ranker")[0].metrics == {}


def test_a_version_is_never_overwritten_and_pointers_need_a_target(tmp_path):
    reg = ModelRegistry(tmp_path)
    kwargs = dict(model="m", kind="k", feature_service="s", columns={}, version="v1")
    reg.publish(_artifact(tmp_path), **kwargs)
    with pytest.raises(InvalidInputError, match="already has a version v1"):
        reg.publish(_artifact(tmp_path, "again"), **kwargs)
    with pytest.raises(NotFoundError):
        reg.set_current("m", "v9")
    with pytest.raises(NotFoundError, match="no current version"):
        reg.current("m")
    with pytest.raises(InvalidInputError):
        reg.path("../escape", "v1")


def test_manifest_must_match_the_live_feature_service():
    reg_columns = service_columns(LIVE)
    from inkling.models.registry import Manifest

    manifest = Manifest("ranker", "v1", "baseline", "ranker_v1", reg_columns)
    check_feature_service(manifest, LIVE)
    with pytest.raises(ConfigurationError, match="does not have"):
        check_feature_service(manifest, None)
    changed = _service(
        ("item_features", "item_pop_7d", ValueType.DOUBLE),
        ("item_features", "item_price", ValueType.DOUBLE),
    )
    with pytest.raises(ConfigurationError) as info:
        check_feature_service(manifest, changed)
    message = str(info.value)
    assert "missing now: item_features:item_category" in message
    assert "added since training: item_features:item_price" in message
    assert "item_features:item_pop_7d (INT64 -> DOUBLE)" in message
