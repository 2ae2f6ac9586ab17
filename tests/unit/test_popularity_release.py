"""`inkling export popularity`: the release over a real event log, through the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.popularity_release import release_popularity
from inkling.cli import main
from inkling.errors import NotFoundError
from inkling.events.eventlog import EventLog
from inkling.events.schema import ITEM_SCHEMA, conform, validate
from inkling.privacy.ledger import Budget, PrivacyLedger

T0 = datetime(2026, 3, 10, 12, tzinfo=UTC)
"""The window's last day is T0's; events are placed by days before it."""
NO_NOISE = 1e4
"""An ε whose Laplace noise is zero but with probability ~e^-2000 (scale k / 1e4): the
release then shows the bounded counts themselves."""


def write_log(data_dir: Path, rows: list[tuple]) -> None:
    """rows: (user or None, session, item or None, event_type, days before T0)."""
    records = [
        {"event_id": f"e{n:05d}", "user_id": user, "session_id": session, "item_id": item,
         "event_type": kind, "timestamp": T0 - timedelta(days=days_back, minutes=n % 600)}
        for n, (user, session, item, kind, days_back) in enumerate(rows)
    ]  # fmt: skip
    result = validate(conform(pa.Table.from_pylist(records)))
    assert not result.rejected
    EventLog(data_dir / "events").append(result.valid)


def write_catalogue(data_dir: Path, items: list[str]) -> None:
    (data_dir / "catalog").mkdir(parents=True, exist_ok=True)
    rows = [{"item_id": i, "category": "c", "in_stock": True, "blocked": False} for i in items]
    pq.write_table(
        pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), data_dir / "catalog" / "items.parquet"
    )


def config(tmp_path: Path, epsilon_per_day: float = 1e5, max_items: int = 3) -> Path:
    path = tmp_path / "inkling.toml"
    path.write_text(
        f"[privacy]\nepsilon_per_day = {epsilon_per_day}\nmax_items_per_user = {max_items}\n"
    )
    return path


def export(tmp_path: Path, *flags: str, cfg: Path | None = None) -> int:
    data_dir = tmp_path / "data"
    return main(
        ["--config", str(cfg or config(tmp_path)), "--data-dir", str(data_dir),
         "export", "popularity", *flags]
    )  # fmt: skip


def counts(path: Path) -> dict[str, int]:
    return {row["item_id"]: row["count"] for row in json.loads(path.read_text())["items"]}


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    """A heavy user, light users, an anonymous session, and events outside the window."""
    data_dir = tmp_path / "data"
    heavy = [("heavy", "s-h", f"i{n:02d}", "click", n % 5) for n in range(20)] * 2
    rows = [
        *heavy,
        ("ann", "s-a", "i00", "click", 1),
        ("ann", "s-a", "i00", "purchase", 1),  # a repeat of a pair counts once
        ("ann", "s-a", "i01", "add_to_cart", 2),
        ("bob", "s-b", "i00", "item_view", 0),  # an impression, not an interaction
        ("bob", "s-b", None, "page_view", 0),
        ("bob", "s-b", "i01", "click", 9),  # before a 7-day window
        *[(None, "s-anon", f"i{n:02d}", "click", 3) for n in range(10, 16)],
        ("cat", "s-c", "not-in-catalogue", "click", 0),
    ]
    write_log(data_dir, rows)
    write_catalogue(data_dir, [f"i{n:02d}" for n in range(30)])
    return data_dir


def test_the_release_counts_bounded_users_over_the_whole_catalogue(
    tmp_path: Path, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "popularity.json"
    assert export(tmp_path, "--epsilon", str(NO_NOISE), "--out", str(out)) == 0
    doc = json.loads(out.read_text())
    released = counts(out)
    assert sorted(released) == [f"i{n:02d}" for n in range(30)]  # unobserved items too
    # heavy (20 items), the anonymous session (6 items): 3 each; ann: i00 once, i01.
    assert sum(released.values()) == 3 + 3 + 2
    assert released["i00"] >= 1 and released["i01"] >= 1
    assert sum(released[f"i{n:02d}"] for n in range(20, 30)) == 0
    assert doc["window"] == {"first_day": "2026-03-04", "last_day": "2026-03-10", "days": 7}
    privacy = doc["privacy"]
    assert (privacy["epsilon"], privacy["delta"], privacy["mechanism"]) == (
        NO_NOISE,
        0.0,
        "laplace",
    )
    assert privacy["max_items_per_unit"] == 3
    assert privacy["sensitivity"] == {"metric": "L1", "value": 3.0}
    assert privacy["noise_scale"] == pytest.approx(3 / NO_NOISE)
    summary = json.loads(capsys.readouterr().out)
    assert summary["release_id"] == doc["release_id"] == privacy["ledger_record"]
    ledger = [json.loads(line) for line in (shop / "privacy" / "ledger.jsonl").open()]
    assert [(r["release_id"], r["epsilon"], r["first_day"], r["last_day"]) for r in ledger] == [
        (doc["release_id"], NO_NOISE, "2026-03-04", "2026-03-10")
    ]
    assert ledger[0]["details"]["max_items_per_unit"] == 3


def test_a_longer_window_and_a_larger_bound_count_more(tmp_path: Path, shop: Path) -> None:
    out = tmp_path / "popularity.json"
    flags = ("--epsilon", str(NO_NOISE), "--days", "10", "--max-items", "50", "--out", str(out))
    assert export(tmp_path, *flags) == 0
    released = counts(out)
    assert sum(released.values()) == 20 + 6 + 2 + 1  # bob's click 9 days back is in
    assert released["i01"] == 3


def test_gaussian_release_states_its_delta(tmp_path: Path, shop: Path) -> None:
    out = tmp_path / "popularity.json"
    assert export(tmp_path, "--epsilon", "1", "--delta", "1e-7", "--out", str(out)) == 0
    privacy = json.loads(out.read_text())["privacy"]
    assert (privacy["mechanism"], privacy["delta"]) == ("gaussian", 1e-7)
    assert privacy["sensitivity"]["metric"] == "L2"
    assert privacy["privacy_map_at_sensitivity"]["epsilon"] <= 1.0
    assert min(counts(out).values()) >= 0


def test_over_budget_is_refused_and_writes_nothing(
    tmp_path: Path, shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, epsilon_per_day=1.0)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert export(tmp_path, "--epsilon", "0.7", "--out", str(first), cfg=cfg) == 0
    capsys.readouterr()
    assert export(tmp_path, "--epsilon", "0.5", "--out", str(second), cfg=cfg) == 2
    err = capsys.readouterr().err
    assert "privacy budget exceeded" in err and "the window has ε=0.3, δ=1e-06 left" in err
    assert not second.exists()
    assert len((shop / "privacy" / "ledger.jsonl").read_text().splitlines()) == 1
    # A window that shares no day with the first is not charged for it.
    flags = ("--epsilon", "0.5", "--last-day", "2026-03-03", "--out", str(second))
    assert export(tmp_path, *flags, cfg=cfg) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--epsilon", "0"), "epsilon must be a positive finite number, got 0.0"),
        (("--epsilon", "-2"), "epsilon must be a positive finite number, got -2.0"),
        (("--epsilon", "1", "--delta", "1.5"), r"delta must lie in [0, 1), got 1.5"),
        (("--epsilon", "1", "--max-items", "0"), "must be an integer of at least 1, got 0"),
        (("--epsilon", "1", "--days", "0"), "days must be an integer of at least 1, got 0"),
        (("--epsilon", "1", "--last-day", "10/03/2026"), "--last-day takes a date YYYY-MM-DD"),
        (("--epsilon", "1", "--last-day", "2020-01-01"), "no interactions (click, add_to_cart"),
    ],
)
def test_bad_input_is_refused_by_name_and_spends_nothing(
    tmp_path: Path, shop: Path, capsys: pytest.CaptureFixture[str], flags: tuple, message: str
) -> None:
    out = tmp_path / "p.json"
    assert export(tmp_path, *flags, "--out", str(out)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (shop / "privacy" / "ledger.jsonl").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--epsilon", "1", "--out", "x", "--bogus", "3"), "unrecognized arguments: --bogus 3"),
        (("--out", "x"), "the following arguments are required: --epsilon"),
        (("--epsilon", "one", "--out", "x"), "argument --epsilon: invalid float value: 'one'"),
    ],
)
def test_bad_flags_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple, message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        export(tmp_path, *flags)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_an_empty_log_or_catalogue_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    out = tmp_path / "p.json"
    assert export(tmp_path, "--epsilon", "1", "--out", str(out)) == 2
    assert "has no events to release" in capsys.readouterr().err
    write_log(data_dir, [("u", "s", None, "page_view", 0), ("u", "s", "i1", "item_view", 0)])
    assert export(tmp_path, "--epsilon", "1", "--out", str(out)) == 2
    assert "no catalogue at" in capsys.readouterr().err
    write_catalogue(data_dir, ["i1"])
    assert export(tmp_path, "--epsilon", "1", "--out", str(out)) == 2
    assert "has no interactions (click, add_to_cart, purchase)" in capsys.readouterr().err
    assert not out.exists() and not (data_dir / "privacy").exists()


def test_the_job_refuses_a_missing_log_before_charging(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", Budget(1.0, 0.0))
    with pytest.raises(NotFoundError, match="has no events to release"):
        release_popularity(
            tmp_path / "events", tmp_path / "items.parquet", ledger, tmp_path / "out.json",
            epsilon=1.0, delta=0.0, max_items=3,
        )  # fmt: skip
    assert ledger.records() == []
