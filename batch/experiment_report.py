"""`inkling experiment report NAME`: per-arm outcomes and a sequential test safe to peek at.

Input: labelled impressions (`batch.attribution`; the simulator's have the same
columns) of one experiment, and item prices for revenue. The unit of analysis is the
answer (request): its impressions, clicks, whether it led to a purchase, and its
revenue (prices of purchased items). Per arm:

- CTR = clicks / impressions, with a delta-method standard error over requests (clicks
  of one list are not independent), and a 95 % interval;
- conversion = the share of requests with a purchase; revenue per request; each with a
  95 % interval (normal approximation).

Each treatment arm is compared with the control arm (`control`) by a mixture
sequential probability ratio test (mSPRT; Johari, Pekelis and Walsh, "Always valid
inference", 2017) on the difference of the metric, with the normal approximation of the
estimate (difference theta, variance V from the standard errors above) and a normal
mixing distribution of variance tau² over the effect:

    Lambda = sqrt(V / (V + tau²)) * exp(theta² tau² / (2 V (V + tau²)))

The always-valid p-value is the running minimum of min(1, 1/Lambda) over the checkpoints
(every `checkpoint_s`, default hourly, on all data up to then), and the matching
confidence sequence is theta ± sqrt(V (V + tau²) / tau² * (log((V + tau²) / V) + 2 log(1/alpha))).
So the report may be run every hour and stopped the first time p <= alpha without
inflating the false-positive rate beyond alpha (checked on the simulator: repeated A/A
runs, and the power to find a known lift). tau = `tau_relative` x the pooled metric at
that checkpoint: the effect size the test is most sensitive to (default 5 %).

Decision: the treatment wins (or loses) at the first checkpoint where p <= alpha, by the
sign of the difference; otherwise no decision is possible yet.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

Z95 = 1.959963984540054
METRICS = ("ctr", "conversion", "revenue_per_request")


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class ArmSummary:
    arm: str
    requests: int
    impressions: int
    clicks: int
    purchases: int
    revenue: float
    ctr: Estimate
    conversion: Estimate
    revenue_per_request: Estimate


@dataclass(frozen=True)
class Checkpoint:
    at: str
    """ISO time (UTC): data served up to then."""
    difference: float
    """Treatment minus control."""
    relative: float
    """The difference over the control's value."""
    low: float
    high: float
    """The confidence sequence for the difference at this checkpoint."""
    p_value: float
    """Always valid: the running minimum up to this checkpoint."""


@dataclass(frozen=True)
class Comparison:
    treatment: str
    metric: str
    checkpoints: list[Checkpoint]
    decided_at: str | None
    verdict: str
    """`<treatment> wins`, `<treatment> loses`, or `no decision yet`."""


@dataclass
class ExperimentReport:
    experiment: str
    control: str
    alpha: float
    tau_relative: float
    arms: list[ArmSummary]
    comparisons: list[Comparison] = field(default_factory=list)

    def comparison(self, treatment: str, metric: str = "ctr") -> Comparison:
        return next(c for c in self.comparisons if c.treatment == treatment and c.metric == metric)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def markdown(self) -> str:
        lines = [
            f"# Experiment {self.experiment}",
            "",
            f"Control: `{self.control}`; mSPRT at alpha = {self.alpha}, tau = "
            f"{self.tau_relative:.0%} of the pooled metric; 95 % intervals per arm.",
            "",
            "| arm | requests | impressions | clicks | CTR | conversion | revenue / request |",
            "| --- | ---: | ---: | ---: | --- | --- | --- |",
        ]
        for a in self.arms:
            lines.append(
                f"| {a.arm} | {a.requests:,} | {a.impressions:,} | {a.clicks:,} "
                f"| {_pct(a.ctr)} | {_pct(a.conversion)} | {_num(a.revenue_per_request)} |"
            )
        lines += ["", "| treatment | metric | difference | relative | confidence sequence | p (always valid) | verdict |",
                  "| --- | --- | ---: | ---: | --- | ---: | --- |"]  # fmt: skip
        for c in self.comparisons:
            last = c.checkpoints[-1]
            when = f" at {c.decided_at}" if c.decided_at else ""
            lines.append(
                f"| {c.treatment} | {c.metric} | {last.difference:+.5f} | {last.relative:+.1%} "
                f"| [{last.low:+.5f}, {last.high:+.5f}] | {last.p_value:.4f} | {c.verdict}{when} |"
            )
        return "\n".join(lines)


def _pct(e: Estimate) -> str:
    return f"{e.value:.2%} [{e.low:.2%}, {e.high:.2%}]"


def _num(e: Estimate) -> str:
    return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"


@dataclass(frozen=True)
class _Requests:
    """Per request, in the order served."""

    served_us: np.ndarray
    arm: np.ndarray
    impressions: np.ndarray
    clicks: np.ndarray
    purchased: np.ndarray
    revenue: np.ndarray


