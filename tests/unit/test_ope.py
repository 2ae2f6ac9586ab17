"""Off-policy evaluation checked against the simulator's truth."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from batch.explore_sim import (
    RULES,
    ExploreConfig,
    WeekConfig,
    World,
    bandit_week,
    log_policy,
    requests,
    true_value,
)
from batch.ope import evaluate
from inkling.exploration import PolicySpec

LOGGING = PolicySpec.of("plackett_luce", temperature=1.0)
TARGET = PolicySpec.of("plackett_luce", temperature=0.5)


@pytest.fixture(scope="module")
def world() -> World:
    return World.build(ExploreConfig(seed=3))


def test_a_target_equal_to_the_logging_policy_gets_the_on_policy_value(world):
    reqs = requests(world, 500, seed=1)
    logged = log_policy(world, reqs, LOGGING, seed=2)
    result = evaluate(logged, LOGGING, rules=RULES, bootstrap=100)
    on_policy = np.mean([r.clicks.sum() for r in logged])
    for name in ("ips", "snips", "cascade_ips"):
        assert result.estimates[name].value == pytest.approx(on_policy)
        assert result.estimates[name].ess == pytest.approx(500)
    assert result.estimates["dr"].value == pytest.approx(on_policy, rel=0.05)
    # Its marginals are sampled: equal policies give ratios near 1, not exactly 1.
    assert result.estimates["iips"].value == pytest.approx(on_policy, rel=0.03)
    assert not result.warnings


def test_doubly_robust_and_item_position_are_within_10_percent_and_cover_the_truth(world):
    reqs = requests(world, 1500, seed=5)
    truth = true_value(world, reqs, TARGET, draws=20)
    covered, errors, iips_errors, iips_covered = 0, [], [], 0
    repetitions = 20
    for rep in range(repetitions):  # the logging policy's draws and the clicks, reseeded
        logged = log_policy(
            world, [r.__class__(**{**r.__dict__, "seed": r.seed + rep}) for r in reqs],
            LOGGING, seed=100 + rep,
        )  # fmt: skip
        result = evaluate(
            logged, TARGET, rules=RULES, bootstrap=200, seed=rep, marginal_samples=100
        )
        dr, iips = result.estimates["dr"], result.estimates["iips"]
        errors.append(abs(dr.value - truth) / truth)
        covered += dr.low <= truth <= dr.high
        iips_errors.append(abs(iips.value - truth) / truth)
        iips_covered += iips.low <= truth <= iips.high
    assert np.median(errors) < 0.10 and max(errors) < 0.2
    assert covered >= 0.9 * repetitions
    # The simulator's clicks follow the position-based model, where the item-position
    # estimator is unbiased but for its sampled marginals.
    assert np.median(iips_errors) < 0.10 and max(iips_errors) < 0.2
    assert iips_covered >= 0.9 * repetitions


def test_heavy_weights_are_warned_about(world):
    reqs = requests(world, 300, seed=7)
    logged = log_policy(world, reqs, PolicySpec.of("uniform"), seed=8)
    result = evaluate(logged, PolicySpec(), rules=RULES, bootstrap=50)  # greedy target
    assert any("too heavy to trust" in w for w in result.warnings)


def test_bad_logs_are_refused_with_a_reason(world):
    with pytest.raises(ValueError, match="no logged requests"):
        evaluate([], TARGET)
    reqs = requests(world, 5, seed=9)
    logged = log_policy(world, reqs, LOGGING, seed=1)
    bad = logged[0].__class__(**{**logged[0].__dict__, "propensities": np.zeros(5)})
    with pytest.raises(ValueError, match="request 0: a logged propensity is not above 0"):
        evaluate([bad, *logged[1:]], TARGET)


@pytest.mark.parametrize("seed", [0, 1])
def test_over_a_week_with_arriving_items_the_bandit_earns_more_than_greedy(seed):
    config = WeekConfig(world=replace(WeekConfig().world, seed=seed))  # 2,000 requests a day
    greedy, bandit = bandit_week(config, "greedy"), bandit_week(config, "bandit")
    assert len(bandit.reward) == len(greedy.reward) == 7 * 24 * (2000 // 24)
    assert bandit.reward.sum() > greedy.reward.sum()  # cumulative expected clicks
    assert (bandit.oracle >= bandit.reward - 1e-9).all()
    # Arriving items get the impressions the greedy ranker never gives them, and their
    # observed click rates come to rank them as their true ones do.
    assert bandit.new_impressions[-1] > 50 * greedy.new_impressions[-1]
    assert bandit.new_rank_correlation[-1] > 0.6 > greedy.new_rank_correlation[-1] + 0.3


def test_the_estimators_agree_with_open_bandit_pipeline_on_the_same_log(world):
    """obp 0.4.1 (the last release for Python 3.11) has no slate estimators; on one-position
    lists ours reduce to its IPW, SNIPW, DM and DR, given the same click model."""
    from dataclasses import replace as with_

    from obp.ope import (
        DirectMethod,
        DoublyRobust,
        InverseProbabilityWeighting,
        SelfNormalizedInverseProbabilityWeighting,
    )

    from batch.ope import ClickModel
    from inkling.exploration import probabilities

    one = World.build(with_(world.config, list_size=1))
    reqs = requests(one, 2000, seed=4)
    logged = log_policy(one, reqs, LOGGING, seed=6)
    model = ClickModel(1, logged[0].features.shape[1]).fit(
        np.vstack([r.features[r.order] for r in logged]),
        np.zeros(len(logged), np.int64),
        np.concatenate([r.clicks for r in logged]),
    )
    ours = evaluate(logged, TARGET, rules=RULES, bootstrap=20, click_model=model).estimates
    action_dist = np.stack(
        [probabilities(TARGET, r.ranker, r.ranker, r.categories, r.order, RULES)[1][0]
         for r in logged]
    )[:, :, None]  # fmt: skip
    q = np.stack([model.predict(r.features, 0) for r in logged])[:, :, None]
    data = {
        "reward": np.concatenate([r.clicks for r in logged]),
        "action": np.array([r.order[0] for r in logged]),
        "position": np.zeros(len(logged), np.int64),
        "pscore": np.concatenate([r.propensities for r in logged]),
        "action_dist": action_dist,
    }
    assert ours["ips"].value == pytest.approx(
        InverseProbabilityWeighting().estimate_policy_value(**data), rel=1e-9
    )
    assert ours["snips"].value == pytest.approx(
        SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**data), rel=1e-9
    )
    assert ours["dm"].value == pytest.approx(
        DirectMethod().estimate_policy_value(
            position=data["position"], action_dist=action_dist, estimated_rewards_by_reg_model=q
        ),
        rel=1e-9,
    )
    assert ours["dr"].value == pytest.approx(
        DoublyRobust().estimate_policy_value(**data, estimated_rewards_by_reg_model=q), rel=1e-9
    )
