"""deploy/observability: the alert rules, their promtool unit tests, the example scrape
config and the Grafana dashboard are valid, and name only metrics inkling exports.

The exported names come from the source of truth: every instrument that
`inkling/telemetry/instruments.py` creates is created again (same kind, name and unit)
on a private meter provider whose reader is the Prometheus exporter inkling serves
with, and the names are read from what that exporter produces. Every PromQL expression
of the dashboard is checked by promtool as a recording rule, its Grafana variables
replaced by concrete values.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry

from inkling.config import PROJECT_ROOT
from inkling.telemetry.providers import DEFAULT_METRICS_PORTS, SERVICE_NAMES

OBSERVABILITY = PROJECT_ROOT / "deploy" / "observability"
ALERTS = OBSERVABILITY / "alerts.yml"
ALERTS_TEST = OBSERVABILITY / "alerts_test.yml"
PROMETHEUS_CONFIG = OBSERVABILITY / "prometheus.yml"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
INSTRUMENTS = PROJECT_ROOT / "inkling" / "telemetry" / "instruments.py"
PROTOS = PROJECT_ROOT / "protos" / "inkling" / "v1"

PROMETHEUS_BUILTINS = {"up"}
"""Series Prometheus writes itself for every target."""

LABELS = {
    # Prometheus: the bucket bound, and the target's job and address (prometheus.yml).
    "le",
    "job",
    "instance",
    # The attributes inkling records, as the exporter names them (dots become _).
    "rpc_method",
    "rpc_system_name",
    "rpc_response_status_code",
    "stage",
    "source",
    "reason",
    "operation",
    "policy",
    "explored",
    "snapshot",
    "role",
    "model",
    "version",
    "index",
    "feature_service",
    "partition",
}
"""Label names the exported series carry (resource attributes are on target_info only)."""

OPERATIONS = {
    "recommend",  # ranking_server/core.py, count_degraded for Recommend
    "rank_candidates",  # ranking_server/core.py, count_degraded for RankCandidates
    "retrieve",  # retrieval_server/core.py, count_degraded
    "read_rows",  # inkling/feature_store/rows.py, the online store metrics
}

SCRAPED_FROM_RANKING = {
    # The inkling families of a real scrape of a ranking process (a test run): the
    # derivation of the exported names must agree with the exporter at work.
    **dict.fromkeys(
        [
            "inkling_snapshot_build_duration_seconds",
            "inkling_online_store_duration_seconds",
            "inkling_stage_duration_seconds",
            "inkling_candidates",
            "rpc_server_call_duration_seconds",
            "rpc_client_call_duration_seconds",
        ],
        "histogram",
    ),
    "inkling_snapshot_age_seconds": "gauge",
    "inkling_model_info": "gauge",
}

GRAFANA_VARIABLES = {
    "job": "inkling-ranking|inkling-retrieval",  # a multi-value $job in a =~ matcher
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
}
"""Concrete values for the Grafana variables the dashboard's queries may use."""

REQUIRED_PANELS = {
    "RPC latency by method (p50, p99)",
    "Latency by stage (p50, p99)",
    "Request rate by status code",
    "Error rate by status code",
    "Degraded share by reason",
    "Candidates per source (p50)",
    "Event freshness (p50, p99, p99.9)",
    "Bus lag by partition",
    "Dead letters",
    "Worker batch size",
    "Ingest rejected by reason (events/s)",
    "Snapshot age",
    "Snapshot build duration (mean)",
    "Online store round trip (p50, p99)",
    "Online store errors",
    "Model versions live",
}


# --------------------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is missing: `make promtool` (run by `make test`) installs Debian's "
            "prometheus package, or: apt-get install prometheus",
            pytrace=False,
        )
    return path