def _requests(impressions: pa.Table, prices: dict[str, float]) -> _Requests:
    clicked = pc.cast(impressions.column("clicked"), pa.int64())
    bought = pc.cast(impressions.column("purchased"), pa.int64())
    price = np.array(
        [prices.get(i, 0.0) for i in impressions.column("item_id").to_pylist()], np.float64
    )
    table = pa.table(
        {
            "request_id": impressions.column("request_id"),
            "arm": impressions.column("arm"),
            "served_us": pc.cast(impressions.column("served_at"), pa.int64()),
            "one": pa.array(np.ones(impressions.num_rows, np.int64)),
            "clicked": clicked,
            "bought": bought,
            "spent": pa.array(price * bought.to_numpy(zero_copy_only=False)),
        }
    )
    grouped = table.group_by("request_id").aggregate(
        [("arm", "min"), ("served_us", "min"), ("one", "sum"), ("clicked", "sum"),
         ("bought", "sum"), ("spent", "sum")]
    ).sort_by("served_us_min")  # fmt: skip
    return _Requests(
        served_us=grouped.column("served_us_min").to_numpy(),
        arm=np.asarray(grouped.column("arm_min").to_pylist(), dtype=object),
        impressions=grouped.column("one_sum").to_numpy().astype(np.float64),
        clicks=grouped.column("clicked_sum").to_numpy().astype(np.float64),
        purchased=(grouped.column("bought_sum").to_numpy() > 0).astype(np.float64),
        revenue=grouped.column("spent_sum").to_numpy().astype(np.float64),
    )


