"""Differential privacy: the mechanisms' calibration, contribution bounding, the ledger."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import opendp.prelude as dp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inkling.config import PROJECT_ROOT
from inkling.errors import ConfigurationError, InvalidInputError, PrivacyBudgetExceededError
from inkling.privacy.ledger import Budget, PrivacyLedger
from inkling.privacy.noisy_counts import bound_contributions, count_mechanism
from inkling.privacy.settings import PrivacySettings, load_privacy_settings
from tests.proto_strategies import SETTINGS

dp.enable_features("contrib")
D0 = date(2026, 3, 1)


def day(n: int) -> date:
    return D0 + timedelta(days=n)


# --- mechanisms ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epsilon", "max_keys"), [(1.0, 10), (0.3, 3), (0.7, 1), (0.1, 7), (5.0, 50)]
)
def test_laplace_is_calibrated_to_the_l1_sensitivity(epsilon: float, max_keys: int) -> None:
    m = count_mechanism(epsilon, 0.0, max_keys)
    assert m.name == "laplace" and m.sensitivity == max_keys
    assert m.scale == pytest.approx(max_keys / epsilon, rel=1e-12)
    # Rebuilt independently from the stated scale: OpenDP's own map at the declared
    # sensitivity is within ε, and one more unit of sensitivity would not be.
    again = dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=m.scale
    )
    assert again.map(max_keys) <= epsilon
    assert again.map(max_keys + 1) > epsilon
    assert m.loss == (again.map(max_keys), 0.0)


def test_gaussian_is_calibrated_to_the_l2_sensitivity_and_not_over_noised() -> None:
    epsilon, delta, max_keys = 1.0, 1e-6, 10
    m = count_mechanism(epsilon, delta, max_keys)
    assert m.name == "gaussian"
    assert m.sensitivity >= math.sqrt(max_keys)
    eps_out, delta_out = m.measurement.map(m.sensitivity)
    assert eps_out <= epsilon and delta_out <= delta
    assert m.measurement.map(math.sqrt(max_keys + 1))[0] > epsilon

    def at(scale: float) -> float:
        space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l2_distance(T=float)
        gauss = dp.c.make_zCDP_to_approxDP(dp.m.make_gaussian(*space, scale=scale))
        return float(dp.c.make_fix_delta(gauss, delta).map(m.sensitivity)[0])

    assert at(m.scale) <= epsilon < at(0.99 * m.scale)


def test_laplace_noise_has_the_declared_spread() -> None:
    m = count_mechanism(1.0, 0.0, 5)
    noise = m.release(np.zeros(50_000, dtype=np.int64)).astype(np.float64)
    # Discrete Laplace with scale t: variance 2 e^(-1/t) / (1 - e^(-1/t))^2.
    r = math.exp(-1.0 / m.scale)
    expected = 2 * r / (1 - r) ** 2
    assert noise.var() == pytest.approx(expected, rel=0.05)
    assert abs(noise.mean()) < 5 * math.sqrt(expected / len(noise))


def test_gaussian_noise_has_the_declared_spread() -> None:
    m = count_mechanism(2.0, 1e-5, 4)
    counts = np.full(8_000, 100, dtype=np.int64)
    noisy = m.release(counts).astype(np.float64) - 100
    # σ² plus rounding's 1/12; the tolerance is five standard errors of the estimate.
    assert noisy.var() == pytest.approx(m.scale**2 + 1 / 12, rel=0.08)


@pytest.mark.parametrize(
    ("epsilon", "delta", "max_keys", "message"),
    [
        (0.0, 0.0, 5, "epsilon must be a positive finite number, got 0.0"),
        (-1.0, 0.0, 5, "epsilon must be a positive finite number, got -1.0"),
        (math.nan, 0.0, 5, "epsilon must be a positive finite number"),
        (math.inf, 0.0, 5, "epsilon must be a positive finite number"),
        (1.0, -0.1, 5, r"delta must lie in \[0, 1\), got -0.1"),
        (1.0, 1.0, 5, r"delta must lie in \[0, 1\), got 1.0"),
        (1.0, 0.0, 0, "items per user\\) must be an integer of at least 1, got 0"),
    ],
)
def test_bad_mechanism_parameters_are_named(
    epsilon: float, delta: float, max_keys: int, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        count_mechanism(epsilon, delta, max_keys)


def test_release_refuses_what_is_not_a_count_vector() -> None:
    m = count_mechanism(1.0, 0.0, 1)
    with pytest.raises(InvalidInputError, match="1-d integer vector"):
        m.release(np.zeros(3, dtype=np.float64))
    with pytest.raises(InvalidInputError, match="must not be negative"):
        m.release(np.array([1, -1]))


# --- contribution bounding -------------------------------------------------------------------------


def test_a_heavy_user_counts_towards_at_most_the_bound() -> None:
    heavy_items = np.repeat(np.arange(40), 3)  # 40 distinct items, each three times
    light_units = np.array([1, 1, 2, 3, 3, 3])
    light_items = np.array([0, 1, 0, 5, 6, 7])
    units = np.r_[np.zeros(len(heavy_items), dtype=np.int64), light_units]
    items = np.r_[heavy_items, light_items]
    bounded = bound_contributions(units, items, 50, max_keys=4)
    without = bound_contributions(light_units, light_items, 50, max_keys=4)
    diff = bounded.counts - without.counts
    assert set(np.unique(diff)) <= {0, 1}
    assert diff.sum() == 4
    assert np.flatnonzero(diff).max() < 40
    assert (bounded.units, bounded.pairs, bounded.kept) == (4, 46, 4 + 6)


def test_repeats_of_a_pair_count_once_and_unbounded_users_keep_everything() -> None:
    bounded = bound_contributions(
        np.array([7, 7, 7, 9]), np.array([2, 2, 3, 2]), n_keys=4, max_keys=10
    )
    assert bounded.counts.tolist() == [0, 0, 2, 1]


@SETTINGS
@given(
    others=st.lists(st.sets(st.integers(0, 29), min_size=1, max_size=3), max_size=12),
    heavy=st.lists(st.integers(0, 29), min_size=1, max_size=60),
    max_keys=st.integers(3, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_unit_moves_the_counts_by_at_most_the_sensitivity(
    others: list[set[int]], heavy: list[int], max_keys: int, seed: int
) -> None:
    """Adding one unit to units within the bound changes each count by 0 or 1 and the
    vector by at most max_keys in L1 (so at most sqrt(max_keys) in L2)."""
    units = np.array([u for u, keys in enumerate(others, start=1) for _ in keys], dtype=np.int64)
    keys = np.array([k for ks in others for k in sorted(ks)], dtype=np.int64)
    before = bound_contributions(units, keys, 30, max_keys, np.random.default_rng(seed))
    after = bound_contributions(
        np.r_[units, np.zeros(len(heavy), dtype=np.int64)],
        np.r_[keys, np.array(heavy, dtype=np.int64)],
        30,
        max_keys,
        np.random.default_rng(seed + 1),
    )
    diff = after.counts - before.counts
    assert diff.min() >= 0 and diff.max() <= 1
    assert diff.sum() == min(len(set(heavy)), max_keys)
    assert np.sqrt((diff**2).sum()) <= math.sqrt(max_keys)


def test_bounding_refuses_bad_input() -> None:
    with pytest.raises(InvalidInputError, match="must match"):
        bound_contributions(np.array([1, 2]), np.array([1]), 5, 2)
    with pytest.raises(InvalidInputError, match=r"key codes must lie in 0 \.\. 4"):
        bound_contributions(np.array([1]), np.array([5]), 5, 2)
    assert bound_contributions(np.array([]), np.array([]), 3, 2).counts.tolist() == [0, 0, 0]


# --- the ledger ------------------------------------------------------------------------------------


def charge(ledger: PrivacyLedger, epsilon: float, first: int, last: int, delta: float = 0.0):
    return ledger.charge(
        release="item_popularity",
        mechanism="laplace" if delta == 0 else "gaussian",
        epsilon=epsilon,
        delta=delta,
        first_day=day(first),
        last_day=day(last),
    )


def test_the_ledger_charges_every_day_of_a_window_and_refuses_past_the_budget(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy" / "ledger.jsonl", Budget(1.0, 1e-6))
    charge(ledger, 0.6, 0, 6)
    charge(ledger, 0.4, 4, 10)  # days 4..6 now hold exactly 1.0
    assert ledger.remaining(day(0), day(3)) == Budget(pytest.approx(0.4), 1e-6)
    assert ledger.remaining(day(7), day(13)) == Budget(pytest.approx(0.6), 1e-6)
    with pytest.raises(PrivacyBudgetExceededError) as refused:
        charge(ledger, 0.1, 6, 7)
    message = str(refused.value)
    assert f"would bring {day(6)} to ε=1.1" in message
    assert "the window has ε=0, δ=1e-06 left" in message
    charge(ledger, 0.6, 11, 17)  # outside the full days
    with pytest.raises(PrivacyBudgetExceededError, match=r"to δ=1\.5e-06"):
        charge(ledger, 0.1, 20, 21, delta=1e-6)
        charge(ledger, 0.1, 20, 21, delta=5e-7)
    assert [r.epsilon for r in ledger.records()] == [0.6, 0.4, 0.6, 0.1]
    spent = ledger.spent(day(0), day(21))
    assert spent[day(5)].epsilon == pytest.approx(1.0)
    assert spent[day(20)] == Budget(0.1, 1e-6)


def test_ten_tenths_fill_a_budget_of_one_and_the_eleventh_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", Budget(1.0, 0.0))
    for _ in range(10):
        charge(ledger, 0.1, 0, 0)
    with pytest.raises(PrivacyBudgetExceededError):
        charge(ledger, 0.1, 0, 0)
    assert len(ledger.records()) == 10


def test_a_torn_last_line_is_not_counted_and_the_next_append_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path, Budget(1.0, 0.0))
    charge(ledger, 0.5, 0, 6)
    whole = path.read_bytes()
    # What a crash in the middle of the next append leaves: part of a record, no newline.
    torn = whole[: len(whole) // 2]
    with path.open("ab") as f:
        f.write(torn)
    assert len(ledger.records()) == 1
    assert ledger.remaining(day(0), day(6)).epsilon == pytest.approx(0.5)
    charge(ledger, 0.5, 0, 6)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    assert [json.loads(line)["epsilon"] for line in lines[:-1]] == [0.5, 0.5]


def test_a_bad_complete_line_stops_all_accounting(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path, Budget(1.0, 0.0))
    charge(ledger, 0.2, 0, 0)
    with path.open("a") as f:
        f.write('{"epsilon": 0.3}\n')
    with pytest.raises(ConfigurationError, match="line 2 is not a release record"):
        charge(ledger, 0.2, 0, 0)
    with pytest.raises(ConfigurationError, match="line 2"):
        ledger.records()


def test_the_ledger_refuses_bad_charges(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", Budget(1.0, 0.0))
    with pytest.raises(InvalidInputError, match="epsilon must be positive, got 0"):
        charge(ledger, 0.0, 0, 0)
    with pytest.raises(InvalidInputError, match="first day 2026-03-03 is after its last"):
        charge(ledger, 0.1, 2, 1)
    assert not (tmp_path / "ledger.jsonl").exists()


CHARGE_WHEN_TOLD = """
import sys, time
from datetime import date
from pathlib import Path
from inkling.errors import PrivacyBudgetExceededError
from inkling.privacy.ledger import Budget, PrivacyLedger
ledger = PrivacyLedger(Path(sys.argv[1]), Budget(1.0, 0.0))
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
try:
    ledger.charge(release="r", mechanism="laplace", epsilon=0.6, delta=0.0,
                  first_day=date(2026, 3, 1), last_day=date(2026, 3, 7))
    print("charged", flush=True)