def run_promtool(promtool: str, *args: str | Path) -> str:
    """Run promtool from the project root; fail with its output unless it exits 0."""
    done = subprocess.run(
        [promtool, *map(str, args)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{output}"
    return output


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", ALERTS.relative_to(PROJECT_ROOT))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_alert_rules_pass_their_promtool_unit_tests(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", ALERTS_TEST.relative_to(PROJECT_ROOT))


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    """alerts_test.yml has, for every alert, a case where it fires and one where it must not."""
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - firing == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"
    assert (firing | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_every_alert_has_a_for_a_severity_and_says_what_to_look_at() -> None:
    for rule in alert_rules():
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 80, rule["alert"]


def test_example_scrape_config_passes_promtool_and_uses_the_default_ports(promtool: str) -> None:
    run_promtool(promtool, "check", "config", PROMETHEUS_CONFIG.relative_to(PROJECT_ROOT))
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [ALERTS.name]
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {
        SERVICE_NAMES[role]: [f"127.0.0.1:{port}"] for role, port in DEFAULT_METRICS_PORTS.items()
    }


def test_dashboard_queries_pass_promtool_as_recording_rules(promtool: str, tmp_path: Path) -> None:
    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:{q.key}", "expr": grafana_to_promql(q.expr)}
                    for q in queries
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    output = run_promtool(promtool, "check", "rules", path)
    assert f"SUCCESS: {len(queries)} rules found" in output


# ------------------------------------------------------------------ exported names


def instruments() -> list[tuple[str, str, str]]:
    """(create_* method, name, unit) of every instrument instruments.py creates."""
    found = []
    for node in ast.walk(ast.parse(INSTRUMENTS.read_text())):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr.startswith("create_")
        ):
            continue
        name = node.args[0]
        assert isinstance(name, ast.Constant) and isinstance(name.value, str), ast.dump(node)
        unit = next((k.value for k in node.keywords if k.arg == "unit"), ast.Constant(""))
        assert isinstance(unit, ast.Constant) and isinstance(unit.value, str), ast.dump(node)
        found.append((node.func.attr, name.value, unit.value))
    return found


def exported_series() -> dict[str, str]:
    """Series name -> family type, as inkling's Prometheus exporter names them."""

    def observe(options: CallbackOptions) -> Iterator[Observation]:
        yield Observation(1.0)

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    meter = provider.get_meter("inkling")
    try:
        for create, name, unit in instruments():
            if create.startswith("create_observable_"):
                getattr(meter, create)(name, callbacks=[observe], unit=unit)
            elif create == "create_histogram":
                meter.create_histogram(name, unit=unit).record(1.0)
            elif create in {"create_counter", "create_up_down_counter"}:
                getattr(meter, create)(name, unit=unit).add(1)
            else:  # a synchronous gauge
                getattr(meter, create)(name, unit=unit).set(1.0)
        return {
            sample.name: family.type
            for family in registry.collect()
            for sample in family.samples
            if sample.name != "target_info"  # the resource, not an instrument
        }
    finally:
        provider.shutdown()


def test_exported_names_agree_with_a_real_scrape() -> None:
    series = exported_series()
    assert len({name for _, name, _ in instruments()}) == len(instruments()) > 10
    for family, kind in SCRAPED_FROM_RANKING.items():
        suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
        for suffix in suffixes:
            assert series.get(family + suffix) == kind, family + suffix
    # The worker's and ingest's, not in that scrape: units in braces are dropped,
    # counters end in _total.
    assert series["inkling_event_freshness_seconds_bucket"] == "histogram"
    assert series["inkling_worker_batch_size_bucket"] == "histogram"
    assert series["inkling_bus_lag"] == "gauge"
    assert series["inkling_bus_dead_letters_total"] == "counter"
    assert series["inkling_ingest_rejected_total"] == "counter"
    assert series["inkling_recommend_degraded_total"] == "counter"


def test_alerts_and_dashboard_name_only_exported_metrics_and_labels() -> None:
    exported = set(exported_series()) | PROMETHEUS_BUILTINS
    queries = [Query(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    queries += [Query(q.key, grafana_to_promql(q.expr), q.legend) for q in dashboard_queries()]
    used: set[str] = set()
    for q in queries:
        names = metric_names(q.expr)
        assert names, f"{q.key}: no metric found in {q.expr}"
        assert names <= exported, f"{q.key}: not exported: {sorted(names - exported)}"
        used |= names
        labels = label_names(q.expr)
        assert labels <= LABELS, f"{q.key}: unknown labels {sorted(labels - LABELS)}"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", q.legend))
        kept = grouping_labels(q.expr)
        assert legend <= kept, f"{q.key}: legend labels {sorted(legend - kept)} aggregated away"
        check_label_values(q.key, q.expr)
    # Every family inkling exports has a panel or an alert.
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in exported_series()}
    unused = {f for f in families if not any(u.startswith(f) for u in used)}
    assert unused == set(), f"exported but on no panel: {sorted(unused)}"


# ------------------------------------------------------------------------ dashboard


def test_dashboard_has_the_panels_and_can_be_imported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["job"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert variables["job"]["multi"] and variables["job"]["includeAll"]
    titles = [p["title"] for p in panels(dashboard)]
    assert set(titles) >= REQUIRED_PANELS, sorted(REQUIRED_PANELS - set(titles))
    assert len(titles) == len(set(titles))
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert 'job=~"$job"' in target["expr"], f"{panel['title']}: not filtered by $job"


def test_model_table_shows_what_each_role_serves() -> None:
    (panel,) = [p for p in panels(json.loads(DASHBOARD.read_text())) if p["type"] == "table"]
    (target,) = panel["targets"]
    assert target["instant"] and target["format"] == "table"
    assert "inkling_model_info" in target["expr"]
    assert {"role", "model", "version", "index", "feature_service"} <= grouping_labels(
        target["expr"]
    )


# -------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Query:
    key: str
    expr: str
    legend: str = ""


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[Query]:
    """Every PromQL expression of the dashboard: its panels' and its variables'."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            key = f"panel_{panel['id']}_{target['refId']}"
            queries.append(Query(key, target["expr"], target.get("legendFormat", "")))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            # label_values(<selector>, <label>) is Grafana's; the selector is PromQL.
            selector = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text)
            assert selector, f"variable {variable['name']}: {text}"
            queries.append(Query(f"variable_{variable['name']}", selector.group(1)))
    return queries


def grafana_to_promql(expr: str) -> str:
    """`expr` with its Grafana variables ($job, ${job}, $__rate_interval, ...) replaced."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS |= {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: what is left once strings, label matchers, ranges,
    grouping clauses, functions and keywords are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(GROUPING, " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        function = text[match.end() :].lstrip().startswith("(")
        if not function and match.group() not in KEYWORDS:
            names.add(match.group())
    return names


MATCHER = r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"'


def label_matchers(expr: str) -> Iterator[tuple[str, str, str]]:
    """(label, operator, value) of every matcher in `expr`."""
    for block in re.findall(r"\{([^}]*)\}", expr):
        yield from re.findall(MATCHER, block)


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip() for labels in re.findall(GROUPING, expr) for label in labels.split(",")
    } - {""}


def label_names(expr: str) -> set[str]:
    return {label for label, _, _ in label_matchers(expr)} | grouping_labels(expr)


def rpc_methods() -> set[str]:
    """`inkling.v1.Service/Method` of every RPC the protos define."""
    methods = set()
    for proto in PROTOS.glob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+);", text, re.M)
        assert package, proto
        for service, body in re.findall(r"^service\s+(\w+)\s*\{(.*?)^\}", text, re.M | re.S):
            for method in re.findall(r"^\s*rpc\s+(\w+)\s*\(", body, re.M):
                methods.add(f"{package.group(1)}.{service}/{method}")
    return methods


def check_label_values(key: str, expr: str) -> None:
    """Matchers on labels whose values are known name real values: an equality matcher
    one of them, each alternative of a regex of plain alternatives one of them, any
    other regex at least one of them."""
    known = {
        "rpc_method": rpc_methods(),
        "rpc_response_status_code": {code.name for code in grpc.StatusCode},
        "operation": OPERATIONS,
        "job": set(SERVICE_NAMES.values()),
    }
    assert len(known["rpc_method"]) >= 4
    for label, op, value in label_matchers(expr):
        if label not in known:
            continue
        values = known[label]
        if op in {"=", "!="}:
            assert value in values, f"{key}: {label}{op}{value!r} names no real value"
        elif re.fullmatch(r"[\w-]+(\|[\w-]+)*", value):
            assert set(value.split("|")) <= values, f"{key}: {label}{op}{value!r}"
        else:
            assert any(re.fullmatch(value, v) for v in values), f"{key}: {label}{op}{value!r}"
