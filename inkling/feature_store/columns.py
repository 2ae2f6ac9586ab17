"""What a model reads, resolved from the Feast registry.

A model declares its features once, as a Feast `FeatureService`; `resolve_service`
turns it into `ServiceColumns`: per view, the Redis hash field of every feature, its
value type, the entity join key and the TTL. Nothing here touches Redis.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from feast import FeatureStore
from feast.errors import FeatureServiceNotFoundException, FeatureViewNotFoundException
from feast.value_type import ValueType

from inkling.errors import ConfigurationError, NotFoundError
from inkling.feature_store import feast_codec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureColumn:
    """One feature of a view: its Feast value type and the Redis hash field holding it."""

    name: str
    value_type: ValueType
    redis_field: bytes


@dataclass(frozen=True)
class ViewColumns:
    """The features a service takes from one feature view, and how to find them in Redis."""

    name: str
    storage_name: str
    """The name Feast derives Redis fields from: the view's, `_v<N>`-suffixed under versioning."""
    join_key: str
    features: tuple[FeatureColumn, ...]
    ttl: timedelta | None

    @property
    def ts_field(self) -> bytes:
        return f"_ts:{self.storage_name}".encode()

    @property
    def ttl_ns(self) -> int | None:
        """The TTL in nanoseconds; None when the view has none (Feast treats 0 as none)."""
        if not self.ttl:
            return None
        return self.ttl // timedelta(microseconds=1) * 1000

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


@dataclass(frozen=True)
class ServiceColumns:
    """A feature service resolved from the registry: its views in the service's order."""

    service: str
    project: str
    views: tuple[ViewColumns, ...]

    def view(self, name: str) -> ViewColumns:
        for v in self.views:
            if v.name == name:
                return v
        raise NotFoundError(f"feature service {self.service} has no feature view {name}")

    def views_keyed_by(self, join_key: str) -> tuple[ViewColumns, ...]:
        return tuple(v for v in self.views if v.join_key == join_key)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for v in self.views for f in v.features)


def resolve_service(store: FeatureStore, service_name: str) -> ServiceColumns:
    """The columns of `service_name` as the registry declares them.

    Raises:
        ConfigurationError: the service does not exist, or uses something this reader
            does not (on-demand views, several or non-string entities, join-key maps).
    """
    try:
        service = store.get_feature_service(service_name)
    except FeatureServiceNotFoundException as e:
        raise ConfigurationError(
            f"feature service {service_name!r} is not in the Feast registry of project "
            f"{store.project}; run `feast apply`?"
        ) from e
    versioning = bool(store.config.registry.enable_online_feature_view_versioning)
    views = []
    for projection in service.feature_view_projections:
        where = f"feature service {service_name}, view {projection.name}"
        try:
            view = store.get_feature_view(projection.name)
        except FeatureViewNotFoundException as e:
            raise ConfigurationError(
                f"{where}: not a batch/stream feature view in the registry (on-demand "
                "feature views are not served by the online reader)"
            ) from e
        if len(view.entities) != 1:
            raise ConfigurationError(f"{where}: the reader supports one entity per view")
        if projection.join_key_map:
            raise ConfigurationError(f"{where}: join_key_map is not supported")
        entity = store.get_entity(view.entities[0])
        if entity.value_type not in (ValueType.STRING, ValueType.UNKNOWN):
            raise ConfigurationError(
                f"{where}: entity {entity.name} has {entity.value_type.name} keys; only strings"
            )
        storage_name = view.name
        if versioning:
            version = projection.version_tag
            if version is None:
                version = getattr(view, "current_version_number", None)
            if version:
                storage_name = f"{view.name}_v{version}"
        features = tuple(
            FeatureColumn(
                name=f.name,
                value_type=f.dtype.to_value_type(),
                redis_field=feast_codec.field_key(storage_name, f.name),
            )
            for f in projection.features
        )
        views.append(
            ViewColumns(
                name=view.name,
                storage_name=storage_name,
                join_key=entity.join_key,
                features=features,
                ttl=view.ttl,
            )
        )
    return ServiceColumns(service=service_name, project=store.project, views=tuple(views))
