"""One request's features: the user and session rows from Redis, the items from the
current snapshot."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from inkling.errors import ConfigurationError
from inkling.feature_store.rows import RowReader
from inkling.feature_store.snapshot import ItemRows, ItemSnapshot
from inkling.feature_store.snapshot_refresh import SnapshotSource
from inkling.feature_store.values import Row

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Hydrated:
    """Features of one request. A missing row is not an error: callers use defaults."""

    user: Row | None
    """Features of every user-keyed view; None when no such view has a row."""
    session: Row | None
    items: ItemRows
    views: Mapping[str, Row | None] = field(default_factory=dict)
    """The user and session rows per view, for services with several views per entity."""
    phases: tuple[tuple[str, int, int], ...] = ()
    """(name, start, end) in epoch ns: the online store's round trip, the snapshot lookup."""

    @property
    def missing_items(self) -> npt.NDArray[np.bool_]:
        return self.items.missing


class Hydrator:
    """User and session rows from Redis (one round trip), items from the current snapshot.

    Every view of the service must be keyed by `user_key`, `session_key` or the
    snapshot's join key; anything else is a configuration error at construction.
    """

    def __init__(
        self,
        reader: RowReader,
        snapshots: SnapshotSource,
        user_key: str = "user_id",
        session_key: str = "session_id",
        item_key: str = "item_id",
    ) -> None:
        columns = reader.columns
        other = [
            v.name for v in columns.views if v.join_key not in (user_key, session_key, item_key)
        ]
        if other:
            raise ConfigurationError(
                f"feature service {columns.service}: views {', '.join(other)} are keyed by "
                f"neither {user_key}, {session_key} nor {item_key}"
            )
        self.reader = reader
        self.snapshots = snapshots
        self._user_views = [v.name for v in columns.views_keyed_by(user_key)]
        self._session_views = [v.name for v in columns.views_keyed_by(session_key)]
        self._empty = {v.name: dict.fromkeys(v.feature_names) for v in columns.views}

    def _merge(self, names: list[str], rows: Mapping[str, Row | None]) -> Row | None:
        if len(names) == 1:
            return rows.get(names[0])
        if not any(rows.get(n) is not None for n in names):
            return None
        merged: Row = {}
        for n in names:
            merged.update(rows.get(n) or self._empty[n])
        return merged

    async def hydrate(
        self,
        user_id: str | None,
        session_id: str | None,
        item_ids: Sequence[str],
        rows: tuple[ItemSnapshot, npt.NDArray[np.int64]] | None = None,
        known: Mapping[str, Row | None] | None = None,
    ) -> Hydrated:
        """The request's rows; `None` ids (anonymous, no session) read nothing. `rows`:
        a snapshot and the rows of `item_ids` in it, when the caller looked them up
        already (they are read from that snapshot, not looked up again). `known`: views
        this request read already (`Hydrated.views` of an earlier call, same ids), which
        are not read again."""
        # Taken once: a swap mid-request changes nothing.
        snapshot = self.snapshots.snapshot if rows is None else rows[0]
        known = known or {}
        requests: dict[str, list[str]] = {}
        if user_id is not None:
            requests.update((n, [user_id]) for n in self._user_views if n not in known)
        if session_id is not None:
            requests.update((n, [session_id]) for n in self._session_views if n not in known)
        began_ns = time.time_ns()
        read = await self.reader.read_many(requests) if requests else {}
        read_ns = time.time_ns()
        views = {**known, **{n: r[0] for n, r in read.items()}}
        items = snapshot.take(
            item_ids, self.reader.enforce_ttl, self.reader.now(), None if rows is None else rows[1]
        )
        return Hydrated(
            user=self._merge(self._user_views, views),
            session=self._merge(self._session_views, views),
            items=items,
            views=views,
            phases=(("online_store", began_ns, read_ns), ("snapshot", read_ns, time.time_ns())),
        )
