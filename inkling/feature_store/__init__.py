"""Feature-store access: Feast's registry and online records, read the way serving needs.

- `feast_store`: open the Feast repository of the settings; run the `feast` CLI.
- `feast_codec`: Feast's Redis layout (entity keys, hash fields, values), encoded and
  decoded without Feast.
- `columns`: a `FeatureService` resolved to the views, fields and types it reads.
- `values`: serialized online values decoded as Feast's `to_dict()` gives them.
- `rows`: user and session rows per request (`RowReader`).
- `snapshot`: every item row as numpy columns (`ItemSnapshot`); `snapshot_refresh`
  keeps one current (`SnapshotRefresher`).
- `hydrator`: one request's user, session and item features (`Hydrator`).
"""
