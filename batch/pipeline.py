"""Stages of the batch half shared by the CLI and the demo."""

from __future__ import annotations

from batch.generate import GeneratorConfig, generate
from batch.importers import write_table_atomic
from inkling.config import Settings
from inkling.eventlog import EventLog


def write_synthetic(config: GeneratorConfig, settings: Settings) -> dict[str, int]:
    """Generate a clickstream and append it to the event log; write its catalogue."""
    data = generate(config)
    result = EventLog(settings.events_dir).append(data.events)
    write_table_atomic(data.items, settings.catalog_dir / "items.parquet")
    write_table_atomic(data.users, settings.catalog_dir / "users.parquet")
    return {
        "events_generated": data.events.num_rows,
        "events_appended": result.appended,
        "duplicates_refused": len(result.duplicates),
        "items": data.items.num_rows,
        "users": data.users.num_rows,
    }