except PrivacyBudgetExceededError:
    print("refused", flush=True)
"""


def _python(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        stdout=subprocess.PIPE,
    )


def test_concurrent_releases_cannot_both_pass_the_budget_check(tmp_path: Path) -> None:
    path, go = tmp_path / "ledger.jsonl", tmp_path / "go"
    # Earlier releases of other days: reading them widens the window a missing lock leaves.
    filler = PrivacyLedger(path, Budget(1.0, 0.0))
    line = json.dumps(asdict(charge(filler, 0.001, 100, 100)), sort_keys=True) + "\n"
    path.write_text(line * 20_000)
    children = [_python(CHARGE_WHEN_TOLD, str(path), str(go)) for _ in range(4)]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
    go.touch()
    answers = sorted(child.communicate(timeout=60)[0].decode().strip() for child in children)
    assert answers == ["charged", *["refused"] * 3]
    assert len(PrivacyLedger(path, Budget(1.0, 0.0)).records()) == 20_001


APPEND_FOREVER = """
import sys
from datetime import date
from pathlib import Path
from inkling.privacy.ledger import Budget, PrivacyLedger
ledger = PrivacyLedger(Path(sys.argv[1]), Budget(1e12, 0.0))
print("ready", flush=True)
while True:
    ledger.charge(release="r", mechanism="laplace", epsilon=0.001, delta=0.0,
                  first_day=date(2026, 3, 1), last_day=date(2026, 3, 7),
                  details={"pad": "x" * 5000})
