"""The contextual bandit: statistics that add up in Redis, a model that learns the click
rate, a ranker-side cache with bounded staleness, and the worker's exactly-once credit."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from inkling.bandit import (
    CONTEXT_FEATURES,
    DIM,
    BanditCache,
    LinearUCB,
    Statistics,
    contexts,
    increments,
    stats_key,
)
from inkling.v1.resources_pb2 import ServeRecord
from stream_worker.rewards import BanditLearner

DB = 13


def test_the_model_learns_a_linear_click_rate_and_its_bonus_shrinks_with_data():
    rng = np.random.default_rng(0)
    truth = np.array([0.05, 0.02, 0.01, 0.08, 0.04])
    x = contexts(rng.normal(size=20_000), rng.poisson(20, 20_000), rng.uniform(0, 90, 20_000),
                 rng.random(20_000) < 0.3)  # fmt: skip
    clicked = rng.random(len(x)) < x @ truth
    stats = Statistics.empty().plus(increments(x[:200], x[:200][clicked[:200]]))
    little = LinearUCB.solve(stats)
    stats = stats.plus(increments(x[200:], x[200:][clicked[200:]]))
    much = LinearUCB.solve(stats)
    assert much.mean(x[:2000]) == pytest.approx(x[:2000] @ truth, abs=0.01)
    probe = x[:50]
    assert (much.values(probe) - much.mean(probe)).mean() < (
        little.values(probe) - little.mean(probe)
    ).mean() / 5
    assert stats.n == len(x)


def test_with_no_data_the_bandit_follows_the_ranker():
    x = contexts(np.array([3.0, 2.0, 1.0]), np.zeros(3), np.full(3, 100.0), np.zeros(3))
    model = LinearUCB.solve(Statistics.empty(), alpha=0.0)
    assert np.argsort(-model.values(x)).tolist() == [0, 1, 2]


def test_increments_added_in_redis_read_back_as_the_same_statistics(redis_server):
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=DB)
    client.flushdb()
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(30, DIM)) for _ in range(3)]
    expected = Statistics.empty()
    for part in parts:  # three workers' batches, in any order
        added = increments(part, part[:4])
        expected = expected.plus(added)
        pipe = client.pipeline()
        for name, amount in added.items():
            pipe.hincrbyfloat(stats_key("home"), name, amount)
        pipe.execute()
    got = Statistics.from_hash(client.hgetall(stats_key("home")))
    assert got.a == pytest.approx(expected.a) and got.b == pytest.approx(expected.b)
    assert got.n == 90
    client.close()


def test_the_ranker_cache_refreshes_and_refuses_stale_parameters(redis_server):
    now = [0.0]
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port, db=DB)

    async def run() -> None:
        await client.flushdb()
        cache = BanditCache(client, ["home"], max_staleness_s=30, clock=lambda: now[0])
        assert cache.model("home") is None  # never read
        await client.hincrbyfloat(stats_key("home"), "b:bias", 7.0)
        await cache.refresh()
        model = cache.model("home")
        assert model is not None and model.theta[0] > 0
        now[0] = 31.0
        assert cache.model("home") is None  # older than the bound: not served
        assert cache.model("search") is None and "search" in cache.surfaces  # joins
        await cache.refresh()
        assert cache.model("search") is not None
        await client.aclose()

    asyncio.run(run())


def record(request_id: str, items: list[str], surface: str = "home") -> ServeRecord:
    r = ServeRecord(request_id=request_id, surface=surface, item_ids=items)
    r.served_at.FromMicroseconds(1_000_000)
    pool = r.pool
    pool.item_ids.extend([*items, "spare"])
    pool.feature_names.extend(CONTEXT_FEATURES)
    rows = np.zeros((len(items) + 1, DIM))
    rows[:, 0] = 1.0  # bias
    rows[:, 1] = np.arange(len(items) + 1)  # a row of its own per item
    pool.features.extend(rows.ravel().tolist())
    return r


def test_the_worker_credits_each_click_once_even_when_a_batch_is_replayed():
    learner = BanditLearner()
    learner.observe(record("r1", ["a", "b"]), fresh=True)
    assert learner.reward("r1", "b", 2_000_000)
    assert not learner.reward("r1", "b", 2_500_000)  # a second click on the same item
    first = dict(((k, f), v) for k, f, v in learner.take())
    assert first[(stats_key("home"), "n")] == 2
    assert first[(stats_key("home"), "b:bias")] == 1.0
    assert first[(stats_key("home"), "b:ranker")] == 1.0  # b's row
    learner.abandoned()  # the commit failed: the replay credits again
    learner.observe(record("r1", ["a", "b"]), fresh=True)
    assert learner.reward("r1", "b", 2_000_000)
    assert dict(((k, f), v) for k, f, v in learner.take()) == first
    learner.committed()
    learner.observe(record("r1", ["a", "b"]), fresh=False)  # replayed for the log only
    assert not learner.reward("r1", "b", 3_000_000)  # already credited
    assert learner.take() == []
    assert not learner.reward("r9", "a", 3_000_000) and learner.unmatched == 1
    # A click outside the window or on an item not shown is not credited.
    learner.observe(record("r2", ["c"]), fresh=False)
    assert not learner.reward("r2", "c", 1_000_000 + learner.window_us + 1)
    assert not learner.reward("r2", "spare", 2_000_000)


def test_records_without_the_bandit_features_teach_nothing():
    learner = BanditLearner()
    plain = ServeRecord(request_id="r1", item_ids=["a"])
    learner.observe(plain, fresh=True)
    assert learner.take() == [] and not learner.reward("r1", "a", 0)
