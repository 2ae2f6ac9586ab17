"""Events and the bus: the event schema, the Redis Streams bus that carries live events
from ingest to the stream workers, and the Parquet event log that is the source of truth.

- `schema`: the event schema (version 1), its Arrow types and validation.
- `bus`: partitioned Redis Streams with dedupe by `event_id` and backpressure.
- `eventlog`: the append-only Parquet event log, by date.
"""