def _ratio(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """A ratio of sums over requests and its delta-method variance."""
    total = den.sum()
    if total <= 0:
        return math.nan, math.nan
    ratio = num.sum() / total
    residual = num - ratio * den
    n = len(num)
    variance = (residual**2).sum() / total**2 * (n / max(n - 1, 1))
    return float(ratio), float(variance)


def _metric(r: _Requests, mask: np.ndarray, metric: str) -> tuple[float, float]:
    if metric == "ctr":
        return _ratio(r.clicks[mask], r.impressions[mask])
    values = r.purchased[mask] if metric == "conversion" else r.revenue[mask]
    return _ratio(values, np.ones(int(mask.sum())))


def _interval(value: float, variance: float) -> Estimate:
    half = Z95 * math.sqrt(variance) if variance == variance else math.nan
    return Estimate(value, value - half, value + half)


def msprt(theta: float, variance: float, tau2: float) -> float:
    """The mixture likelihood ratio Lambda for an estimate `theta` of variance `variance`."""
    if not (variance > 0 and tau2 > 0):
        return 1.0
    exponent = theta**2 * tau2 / (2 * variance * (variance + tau2))
    return math.sqrt(variance / (variance + tau2)) * math.exp(min(exponent, 700.0))


def confidence_radius(variance: float, tau2: float, alpha: float) -> float:
    """Half the width of the mSPRT's confidence sequence at this variance."""
    if not (variance > 0 and tau2 > 0):
        return math.inf
    return math.sqrt(
        variance * (variance + tau2) / tau2
        * (math.log((variance + tau2) / variance) + 2 * math.log(1 / alpha))
    )  # fmt: skip


def build_report(
    impressions: pa.Table,
    experiment: str,
    *,
    control: str = "control",
    prices: dict[str, float] | None = None,
    alpha: float = 0.05,
    tau_relative: float = 0.05,
    checkpoint_s: int = 3600,
) -> ExperimentReport:
    """The report over `impressions` (rows of other experiments are ignored).

    Raises:
        ValueError: no impressions of the experiment, or no control arm, or no other arm.
    """
    if "experiment" in impressions.column_names:
        impressions = impressions.filter(pc.equal(impressions.column("experiment"), experiment))
    impressions = impressions.filter(pc.is_valid(impressions.column("arm")))
    if impressions.num_rows == 0:
        raise ValueError(f"no impressions of experiment {experiment!r}: run `inkling attribute`")
    r = _requests(impressions, prices or {})
    names = sorted(set(r.arm.tolist()))
    if control not in names:
        raise ValueError(f"experiment {experiment!r} has no arm {control!r} (arms: {names})")
    if len(names) < 2:
        raise ValueError(f"experiment {experiment!r} has only the arm {control!r}")
    arms = []
    for name in names:
        mask = r.arm == name
        estimates = {m: _interval(*_metric(r, mask, m)) for m in METRICS}
        arms.append(
            ArmSummary(
                arm=name,
                requests=int(mask.sum()),
                impressions=int(r.impressions[mask].sum()),
                clicks=int(r.clicks[mask].sum()),
                purchases=int(r.purchased[mask].sum()),
                revenue=float(r.revenue[mask].sum()),
                **estimates,
            )
        )
    report = ExperimentReport(experiment, control, alpha, tau_relative, arms)
    first, last = int(r.served_us[0]), int(r.served_us[-1])
    step = checkpoint_s * 1_000_000
    cuts = [*range(first + step, last, step), last + 1]
    for treatment in (n for n in names if n != control):
        for metric in METRICS:
            report.comparisons.append(
                _compare(r, control, treatment, metric, cuts, alpha, tau_relative)
            )
    return report


def _compare(
    r: _Requests,
    control: str,
    treatment: str,
    metric: str,
    cuts: list[int],
    alpha: float,
    tau_relative: float,
) -> Comparison:
    checkpoints: list[Checkpoint] = []
    p_value = 1.0
    decided_at: str | None = None
    verdict = "no decision yet"
    for cut in cuts:
        upto = r.served_us < cut
        a_value, a_var = _metric(r, upto & (r.arm == control), metric)
        b_value, b_var = _metric(r, upto & (r.arm == treatment), metric)
        pooled, _ = _metric(r, upto & ((r.arm == control) | (r.arm == treatment)), metric)
        if not all(math.isfinite(x) for x in (a_value, b_value, a_var, b_var, pooled)):
            continue
        theta, variance = b_value - a_value, a_var + b_var
        tau2 = (tau_relative * pooled) ** 2
        p_value = min(p_value, 1.0 / msprt(theta, variance, tau2))
        radius = confidence_radius(variance, tau2, alpha)
        at = np.datetime64(int(min(cut, r.served_us[-1])), "us").astype(str) + "Z"
        checkpoints.append(
            Checkpoint(
                at=at,
                difference=theta,
                relative=theta / a_value if a_value else math.nan,
                low=theta - radius,
                high=theta + radius,
                p_value=min(1.0, p_value),
            )
        )
        if decided_at is None and p_value <= alpha:
            decided_at = at
            verdict = f"{treatment} {'wins' if theta > 0 else 'loses'}"
    return Comparison(treatment, metric, checkpoints, decided_at, verdict)


def plot_report(report: ExperimentReport, path: Path) -> None:
    """The relative difference in CTR and its confidence sequence over time, per treatment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    control = next(a for a in report.arms if a.arm == report.control).ctr.value
    for c in (c for c in report.comparisons if c.metric == "ctr"):
        x = np.array([np.datetime64(p.at.rstrip("Z")) for p in c.checkpoints])
        ax.plot(
            x, [p.difference / control for p in c.checkpoints], label=f"{c.treatment}: {c.verdict}"
        )
        ax.fill_between(
            x,
            [p.low / control for p in c.checkpoints],
            [p.high / control for p in c.checkpoints],
            alpha=0.2,
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel(f"CTR vs {report.control} (relative)")
    ax.set_title(f"{report.experiment}: estimate and {1 - report.alpha:.0%} confidence sequence")
    ax.legend(loc="upper right")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: ExperimentReport, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "ctr.png"}
    paths["json"].write_text(report.to_json())
    plot_report(report, paths["plot"])
    paths["markdown"].write_text(report.markdown() + "\n\n![CTR over time](ctr.png)\n")
    return paths


@dataclass(frozen=True)
class Validation:
    """How often the report decided, over repeated seeded simulations."""

    runs: int
    requests: int
    lift: float
    decided: int
    """Runs in which the test decided (for lift 0: false positives; else: the treatment won)."""
    rate: float
    low: float
    high: float
    """A 95 % Clopper-Pearson interval for the rate."""


def item_prices(items: pa.Table) -> dict[str, float]:
    """item_id -> price of a catalogue table; a missing price counts as 0 revenue."""
    return {
        i: float(p or 0.0)
        for i, p in zip(
            items.column("item_id").to_pylist(), items.column("price").to_pylist(), strict=True
        )
    }


def catalogue_prices(catalog: Path) -> dict[str, float]:
    """`item_prices` of the catalogue file, or none when there is no catalogue."""
    if not catalog.exists():
        return {}
    return item_prices(pq.read_table(catalog, columns=["item_id", "price"]))


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """The exact (Clopper-Pearson) 95 % interval of a binomial rate, by bisection."""

    def solve(target: float, cdf_at: int) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if _binomial_cdf(cdf_at, n, mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if k == 0 else solve(0.975, k - 1)  # P(X >= k) = 0.025
    high = 1.0 if k == n else solve(0.025, k)  # P(X <= k) = 0.025
    return low, high


def validate(
    items: pa.Table,
    *,
    runs: int,
    requests: int,
    lift: float,
    alpha: float = 0.05,
    seed: int = 0,
    users: int = 3_000,
    hours: int = 24,
) -> Validation:
    """Simulate `runs` experiments (control vs a candidate with `lift`, half the users
    each, different seeds) and count the decisions of the CTR test, peeking hourly."""
    from batch.simulate import SimArm, SimulationConfig, simulate

    prices = item_prices(items)
    decided = 0
    for run in range(runs):
        config = SimulationConfig(
            requests=requests, users=users, hours=hours, seed=seed + run,
            candidates=min(100, items.num_rows), list_size=min(10, items.num_rows),
            arms=(SimArm("control", 0.5), SimArm("candidate", 0.5, lift=lift)),
        )  # fmt: skip
        sim = simulate(config, items)
        report = build_report(sim.impressions, config.experiment, prices=prices, alpha=alpha)
        verdict = report.comparison("candidate").verdict
        decided += verdict != "no decision yet" if lift == 0 else verdict == "candidate wins"
    low, high = _clopper_pearson(decided, runs)
    return Validation(runs, requests, lift, decided, decided / runs, low, high)
