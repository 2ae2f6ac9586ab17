"""The retrieval process's composition root: what it loads and how it is wired."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from batch.embeddings import load_embeddings
from inkling.ann import AnnIndex
from inkling.config import Settings
from inkling.errors import ConfigurationError
from inkling.feast_store import open_store
from inkling.online_features import RowReader, open_async_redis, resolve_service
from inkling.pipeline import CatalogRefresher, ItemTable
from inkling.serving.settings import RetrievalSettings
from inkling.v1 import retrieval_service_pb2, retrieval_service_pb2_grpc
from retrieval_server.core import EmbeddingSpace, RetrievalCore, RetrievalLimits
from retrieval_server.service import RetrievalServicer

log = logging.getLogger("inkling.retrieval")
SERVICE = retrieval_service_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def model_dirs(settings: Settings, rs: RetrievalSettings) -> tuple[Path, Path]:
    models = settings.data_dir / "models"
    return rs.embeddings_dir or models / "als", rs.index_dir or models / "index"


class RetrievalApp:
    """Loads the item snapshot, the embeddings and the index, then serves."""

    service_names: tuple[str, ...] = (SERVICE,)

    def __init__(self, settings: Settings, rs: RetrievalSettings) -> None:
        self.settings = settings
        self.rs = rs
        self.refresher: CatalogRefresher | None = None
        self._space: EmbeddingSpace | None = None
        self._core: RetrievalCore | None = None

    def register(self, server: grpc.aio.Server) -> None:
        retrieval_service_pb2_grpc.add_RetrievalServiceServicer_to_server(_Deferred(self), server)

    def _remap(self, table: ItemTable) -> None:
        if self._space is not None:
            self._space = self._space.with_table(table)

    async def start(self) -> None:
        store = open_store(self.settings)
        columns = resolve_service(store, self.rs.feature_service)
        client = await open_async_redis(store)
        self.refresher = CatalogRefresher(client, columns, self.rs.snapshot_refresh_s)
        self.refresher.on_table = [self._remap]
        await self.refresher.start()
        table = self.refresher.table
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
        self._space = EmbeddingSpace.build(
            version,
            index,
            embeddings.item_ids,
            embeddings.item_vectors,
            embeddings.user_ids,
            embeddings.user_vectors,
            table,
        )
        known = int((self._space.item_table_rows >= 0).sum())
        log.info(
            "retrieval ready: %d items in the snapshot, %d of %d embedded items known, index %s",
            len(table), known, len(embeddings.item_ids), version,
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

    @property
    def servicer(self) -> RetrievalServicer:
        if self._core is None:
            raise ConfigurationError("retrieval is not loaded yet")
        return RetrievalServicer(self._core, self.rs.feature_service)

    async def close(self) -> None:
        if self.refresher is not None:
            await self.refresher.stop()
            await self.refresher.client.aclose()


class _Deferred(retrieval_service_pb2_grpc.RetrievalServiceServicer):
    """Registered before loading (so health answers while the app loads); forwards to
    the real servicer once it exists and answers UNAVAILABLE until then."""

    def __init__(self, app: RetrievalApp) -> None:
        self._app = app
        self._servicer: RetrievalServicer | None = None

    async def RetrieveCandidates(self, request, context):  # type: ignore[no-untyped-def]
        if self._servicer is None:
            if self._app._core is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "retrieval is still loading")
            self._servicer = self._app.servicer
        return await self._servicer.RetrieveCandidates(request, context)
