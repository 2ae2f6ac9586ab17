"""Where features come from: Parquet tables the Spark jobs write (`inkling features`),
and a push source through which the stream worker writes live session state.

Paths follow INKLING_DATA_DIR (default: the project's data/ folder), the same
variable feature_store.yaml reads for the registry.
"""

import os
from pathlib import Path

from feast import FileSource, PushSource

DATA_DIR = Path(
    os.environ.get("INKLING_DATA_DIR") or Path(__file__).resolve().parent.parent / "data"
)
FEATURES_DIR = DATA_DIR / "features"


def _table(name: str) -> FileSource:
    return FileSource(
        name=f"{name}_source",
        path=str(FEATURES_DIR / name),
        timestamp_field="event_timestamp",
        description=f"Spark output {name} (see batch/features.py).",
    )


item_source = _table("item_features")
user_source = _table("user_features")
item_covisitation_source = _table("item_covisitation")
session_batch_source = _table("session_features")

# Live session state arrives here; the batch source above holds the same state
# recomputed from the event log, for training sets and backfills.
session_push = PushSource(name="session_push", batch_source=session_batch_source)

# Real-time item counters (views and clicks over the last minutes) arrive here from the
# stream worker (stream_worker/). No batch job writes the table behind it yet: it is
# there because Feast requires every push source to have one.
item_stream_source = _table("item_stream_features")
item_stream_push = PushSource(name="item_stream_push", batch_source=item_stream_source)