"""


def test_a_killed_writer_leaves_a_ledger_that_reads_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    child = _python(APPEND_FOREVER, str(path))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        time.sleep(0.5)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    ledger = PrivacyLedger(path, Budget(1e12, 0.0))
    counted = len(ledger.records())
    complete = path.read_bytes().count(b"\n")
    assert counted == complete > 0
    ledger.charge(
        release="r", mechanism="laplace", epsilon=0.001, delta=0.0, first_day=D0, last_day=D0
    )
    assert len(ledger.records()) == counted + 1
    assert path.read_bytes().endswith(b"\n")


# --- settings --------------------------------------------------------------------------------------


def test_privacy_settings_come_from_the_file_and_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "inkling.toml"
    config.write_text("[privacy]\nepsilon_per_day = 2.5\nmax_items_per_user = 4\n")
    assert load_privacy_settings(config, environ={}) == PrivacySettings(2.5, 1e-6, 4)
    config.write_text("[privacy]\nepsilon_per_day = -1\n")
    with pytest.raises(ConfigurationError, match="epsilon_per_day must be a finite number >= 0"):
        load_privacy_settings(config, environ={})
    config.write_text("[privacy]\nepsilon = 1\n")
    with pytest.raises(ConfigurationError, match=r"unknown \[privacy\] settings: epsilon"):
        load_privacy_settings(config, environ={})
