"""The catalogue the worker reads item categories from."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pyarrow.parquet as pq

log = logging.getLogger(__name__)


class Catalog:
    """Item id -> category from `<data_dir>/catalog/items.parquet`, reloaded when it changes."""

    def __init__(self, path: Path, poll_s: float, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.poll_s = poll_s
        self._clock = clock
        self._categories: dict[str, str] = {}
        self._signature: tuple[int, int] | None = None
        self._checked = float("-inf")

    @property
    def categories(self) -> Mapping[str, str]:
        if self._clock() - self._checked >= self.poll_s:
            self.refresh()
        return self._categories

    def refresh(self) -> bool:
        """Reload if the file changed (size or mtime); True when it did."""
        self._checked = self._clock()
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if self._signature is not None or not self._categories:
                log.warning("catalogue %s is absent: item categories are unknown", self.path)
            self._signature = None
            return False
        signature = (stat.st_mtime_ns, stat.st_size)
        if signature == self._signature:
            return False
        table = pq.read_table(self.path, columns=["item_id", "category"])
        self._categories = {
            str(i): str(c)
            for i, c in zip(
                table.column("item_id").to_pylist(),
                table.column("category").to_pylist(),
                strict=True,
            )
            if i is not None and c is not None
        }
        self._signature = signature
        log.info("catalogue %s: %d items with a category", self.path, len(self._categories))
        return True
