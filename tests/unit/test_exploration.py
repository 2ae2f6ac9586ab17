"""Exploring policies: exact propensities, replayable draws, guardrails that hold."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from inkling.exploration import (
    GREEDY,
    Guardrails,
    PolicySpec,
    draw,
    position_marginals,
    probabilities,
    replay,
    request_seed,
)

SPECS = [
    PolicySpec.of("epsilon_greedy", epsilon=0.3),
    PolicySpec.of("plackett_luce", temperature=0.7),
    PolicySpec.of("bandit", epsilon=0.1, temperature=0.5),
    PolicySpec.of("uniform"),
]


def pool(n: int = 7, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.sort(rng.normal(size=n))[::-1].copy(), rng.integers(0, 3, size=n)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_logged_propensities_match_the_frequencies_of_many_seeded_draws(spec):
    scores, cats = pool()
    rules = Guardrails(max_per_category=1, window=2)
    draws = 30_000
    seen: Counter[tuple[int, ...]] = Counter()
    logged: dict[tuple[int, ...], float] = {}
    for seed in range(draws):
        slate = draw(spec, scores, scores, cats, 3, seed, rules)
        key = tuple(slate.order.tolist())
        seen[key] += 1
        logged[key] = float(np.prod(slate.propensities))
    # Every list's logged probability is its frequency, within 4 standard errors.
    for key, count in seen.items():
        p = logged[key]
        assert abs(count / draws - p) <= 4 * np.sqrt(p * (1 - p) / draws) + 1e-4, key
    # The lists seen carry (nearly) all the probability: none is missing from the log.
    assert sum(logged.values()) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("spec", [*SPECS, GREEDY], ids=lambda s: s.kind)
def test_sampled_position_marginals_equal_the_exact_ones_summed_over_every_list(spec):
    """The item-position estimator's marginals: each of 210 possible lists weighted by its
    exact probability (the product of its pi_k), against 40,000 lists drawn at once."""
    scores, cats = pool()
    ranker = scores[::-1].copy()  # a ranker that disagrees: greedy and explored differ
    rules = Guardrails(max_per_category=1, window=2)
    exact = np.zeros((3, len(scores)))
    for a in range(7):
        for b in range(7):
            for c in range(7):
                if len({a, b, c}) < 3:
                    continue
                order = np.array([a, b, c])
                try:
                    pi, _ = probabilities(spec, scores, ranker, cats, order, rules)
                except ValueError:  # places an item the rule makes ineligible: never drawn
                    continue
                exact[[0, 1, 2], order] += np.prod(pi)
    assert exact.sum(axis=1) == pytest.approx(np.ones(3))
    samples = 40_000
    sampled = position_marginals(
        spec, scores, ranker, cats, 3, samples, np.random.default_rng(5), rules
    )
    assert sampled.shape == exact.shape
    bound = 4 * np.sqrt(exact * (1 - exact) / samples) + 1e-4
    assert (np.abs(sampled - exact) <= bound).all(), np.abs(sampled - exact).max()
    # Pools of one size drawn together: each as if alone.
    other = scores[::-1].copy()  # the second pool's values disagree with the first's
    both = position_marginals(
        spec, np.stack([scores, other]), np.stack([ranker, ranker]), np.stack([cats, cats]),
        3, samples, np.random.default_rng(6), rules,
    )  # fmt: skip
    assert (np.abs(both[0] - exact) <= bound).all()
    alone = position_marginals(
        spec, other, ranker, cats, 3, samples, np.random.default_rng(7), rules
    )
    assert np.abs(both[1] - alone).max() < 0.03


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_each_position_is_a_distribution_and_the_log_matches_it(spec):
    scores, cats = pool(12)
    slate = draw(spec, scores, scores, cats, 6, seed=11)
    props, dists = probabilities(spec, scores, scores, cats, slate.order)
    assert dists.sum(axis=1) == pytest.approx(np.ones(6))
    assert props == pytest.approx(slate.propensities)
    assert (props > 0).all() and (props <= 1).all()


def test_a_replayed_request_reproduces_its_list_and_another_seed_does_not():
    scores, cats = pool(40, seed=1)
    spec = PolicySpec.of("plackett_luce", temperature=1.0)
    seed = request_seed("9f86d081884c7d659a2feaa0c55ad015")
    first = draw(spec, scores, scores, cats, 10, seed)
    again = replay(spec, scores, scores, cats, 10, seed)
    assert first.order.tolist() == again.order.tolist()
    assert first.propensities.tolist() == again.propensities.tolist()
    others = {tuple(draw(spec, scores, scores, cats, 10, s).order) for s in range(20)}
    assert len(others) > 1


def test_greedy_is_the_ranker_order_with_propensity_one_and_nothing_explored():
    scores, cats = pool(10)
    slate = draw(GREEDY, scores, scores, cats, 10, seed=5, rules=Guardrails(10, 10))
    assert slate.order.tolist() == list(range(10))
    assert slate.propensities.tolist() == [1.0] * 10 and not slate.explored.any()


def test_the_diversity_rule_holds_after_exploration():
    rng = np.random.default_rng(0)
    rules = Guardrails(max_per_category=2, window=6)
    for seed in range(300):
        scores = rng.normal(size=30)
        cats = rng.integers(0, 4, size=30)
        for spec in SPECS:
            order = draw(spec, scores, scores, cats, 10, seed, rules).order
            top = Counter(cats[order[: rules.window]].tolist())
            assert max(top.values()) <= rules.max_per_category


def test_epsilon_greedy_explores_about_epsilon_of_the_positions():
    scores, cats = pool(50, seed=2)
    spec = PolicySpec.of("epsilon_greedy", epsilon=0.2)
    explored = [
        draw(spec, scores, scores, cats, 10, s, Guardrails(50, 1)).explored for s in range(2000)
    ]
    share = np.mean(explored)
    # Exploring picks uniformly among the eligible, so 1 in |E_k| lands on the greedy item.
    assert 0.17 < share < 0.2


def test_policy_names_round_trip_and_bad_ones_say_what_is_wrong():
    for spec in (*SPECS, GREEDY, PolicySpec.of("plackett_luce", temperature=0.25, pool=8)):
        assert PolicySpec.parse(spec.name) == spec
    for bad, says in (
        ("softmax(temperature=1)", "not one of"),
        ("plackett_luce(temperature=0)", "temperature above 0"),
        ("epsilon_greedy(epsilon=2,pool=5)", "outside [0, 1]"),
        ("plackett_luce(heat=1)", "unknown parameter 'heat'"),
        ("plackett_luce(temperature=x)", "not a number"),
        ("greedy(epsilon=0.1)", "no epsilon"),
    ):
        with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("(", r"\(")):
            PolicySpec.parse(bad)
