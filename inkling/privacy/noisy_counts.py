"""Per-key counts with user-level differential privacy: bound, then add OpenDP noise.

Contribution bounding (`bound_contributions`)
    The input is one row per interaction of a privacy unit (whoever the guarantee
    protects: a user) with a key (an item). Repeats of a (unit, key) pair count once,
    and a unit with more than `max_keys` distinct keys keeps `max_keys` of them drawn
    uniformly at random (every pair gets an independent random priority; a unit keeps
    its lowest). The result is, per key, the number of units that kept it. Adding or
    removing all of one unit's rows changes that vector by at most `max_keys` in L1
    and sqrt(max_keys) in L2, whatever the other units did, because each kept pair
    adds 1 to a different key: those are the sensitivities the mechanisms below are
    calibrated to.

    The priorities must be fresh randomness (the default) for that bound to hold
    against someone who knows the other units' rows: with a fixed, known seed a
    unit's selection would depend on where its rows fall among everyone's. A seed is
    for tests and benchmarks only.

Release (`count_mechanism`, `CountMechanism.release`)
    δ = 0: OpenDP's `make_laplace` on the integer count vector with L1 sensitivity
    `max_keys` and scale `max_keys / ε` (raised by a few ulps when OpenDP's
    conservative rounding would put the loss a hair above ε); OpenDP samples it as
    the discrete Laplace, exactly, so no floating-point attack applies: ε-DP.
    δ > 0: OpenDP's `make_gaussian` on the counts as floats with L2 sensitivity
    sqrt(max_keys) (rounded up to the next float), its zero-concentrated guarantee
    converted to (ε, δ) by OpenDP (`make_zCDP_to_approxDP`, `make_fix_delta`); the
    scale is what OpenDP's binary search finds for the requested (ε, δ). The noisy
    floats are rounded to integers (post-processing, no privacy cost).

    Either way the measurement is built once, its privacy map is evaluated at the
    declared sensitivity, and a loss above the requested (ε, δ) is refused with an
    error rather than released.

Keys
    Counts are released for a key set fixed in advance (the catalogue), zero or not,
    so which keys occur is not itself released and no key-selection threshold (nor a
    δ spent on one) is needed. Released over only the keys that occur, the key set
    would leak and a thresholded mechanism would be required; this module offers none.

OpenDP flags these constructors `contrib` (implemented with proofs, not yet vetted by
its committee); `count_mechanism` enables that feature. Noise comes from OpenDP's own
CSPRNG and cannot be seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import numpy as np

from inkling.errors import InvalidInputError

MECHANISMS = ("laplace", "gaussian")
_MAX_ULP_STEPS = 64


@dataclass(frozen=True)
class BoundedCounts:
    """Per-key counts after bounding, and what bounding did.

    Only `counts` may be released (through a mechanism); the other figures describe
    the private data and are for the operator's log, never for an export.
    """

    counts: np.ndarray
    """int64 [n_keys]: units that kept each key."""
    units: int
    """Distinct privacy units in the input."""
    pairs: int
    """Distinct (unit, key) pairs before bounding."""
    kept: int
    """Pairs kept (at most `max_keys` per unit)."""


def bound_contributions(
    units: np.ndarray,
    keys: np.ndarray,
    n_keys: int,
    max_keys: int,
    rng: np.random.Generator | None = None,
) -> BoundedCounts:
    """Count, per key, the units that interacted with it, each unit with at most
    `max_keys` distinct keys (see the module docstring).

    Args:
        units: int codes of each row's privacy unit (any integers; equal code, same unit).
        keys: int codes of each row's key, in 0 .. n_keys - 1.
        n_keys: the size of the released key set.
        max_keys: the most distinct keys one unit may count towards.
        rng: where the selection's priorities come from; None (the default) draws
            fresh entropy from the OS, as a release must.

    Raises:
        InvalidInputError: mismatched lengths, a key code out of range, or a bound < 1.
    """
    _check_bound(max_keys)
    if n_keys < 0:
        raise InvalidInputError(f"n_keys must not be negative, got {n_keys}", field="n_keys")
    unit_codes = np.asarray(units, dtype=np.int64).ravel()
    key_codes = np.asarray(keys, dtype=np.int64).ravel()
    if len(unit_codes) != len(key_codes):
        raise InvalidInputError(
            f"units has {len(unit_codes)} rows and keys {len(key_codes)}; they must match"
        )
    if len(key_codes) and (key_codes.min() < 0 or key_codes.max() >= n_keys):
        raise InvalidInputError(f"key codes must lie in 0 .. {n_keys - 1}", field="keys")
    if len(unit_codes) == 0:
        return BoundedCounts(np.zeros(n_keys, dtype=np.int64), 0, 0, 0)

    order = np.lexsort((key_codes, unit_codes))
    u, k = unit_codes[order], key_codes[order]
    distinct = np.r_[True, (u[1:] != u[:-1]) | (k[1:] != k[:-1])]
    u, k = u[distinct], k[distinct]

    priority = (rng if rng is not None else np.random.default_rng()).random(len(u))
    order = np.lexsort((priority, u))
    u, k = u[order], k[order]
    positions = np.arange(len(u))
    opens = np.r_[True, u[1:] != u[:-1]]
    rank = positions - np.maximum.accumulate(np.where(opens, positions, 0))
    kept = rank < max_keys
    counts = np.bincount(k[kept], minlength=n_keys).astype(np.int64)
    return BoundedCounts(counts, int(opens.sum()), len(u), int(kept.sum()))


@dataclass(frozen=True)
class CountMechanism:
    """An OpenDP measurement that releases a count vector with a stated (ε, δ).

    `loss` is OpenDP's privacy map evaluated at the declared sensitivity (`max_keys`
    in L1 for Laplace, sqrt(max_keys) in L2 for Gaussian); it is at most the
    requested (ε, δ), or the mechanism would not have been built.
    """

    name: str
    """"laplace" (δ = 0) or "gaussian" (δ > 0)."""
    epsilon: float
    delta: float
    max_keys: int
    scale: float
    """The noise's scale parameter as OpenDP takes it (Laplace b; Gaussian σ)."""
    sensitivity: float
    """What the privacy map was evaluated at: L1 (Laplace) or L2 (Gaussian)."""
    loss: tuple[float, float]
    measurement: Any = field(repr=False, compare=False)
    """The OpenDP `Measurement`."""

    def release(self, counts: np.ndarray) -> np.ndarray:
        """int64 noisy counts (may be negative) of a bounded count vector.

        Raises:
            InvalidInputError: `counts` is not a 1-d vector of non-negative integers.
        """
        values = np.asarray(counts)
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise InvalidInputError(
                f"counts must be a 1-d integer vector, got {values.dtype} of shape {values.shape}"
            )
        if len(values) == 0:
            return np.zeros(0, dtype=np.int64)
        if values.min() < 0:
            raise InvalidInputError("counts must not be negative")
        if self.name == "laplace":
            noisy = self.measurement(values.astype(np.int64).tolist())
            return np.asarray(noisy, dtype=np.int64)
        noisy = self.measurement(values.astype(np.float64).tolist())
        return np.rint(np.asarray(noisy, dtype=np.float64)).astype(np.int64)

    def describe(self) -> dict[str, Any]:
        """What a release states about its privacy, for the export's header."""
        metric = "L1" if self.name == "laplace" else "L2"
        library = f"OpenDP {version('opendp')}"
        construction = (
            f"{library} make_laplace (discrete Laplace on integer counts)"
            if self.name == "laplace"
            else f"{library} make_gaussian on float counts, zCDP converted to (ε, δ) "
            "by make_zCDP_to_approxDP + make_fix_delta; rounded to integers"
        )
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "mechanism": self.name,
            "construction": construction,
            "noise_scale": self.scale,
            "max_items_per_unit": self.max_keys,
            "sensitivity": {"metric": metric, "value": self.sensitivity},
            "privacy_map_at_sensitivity": {"epsilon": self.loss[0], "delta": self.loss[1]},
        }


