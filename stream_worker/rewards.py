"""The stream worker's part of the contextual bandit: attributed rewards in, additions
to the bandit's statistics out, committed with the batch that saw them.

A serve record whose policy logged its pool with the bandit's context features
(`inkling.bandit.CONTEXT_FEATURES`) adds x x^T of every shown item to its surface's A
and 1 to n; a click event carrying that record's request id adds the clicked item's x
to b (once per request and item). The additions of a micro-batch are `HINCRBYFLOAT`
commands inside the batch's commit script, behind the same fences as its other
effects, so each impression and click counts exactly once however often the batch is
replayed.

A click is matched to its record through an in-memory map of recent records (request id
-> surface and shown items' contexts), bounded by `max_requests` and `window_us`.
Serve records and events of one user share a partition, so the worker that sees a
click saw its record, unless the partition changed owner or the worker restarted in
between: such a click finds nothing and is counted (`unmatched`), not credited.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from inkling.bandit import CONTEXT_FEATURES, DIM, increments, stats_key
from inkling.v1.resources_pb2 import ServeRecord

REWARD_EVENT = "click"


@dataclass
class _Served:
    surface: str
    served_us: int
    contexts: dict[str, np.ndarray]
    credited: set[str] = field(default_factory=set)


class BanditLearner:
    def __init__(self, max_requests: int = 200_000, window_us: int = 30 * 60 * 1_000_000):
        self.max_requests = max_requests
        self.window_us = window_us
        self._recent: OrderedDict[str, _Served] = OrderedDict()
        self._impressions: dict[str, list[np.ndarray]] = {}
        self._clicks: dict[str, list[np.ndarray]] = {}
        self._credits: dict[tuple[str, str], _Served] = {}
        """This batch's credited clicks, (request id, item) -> record, until it commits."""
        self.unmatched = 0

    @staticmethod
    def contexts_of(record: ServeRecord) -> dict[str, np.ndarray] | None:
        """The shown items' context rows, when the record's pool carries the bandit's."""
        pool = record.pool
        if not record.HasField("pool") or tuple(pool.feature_names) != CONTEXT_FEATURES:
            return None
        rows = np.asarray(pool.features, np.float64).reshape(len(pool.item_ids), DIM)
        index = {item: i for i, item in enumerate(pool.item_ids)}
        return {item: rows[index[item]] for item in record.item_ids if item in index}

    def observe(self, record: ServeRecord, fresh: bool) -> None:
        """Remember a record for its clicks; a fresh one also adds its impressions."""
        contexts = self.contexts_of(record)
        if not contexts:
            return
        if record.request_id not in self._recent:  # a replay keeps what was credited
            served_us = record.served_at.ToMicroseconds()
            self._recent[record.request_id] = _Served(record.surface, served_us, contexts)
        self._recent.move_to_end(record.request_id)
        while len(self._recent) > self.max_requests:
            self._recent.popitem(last=False)
        if fresh:
            self._impressions.setdefault(record.surface, []).extend(contexts.values())

    def reward(self, request_id: str, item_id: str, ts_us: int) -> bool:
        """Credit a click to its record's item (False: no record, or already credited)."""
        served = self._recent.get(request_id)
        if served is None or item_id not in served.contexts:
            self.unmatched += 1
            return False
        late = ts_us - served.served_us > self.window_us
        if late or item_id in served.credited or (request_id, item_id) in self._credits:
            return False
        self._clicks.setdefault(served.surface, []).append(served.contexts[item_id])
        self._credits[(request_id, item_id)] = served
        return True

    def take(self) -> list[tuple[str, str, float]]:
        """The batch's additions as (key, field, amount), and a clean slate for the next."""
        out: list[tuple[str, str, float]] = []
        for surface in sorted({*self._impressions, *self._clicks}):
            shown = self._impressions.get(surface, [])
            clicked = self._clicks.get(surface, [])
            added = increments(np.array(shown).reshape(-1, DIM), np.array(clicked).reshape(-1, DIM))
            out += [(stats_key(surface), name, amount) for name, amount in added.items()]
        self._impressions.clear()
        self._clicks.clear()
        return out

    def committed(self) -> None:
        """The batch committed: its credited clicks are final."""
        for (_, item), served in self._credits.items():
            served.credited.add(item)
        self._credits.clear()

    def abandoned(self) -> None:
        """The batch did not commit: it is replayed, and credits again."""
        self._impressions.clear()
        self._clicks.clear()
        self._credits.clear()
