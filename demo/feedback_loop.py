"""The demo's feedback loop: what was served, what users did, what the experiment says,
and one retraining run with its drift report and decision.

The demo's own Recommend answers are already in the serve log (the ranking server
recorded them; the live session's stream worker wrote them). Then the simulator
(`batch.simulate`) serves a day of answers as an experiment between the ranker in
service (control) and a candidate with a known +5 % CTR lift, and its users respond by
the click model; attribution joins everything back; the experiment report reads it;
`inkling retrain` runs once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from batch.attribution import AttributionStats, run_attribution
from batch.experiment_report import ExperimentReport, build_report, item_prices, write_report
from batch.generate import default_start
from batch.retrain import Gates, RetrainResult, run_retrain
from batch.simulate import SimArm, SimulationConfig, simulate
from inkling.config import Settings
from inkling.events.eventlog import EventLog
from inkling.events.servelog import ServeLog
from inkling.models.registry import ModelRegistry

EXPERIMENT = "ranker-ab"
REQUESTS = 40_000
LIFT = 0.05


@dataclass
class LoopResult:
    recorded: int
    """Answers of the demo's own servers in the serve log."""
    simulated: int
    true_lift: float
    """The simulated candidate's CTR over control's, by the click model's probabilities."""
    attribution: AttributionStats
    report: ExperimentReport
    report_path: str
    retrain: RetrainResult


def feedback_loop_demo(live: Settings, spark: Any, retrain_seconds: float) -> LoopResult:
    recorded = ServeLog(live.serves_dir).read(["request_id"]).num_rows
    items = pq.read_table(live.catalog_dir / "items.parquet")
    current = ModelRegistry(live.data_dir / "registry").served_version("ranker") or "none"
    config = SimulationConfig(
        requests=REQUESTS, users=1_500, hours=24, start=f"{default_start(1)}T00:00:00",
        experiment=EXPERIMENT, seed=11,
        arms=(SimArm("control", 0.5, model_version=f"ranker:{current}"),
              SimArm("candidate", 0.5, lift=LIFT, model_version="ranker:candidate")),
    )  # fmt: skip
    sim = simulate(config, items)
    EventLog(live.events_dir).append(sim.events)
    ServeLog(live.serves_dir).append(sim.serves, prefix="simulated")
    truth = sim.impressions.group_by("arm").aggregate([("click_probability", "mean")])
    ctr = dict(zip(truth.column(0).to_pylist(), truth.column(1).to_pylist(), strict=True))
    stats = run_attribution(spark, live.serves_dir, live.events_dir, live.impressions_dir)
    impressions = ds.dataset(str(live.impressions_dir), partitioning="hive").to_table()
    report = build_report(impressions, EXPERIMENT, prices=item_prices(items))
    paths = write_report(report, live.data_dir / "experiments" / EXPERIMENT)
    retrained = run_retrain(live, spark, seconds=retrain_seconds, gates=Gates())
    return LoopResult(
        recorded=recorded,
        simulated=sim.serves.num_rows,
        true_lift=ctr["candidate"] / ctr["control"] - 1,
        attribution=stats,
        report=report,
        report_path=str(paths["markdown"]),
        retrain=retrained,
    )


def render_loop(result: LoopResult) -> str:
    a = result.attribution
    decision = result.retrain.decisions[-1]
    lines = [
        f"serve log: {result.recorded} answers of the demo's own servers, and "
        f"{result.simulated:,} simulated ones (experiment {EXPERIMENT}: control = the ranker in "
        f"service, candidate = a known {LIFT:+.0%} click lift; {result.true_lift:+.1%} by the "
        "click model's probabilities on the lists served)",
        f"attribution: {a.impressions:,} impressions of {a.answers:,} answers; "
        f"{sum(a.by_request_id.values()):,} events matched by request id, "
        f"{sum(a.by_user_or_session.values()):,} by user or session, "
        f"{a.unmatched_request_ids} naming an answer not in the log",
        "",
        result.report.markdown(),
        f"\n(written with its plot: {result.report_path})",
        "",
        f"retrain: candidate {result.retrain.candidate}: {decision['action']}",
        *[f"  - {reason}" for reason in decision["reasons"]],
    ]
    if result.retrain.drift is not None:
        lines += ["", result.retrain.drift.read_text()]
    return "\n".join(lines)
