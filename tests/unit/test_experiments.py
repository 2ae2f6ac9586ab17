"""Experiments: assignment, the simulator's known truth, and a report that decides
correctly (an A/A test is not called, a known lift is)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from batch.experiment_report import build_report, confidence_radius, msprt, validate
from batch.simulate import SimArm, SimulationConfig, simulate
from inkling.errors import ConfigurationError
from inkling.events.schema import conform
from inkling.events.schema import validate as validate_events
from inkling.events.servelog import SERVE_SCHEMA
from inkling.experiments import Arm, Experiment


def catalogue(n: int = 400, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "item_id": [f"i{i}" for i in range(n)],
            "category": [f"c{i % 8}" for i in range(n)],
            "price": rng.uniform(5, 100, n),
        }
    )


ITEMS = catalogue()
PRICES = dict(zip(ITEMS["item_id"].to_pylist(), ITEMS["price"].to_pylist(), strict=True))


def config(**changes) -> SimulationConfig:
    base = {"requests": 3_000, "users": 800, "candidates": 50, "hours": 12, "seed": 3}
    return SimulationConfig(**(base | changes))


# --- assignment ---------------------------------------------------------------------------


def test_assignment_is_stable_follows_the_shares_and_the_salt_reshuffles():
    design = Experiment("e1", (Arm("control", 0.3), Arm("candidate", 0.3)))
    users = [f"u{i}" for i in range(20_000)]
    arms = [design.assign(u) for u in users]
    assert arms == [design.assign(u) for u in users]
    shares = {a: arms.count(a) / len(users) for a in ("control", "candidate", None)}
    assert shares == pytest.approx({"control": 0.3, "candidate": 0.3, None: 0.4}, abs=0.015)
    other = Experiment("e1", design.arms, salt="another")
    moved = sum(a != other.assign(u) for u, a in zip(users, arms, strict=True)) / len(users)
    assert moved == pytest.approx(1 - (0.3**2 + 0.3**2 + 0.4**2), abs=0.02)  # independent splits


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ((Arm("a", 0.5),), "at least two arms"),
        ((Arm("a", 0.5), Arm("a", 0.5)), "distinct names"),
        ((Arm("a", 0.7), Arm("b", 0.7)), "sum to more than 1"),
        ((Arm("a", 0.0), Arm("b", 0.5)), "must be in (0, 1]"),
    ],
)
def test_a_bad_experiment_is_refused_with_the_reason(arms, message):
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace("]", r"\]")):
        Experiment("e", arms)


# --- the simulator ------------------------------------------------------------------------


def test_a_seed_gives_the_same_world_and_the_logs_are_valid():
    one, two = simulate(config(), ITEMS), simulate(config(), ITEMS)
    assert one.serves.equals(two.serves) and one.events.equals(two.events)
    assert one.serves.schema == SERVE_SCHEMA and one.serves.num_rows == 3_000
    checked = validate_events(conform(one.events))
    assert checked.rejected == [] and checked.valid.num_rows == one.events.num_rows
    served = one.serves.to_pylist()
    assert all(len(r["item_ids"]) == 10 == len(set(r["item_ids"])) for r in served)
    assert {r["arm"] for r in served} == {"control", "candidate"}
    design = config().design
    assert all(r["arm"] == design.assign(r["user_id"]) for r in served[:200])


def test_the_known_lift_is_exactly_the_ratio_of_click_probabilities():
    base = simulate(config(), ITEMS).impressions
    lifted = simulate(
        config(arms=(SimArm("control", 0.5), SimArm("candidate", 0.5, lift=0.05))), ITEMS
    ).impressions
    ratio = np.asarray(lifted["click_probability"]) / np.asarray(base["click_probability"])
    arm = np.asarray(base["arm"].to_pylist())
    capped = np.asarray(lifted["click_probability"]) >= 1.0
    assert np.allclose(ratio[(arm == "candidate") & ~capped], 1.05)
    assert np.allclose(ratio[arm == "control"], 1.0)


def test_clicks_fall_with_position_and_follow_the_click_probabilities():
    imp = simulate(config(requests=6_000), ITEMS).impressions
    position = np.asarray(imp["position"])
    clicked = np.asarray(imp["clicked"])
    by_position = [clicked[position == k].mean() for k in range(10)]
    assert by_position[0] > 2 * by_position[4] > 0
    expected = np.asarray(imp["click_probability"]).sum()
    assert clicked.sum() == pytest.approx(expected, rel=0.05)


# --- the report ---------------------------------------------------------------------------


def test_the_mixture_ratio_and_its_confidence_sequence_agree():
    variance, tau2, alpha = 1e-6, 4e-6, 0.05
    radius = confidence_radius(variance, tau2, alpha)
    # At the edge of the confidence sequence the ratio is exactly 1/alpha.
    assert msprt(radius, variance, tau2) == pytest.approx(1 / alpha, rel=1e-9)
    assert msprt(0.5 * radius, variance, tau2) < 1 / alpha < msprt(1.5 * radius, variance, tau2)


def test_the_report_summarises_each_arm_and_names_no_winner_of_an_aa_test():
    sim = simulate(config(requests=6_000), ITEMS)
    report = build_report(sim.impressions, "ranker-ab", prices=PRICES, checkpoint_s=3600)
    arms = {a.arm: a for a in report.arms}
    imp = sim.impressions
    for name, arm in arms.items():
        mine = np.asarray(imp["arm"].to_pylist()) == name
        assert arm.impressions == mine.sum()
        assert arm.clicks == np.asarray(imp["clicked"])[mine].sum()
        assert arm.ctr.value == pytest.approx(arm.clicks / arm.impressions)
        assert arm.ctr.low < arm.ctr.value < arm.ctr.high
        assert arm.revenue == pytest.approx(sim.revenue[name])
    ctr = report.comparison("candidate")
    assert len(ctr.checkpoints) == 12  # hourly over 12 hours
    assert ctr.verdict == "no decision yet" and ctr.checkpoints[-1].p_value > 0.05
    p_values = [c.p_value for c in ctr.checkpoints]
    assert p_values == sorted(p_values, reverse=True)  # always valid: never rises
    assert "| candidate | ctr |" in report.markdown()


def test_an_unknown_experiment_or_control_is_refused():
    sim = simulate(config(requests=500), ITEMS)
    with pytest.raises(ValueError, match="no impressions of experiment 'other'"):
        build_report(
            sim.impressions.append_column("experiment", pa.array(["x"] * sim.impressions.num_rows)),
            "other",
        )
    with pytest.raises(ValueError, match="no arm 'baseline'"):
        build_report(sim.impressions, "ranker-ab", control="baseline")


def test_repeated_aa_tests_stay_under_alpha_and_a_known_lift_is_found():
    """Peeking hourly over 24 hours. The figures in the closing note come from
    `inkling experiment validate` with more runs; these bound the test's run time."""
    aa = validate(ITEMS, runs=40, requests=6_000, lift=0.0, users=2_000, seed=100)
    assert aa.rate <= 0.05, aa
    lift = validate(ITEMS, runs=6, requests=40_000, lift=0.05, users=3_000, seed=500)
    assert lift.decided >= 5, lift
