"""The retrieval process's composition root: what it loads and how it is wired."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import grpc
from feast import FeatureStore

from inkling.config import Settings
from inkling.errors import ConfigurationError
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import open_store
from inkling.feature_store.rows import RowReader, open_async_redis
from inkling.models.ann import AnnIndex
from inkling.models.embeddings import load_embeddings
from inkling.models.registry import Manifest, ModelRegistry, check_servable
from inkling.serving.runtime import DeferredServicer
from inkling.serving.settings import RetrievalSettings
from inkling.serving.stages import CatalogRefresher, ItemTable
from inkling.telemetry.instruments import (
    clear_model_info,
    declare_counters,
    set_model_info,
    track_snapshot,
)
from inkling.v1 import retrieval_service_pb2, retrieval_service_pb2_grpc
from retrieval_server.core import (
    AnnSpace,
    EmbeddingSpace,
    RetrievalCore,
    RetrievalLimits,
    TwoTowerSpace,
)
from retrieval_server.service import RetrievalServicer

log = logging.getLogger("inkling.retrieval")
SERVICE_DESCRIPTOR = retrieval_service_pb2.DESCRIPTOR.services_by_name["RetrievalService"]
SERVICE = SERVICE_DESCRIPTOR.full_name
TWO_TOWER = "two-tower"


def model_dirs(settings: Settings, rs: RetrievalSettings) -> tuple[Path, Path]:
    models = settings.data_dir / "models"
    return rs.embeddings_dir or models / "als", rs.index_dir or models / "index"


class RetrievalApp:
    """Loads the item snapshot and the ANN space, then serves.

    The ANN space is the registry's CURRENT two-tower version of `rs.model` when there
    is one (checked against the live Feast registry; a bad one refuses to start), else
    the ALS embeddings and their index. A new CURRENT is loaded and warmed beside the
    serving space and swapped in with one assignment; requests in flight keep the
    space they started with.
    """

    service_names: tuple[str, ...] = (SERVICE,)

    def __init__(self, settings: Settings, rs: RetrievalSettings) -> None:
        self.settings = settings
        self.rs = rs
        self.refresher: CatalogRefresher | None = None
        self._space: AnnSpace | None = None
        self._core: RetrievalCore | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._untrack: Callable[[], None] = lambda: None

    def register(self, server: grpc.aio.Server) -> None:
        gate = DeferredServicer(SERVICE_DESCRIPTOR, self._loaded_servicer, "retrieval")
        retrieval_service_pb2_grpc.add_RetrievalServiceServicer_to_server(gate, server)

    def _loaded_servicer(self) -> RetrievalServicer | None:
        return self.servicer if self._core is not None else None

    @property
    def space(self) -> AnnSpace | None:
        return self._space

    @property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.rs.registry_dir or self.settings.data_dir / "registry")

    def _remap(self, table: ItemTable) -> None:
        if self._space is not None:
            self._space = self._space.with_table(table)

    def _check_manifest(self, store: FeatureStore, version: str) -> Manifest:
        """The version's manifest, checked against the live Feast registry and this server."""
        manifest = self.registry.manifest(self.rs.model, version)
        check_servable(manifest, store, self.rs.feature_service, TWO_TOWER)
        return manifest

    def _load_two_tower(self, store: FeatureStore, version: str, table: ItemTable) -> TwoTowerSpace:
        """Load a published two-tower version (checked first), warm its query tower."""
        from inkling.models.two_tower import TwoTowerModel

        manifest = self._check_manifest(store, version)
        path = self.registry.path(self.rs.model, version)
        model = TwoTowerModel.load(path)
        index = AnnIndex.load(path / "index" / "index.faiss")
        if (index.size, index.dim) != (model.vocab.n_items, model.config.dim):
            raise ConfigurationError(
                f"model {manifest.model} {version}: its index holds {index.size} vectors of "
                f"dimension {index.dim}, its item tower {model.vocab.n_items} of "
                f"{model.config.dim}"
            )
        encoder = model.encoder(scripted=True)
        encoder.encode(None, None, model.vocab.item_ids[:1])  # first call pays lazy set-up
        return TwoTowerSpace.build(
            manifest.model, version, index, model.vocab.item_ids, encoder, table
        )

    def _load_als(self, table: ItemTable) -> EmbeddingSpace:
        emb_dir, index_dir = model_dirs(self.settings, self.rs)
        embeddings = load_embeddings(emb_dir)
        index = AnnIndex.load(index_dir / "index.faiss")
        if index.size != len(embeddings.item_ids):
            raise ConfigurationError(
                f"index {index_dir} holds {index.size} items but embeddings {emb_dir} "
                f"hold {len(embeddings.item_ids)}: rebuild the index"
            )
        if index.metadata.get("embeddings_created_at") != embeddings.manifest.get("created_at"):
            raise ConfigurationError(
                f"index {index_dir} was built from other embeddings than {emb_dir}: "
                "rebuild it with `inkling index`"
            )
        version = f"als-{embeddings.manifest.get('created_at', 'unknown')}"
        return EmbeddingSpace.build(
            version,
            index,
            embeddings.item_ids,
            embeddings.item_vectors,
            embeddings.user_ids,
            embeddings.user_vectors,
            table,
        )

    async def _watch(self, store: FeatureStore) -> None:
        """Swap in a new CURRENT two-tower version (from ALS too, when the first appears)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.rs.model_poll_s)
            version = self.registry.served_version(self.rs.model)
            space, refresher = self._space, self.refresher
            if version is None or refresher is None:
                continue
            if space is not None and space.model_version == f"{self.rs.model}:{version}":
                continue
            try:
                loaded = await loop.run_in_executor(
                    None, self._load_two_tower, store, version, refresher.table
                )
            except Exception as e:  # keep serving the old space; say why loudly
                log.error("not swapping to %s %s: %s", self.rs.model, version, e)
                await asyncio.sleep(self.rs.model_poll_s)
                continue
            # The table may have been refreshed while it loaded: map onto the current one.
            self._space = loaded.with_table(refresher.table)
            self._report_model()
            log.info("ANN now answered by %s", loaded.model_version)

    async def start(self) -> None:
        store = open_store(self.settings)
        columns = resolve_service(store, self.rs.feature_service)
        version = self.registry.served_version(self.rs.model)
        if version is not None:
            self._check_manifest(store, version)  # a bad model refuses to start, naming why
        client = await open_async_redis(store)
        self.refresher = CatalogRefresher(client, columns, self.rs.snapshot_refresh_s)
        self.refresher.on_table = [self._remap]
        await self.refresher.start()
        self._untrack = track_snapshot(self.rs.feature_service, self.refresher.age_s)
        declare_counters("retrieve")
        table = self.refresher.table
        try:
            if version is not None:
                self._space = self._load_two_tower(store, version, table)
            else:
                self._space = self._load_als(table)
        except BaseException:
            await self.close()
            raise
        space = self._space
        known = int((space.item_table_rows >= 0).sum())
        log.info(
            "retrieval ready: %d items in the snapshot, %d of %d indexed items known, ANN %s",
            len(table), known, len(space.item_table_rows), space.model_version,
        )  # fmt: skip
        refresher = self.refresher
        self._core = RetrievalCore(
            table=lambda: refresher.table,
            rows=RowReader(client, columns, enforce_ttl=self.rs.enforce_ttl),
            space=lambda: self._space,
            limits=RetrievalLimits(
                ann_candidates=self.rs.ann_candidates,
                covisit_candidates=self.rs.covisit_candidates,
                session_items=self.rs.session_items,
            ),
        )
        self._report_model()
        if self.rs.model:
            self._watcher = asyncio.create_task(self._watch(store), name="model-watcher")

    def _report_model(self) -> None:
        """`inkling.model.info`: the ANN space serving now."""
        space = self._space
        if space is not None:
            set_model_info(
                self,
                "retrieval",
                model=space.model_version,
                index=space.version,
                feature_service=self.rs.feature_service,
            )

    @property
    def servicer(self) -> RetrievalServicer:
        if self._core is None:
            raise ConfigurationError("retrieval is not loaded yet")
        return RetrievalServicer(self._core, self.rs.feature_service)

    async def close(self) -> None:
        self._untrack()
        clear_model_info(self, "retrieval")
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.refresher is not None:
            await self.refresher.stop()
            await self.refresher.client.aclose()