def count_mechanism(epsilon: float, delta: float, max_keys: int) -> CountMechanism:
    """The mechanism that releases counts bounded to `max_keys` keys per unit with
    (`epsilon`, `delta`): Laplace when `delta` is 0, else Gaussian (module docstring).

    Raises:
        InvalidInputError: ε not a positive finite number, δ outside [0, 1), a bound < 1,
            or (never expected) a measurement whose privacy map exceeds (ε, δ).
    """
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise InvalidInputError(
            f"epsilon must be a positive finite number, got {epsilon!r}", field="epsilon"
        )
    if not (isinstance(delta, int | float) and math.isfinite(delta) and 0 <= delta < 1):
        raise InvalidInputError(f"delta must lie in [0, 1), got {delta!r}", field="delta")
    _check_bound(max_keys)
    max_keys = int(max_keys)
    import opendp.prelude as dp

    dp.enable_features("contrib")
    epsilon, delta = float(epsilon), float(delta)
    if delta == 0:
        space = dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64")
        scale = max_keys / epsilon
        measurement = dp.m.make_laplace(*space, scale=scale)
        for _ in range(_MAX_ULP_STEPS):
            if measurement.map(max_keys) <= epsilon:
                break
            scale = math.nextafter(scale, math.inf)
            measurement = dp.m.make_laplace(*space, scale=scale)
        loss = (float(measurement.map(max_keys)), 0.0)
        name, sensitivity = "laplace", float(max_keys)
    else:
        sensitivity = math.nextafter(math.sqrt(max_keys), math.inf)
        space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l2_distance(T=float)

        def gaussian(sigma: float) -> Any:
            zcdp = dp.m.make_gaussian(*space, scale=sigma)
            return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(zcdp), delta)

        scale = float(dp.binary_search_param(gaussian, d_in=sensitivity, d_out=(epsilon, delta)))
        measurement = gaussian(scale)
        eps_out, delta_out = measurement.map(sensitivity)
        loss = (float(eps_out), float(delta_out))
        name = "gaussian"
    if loss[0] > epsilon or loss[1] > delta:
        raise InvalidInputError(
            f"the {name} mechanism's privacy map gives (ε={loss[0]}, δ={loss[1]}) at "
            f"sensitivity {sensitivity}, above the requested (ε={epsilon}, δ={delta})"
        )
    return CountMechanism(name, epsilon, delta, max_keys, scale, sensitivity, loss, measurement)


def _check_bound(max_keys: int) -> None:
    if isinstance(max_keys, bool) or not isinstance(max_keys, int | np.integer) or max_keys < 1:
        raise InvalidInputError(
            f"the contribution bound (items per user) must be an integer of at least 1, "
            f"got {max_keys!r}",
            field="max_items",
        )
