"""The ranking process's composition root: what it loads and how it is wired."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from feast import FeatureStore
from redis.exceptions import RedisError

from inkling.bandit import BanditCache
from inkling.config import Settings
from inkling.errors import ConfigurationError
from inkling.events.bus import PARTITIONS_KEY, EventBus, async_client
from inkling.exploration import PolicySpec
from inkling.feature_store.columns import resolve_service
from inkling.feature_store.feast_store import open_store
from inkling.feature_store.hydrator import Hydrator
from inkling.feature_store.rows import RowReader, open_async_redis
from inkling.models.registry import ModelRegistry, check_servable
from inkling.pseudonym import Pseudonymizer
from inkling.serving.runtime import DeferredServicer
from inkling.serving.security import SecuritySettings, channel_credentials, open_channel
from inkling.serving.serve_logger import ServeLogger
from inkling.serving.settings import RankingSettings
from inkling.serving.stages import CatalogRefresher
from inkling.telemetry.instruments import (
    clear_model_info,
    declare_counters,
    set_model_info,
    track_snapshot,
)
from inkling.telemetry.rpc import ClientTelemetry
from inkling.v1 import ranking_service_pb2, ranking_service_pb2_grpc
from ranking_server.core import Budgets, Policy, RankingCore
from ranking_server.scoring import BaselineScorer, Scorer, SequenceScorer
from ranking_server.service import GrpcRetriever, RankingServicer

log = logging.getLogger("inkling.ranking")
SERVICE_DESCRIPTOR = ranking_service_pb2.DESCRIPTOR.services_by_name["RankingService"]
SERVICE = SERVICE_DESCRIPTOR.full_name
RETRIEVAL_CONNECT_WAIT_S = 2.0


class RankingApp:
    """Loads the ranker's feature service and item snapshot, connects to retrieval."""

    service_names: tuple[str, ...] = (SERVICE,)

    def __init__(
        self,
        settings: Settings,
        rs: RankingSettings,
        security: SecuritySettings | None = None,
        pseudonyms: Pseudonymizer | None = None,
    ) -> None:
        self.pseudonyms = pseudonyms
        self.settings = settings
        self.rs = rs
        self.security = security or SecuritySettings()  # its client side: to retrieval
        self.refresher: CatalogRefresher | None = None
        self.channel: grpc.aio.Channel | None = None
        self.core: RankingCore | None = None
        self.serve_log: ServeLogger | None = None
        self._canary: tuple[str, float, str] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._bandits: asyncio.Task[None] | None = None
        self._untrack: Callable[[], None] = lambda: None

    def register(self, server: grpc.aio.Server) -> None:
        gate = DeferredServicer(SERVICE_DESCRIPTOR, self._loaded_servicer, "ranking")
        ranking_service_pb2_grpc.add_RankingServiceServicer_to_server(gate, server)

    def _loaded_servicer(self) -> RankingServicer | None:
        return self.servicer if self.core is not None else None

    @property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.rs.registry_dir or self.settings.data_dir / "registry")

    def _load_scorer(self, store: FeatureStore, version: str) -> Scorer:
        """Load a published version, check it against the live Feast registry, warm it."""
        from inkling.models import SasRecRecommender

        manifest = self.registry.manifest(self.rs.model, version)
        check_servable(manifest, store, self.rs.feature_service, "sasrec")
        model = SasRecRecommender.load(self.registry.path(self.rs.model, version))
        model.score([np.zeros(0, dtype=np.int64)])  # first call pays torch's lazy set-up
        scorer = SequenceScorer(
            model, f"{manifest.model}:{version}", self.registry.path(self.rs.model, version)
        )
        scorer.warm()
        log.info("ranker %s scores through %s", version, scorer.form)
        return scorer

    async def _follow_canary(self, store: FeatureStore) -> None:
        """Start, change or end the experiment the registry's CANARY describes (unless the
        settings name a candidate themselves): `inkling retrain` puts a candidate there."""
        core = self.core
        if core is None or self.rs.candidate_version or not self.rs.model:
            return
        canary = self.registry.canary(self.rs.model)
        key = None if canary is None else (canary.version, canary.share, canary.experiment)
        if key == self._canary:
            return
        if canary is None:
            core.stop_experiment()
            log.info("canary ended: every user on %s", core.scorer.version)
        else:
            loop = asyncio.get_running_loop()
            scorer = await loop.run_in_executor(None, self._load_scorer, store, canary.version)
            core.start_experiment(canary.experiment, scorer, canary.share)
            log.info(
                "canary %s: %s serves %.0f%% of users",
                canary.experiment, scorer.version, 100 * canary.share,
            )  # fmt: skip
        self._canary = key
        self._report_models()

    async def _watch(self, store: FeatureStore) -> None:
        """Swap in a new CURRENT version: loaded and warmed beside the old one, then one
        assignment; requests already running keep the scorer they took. Follow the
        registry's canary likewise."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.rs.model_poll_s)
            try:
                await self._follow_canary(store)
            except Exception as e:  # keep serving as before; say why loudly
                log.error("not following the canary of %s: %s", self.rs.model, e)
            version = self.registry.served_version(self.rs.model)
            core = self.core
            if version is None or core is None or core.scorer.version.endswith(f":{version}"):
                continue
            try:
                scorer = await loop.run_in_executor(None, self._load_scorer, store, version)
            except Exception as e:  # keep serving the old model; say why loudly
                log.error("not swapping to %s %s: %s", self.rs.model, version, e)
                await asyncio.sleep(self.rs.model_poll_s)
                continue
            core.scorer = scorer
            self._report_models()
            log.info("now scoring with %s", scorer.version)

    async def start(self) -> None:
        store = open_store(self.settings)
        columns = resolve_service(store, self.rs.feature_service)
        version = self.registry.served_version(self.rs.model)
        scorer: Scorer = BaselineScorer()
        if version is not None:
            scorer = self._load_scorer(store, version)  # a bad model refuses to start
        log.info("scorer: %s", scorer.version)
        client = await open_async_redis(store)
        self.refresher = CatalogRefresher(client, columns, self.rs.snapshot_refresh_s)
        await self.refresher.start()
        self._untrack = track_snapshot(self.rs.feature_service, self.refresher.age_s)
        declare_counters("recommend", "rank_candidates")
        self.channel = open_channel(
            self.rs.retrieval_address,
            channel_credentials(self.security),
            interceptors=[ClientTelemetry()],
        )
        await self._connect_retrieval()
        refresher = self.refresher
        policies = {s: PolicySpec.parse(n) for s, n in self.rs.policies.items()}
        self.core = RankingCore(
            hydrator=Hydrator(
                RowReader(client, columns, enforce_ttl=self.rs.enforce_ttl), refresher
            ),
            table=lambda: refresher.table,
            retriever=GrpcRetriever(self.channel),
            policy=Policy(
                max_per_category=self.rs.max_per_category,
                diversity_window=self.rs.diversity_window,
                category_boosts=dict(self.rs.category_boosts),
                surfaces=policies,
            ),
            budgets=Budgets(
                retrieval_s=self.rs.retrieval_budget_ms / 1000,
                scorer_s=self.rs.scorer_budget_ms / 1000,
                default_deadline_s=self.rs.default_deadline_ms / 1000,
                retrieve_candidates=self.rs.retrieve_candidates,
            ),
            scorer=scorer,
        )
        if self.rs.candidate_version and self.rs.candidate_share > 0:
            candidate = self._load_scorer(store, self.rs.candidate_version)
            self.core.start_experiment(
                self.rs.experiment, candidate, self.rs.candidate_share, self.rs.experiment_salt
            )
            log.info(
                "experiment %s: %s serves %.0f%% of users",
                self.rs.experiment, candidate.version, 100 * self.rs.candidate_share,
            )  # fmt: skip
        try:
            await self._follow_canary(store)
        except Exception as e:  # CURRENT serves everyone; the canary waits for a fix
            log.error("not starting the canary of %s: %s", self.rs.model, e)
        self._report_models()
        self._start_bandits(client, [s for s, spec in policies.items() if spec.kind == "bandit"])
        self.serve_log = await self._open_serve_log()
        if self.rs.model:
            self._watcher = asyncio.create_task(self._watch(store), name="model-watcher")
        log.info(
            "ranking ready: %d items in the snapshot (refresh every %.0fs), retrieval at %s",
            len(refresher.table), self.rs.snapshot_refresh_s, self.rs.retrieval_address,
        )  # fmt: skip

    def _start_bandits(self, client: Any, surfaces: list[str]) -> None:
        """Read the bandit surfaces' parameters from the online store's Redis (where the
        stream workers add to them), every `bandit_refresh_s`."""
        if not surfaces or self.core is None:
            return
        cache = BanditCache(
            client,
            [s for s in surfaces if s != "*"],
            alpha=self.rs.bandit_alpha,
            item_bonus=self.rs.bandit_item_bonus,
            refresh_s=self.rs.bandit_refresh_s,
            max_staleness_s=self.rs.bandit_max_staleness_s,
        )
        self.core.bandit = cache.model
        self._bandits = asyncio.create_task(cache.run(), name="bandit-parameters")
        log.info("bandit surfaces %s: parameters read every %.1fs", surfaces, cache.refresh_s)

    async def _open_serve_log(self) -> ServeLogger | None:
        """The serve log's writer: on the event bus, with the bus's recorded partitions."""
        address = self.settings.redis_address
        if not self.rs.serve_log:
            log.info("serve log off ([ranking] serve_log = false): answers are not recorded")
            return None
        if not self.settings.uses_redis or not address:
            log.warning(
                "serve log off: it travels on the event bus, which needs online_store = redis "
                "or redis_cluster"
            )
            return None
        # No retries: a lost reply hides whether an append ran, and a retry could log twice.
        client = async_client(
            address, retries=0, cluster=self.settings.online_store == "redis_cluster"
        )
        partitions = self.rs.bus_partitions
        try:
            recorded = await client.get(PARTITIONS_KEY)
            if recorded is not None:
                partitions = int(recorded)
        except RedisError as e:
            log.warning(
                "serve log: the bus is not reachable yet (%s); it is tried again per batch", e
            )
        logger = ServeLogger(
            EventBus(client, partitions),
            max_queue=self.rs.serve_log_queue,
            max_batch=self.rs.serve_log_batch,
            linger_s=self.rs.serve_log_linger_ms / 1000,
        )
        await logger.start()
        log.info("serve log: every answer goes to the event bus (%d partitions)", partitions)
        return logger

    async def _connect_retrieval(self) -> None:
        """Connect to retrieval before serving, waiting at most `RETRIEVAL_CONNECT_WAIT_S`,
        so the first Recommend does not pay the connection inside its retrieval budget.
        Retrieval still down is not fatal: each request then falls back as it would later."""
        assert self.channel is not None
        try:
            await asyncio.wait_for(self.channel.channel_ready(), RETRIEVAL_CONNECT_WAIT_S)
        except TimeoutError:
            log.warning(
                "retrieval at %s is not reachable yet; Recommend falls back to popularity "
                "until it is", self.rs.retrieval_address,
            )  # fmt: skip

    @property
    def servicer(self) -> RankingServicer:
        if self.core is None:
            raise ConfigurationError("ranking is not loaded yet")
        return RankingServicer(
            self.core,
            self.rs.feature_service,
            self.rs.default_deadline_ms / 1000,
            self.serve_log,
            self.pseudonyms,
        )

    def _report_models(self) -> None:
        """`inkling.model.info`: the scorer (and an experiment's candidate) serving now."""
        core = self.core
        if core is None:
            return
        for role, scorer in (("ranking", core.scorer), ("ranking-candidate", core.candidate)):
            if scorer is None:
                clear_model_info(self, role)
                continue
            model, _, version = scorer.version.rpartition(":")
            set_model_info(
                self,
                role,
                model=model or scorer.version,
                version=version,
                feature_service=self.rs.feature_service,
            )

    async def close(self) -> None:
        self._untrack()
        for role in ("ranking", "ranking-candidate"):
            clear_model_info(self, role)
        for task in (self._watcher, self._bandits):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.serve_log is not None:
            await self.serve_log.close()
            await self.serve_log.bus.client.aclose()
        if self.channel is not None:
            await self.channel.close()
        if self.refresher is not None:
            await self.refresher.stop()
            await self.refresher.client.aclose()
