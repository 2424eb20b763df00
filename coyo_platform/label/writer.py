"""Finished shards' parquet, built and written on one background thread (a one-thread
``ThreadPoolExecutor``), so the model never waits for parquet encoding or an S3 upload. Each file
is written whole (temp name and rename on disk, one object on S3). Imports no ``dagster``."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from coyo_platform.common import layout
from coyo_platform.common.formats import LABELED_FILE_OPTIONS, LABELED_SCHEMA
from coyo_platform.common.storage import Storage


def shard_table(rows: list[dict[str, Any]]) -> pa.Table:
    """A shard's records, sorted by sample key, in ``LABELED_SCHEMA``."""
    rows = sorted(rows, key=lambda r: r["key"])
    return pa.Table.from_pylist(
        [{name: r.get(name) for name in LABELED_SCHEMA.names} for r in rows], schema=LABELED_SCHEMA
    )


class ShardWriter:
    """``submit`` hands a finished shard to the writer thread; at most ``depth`` shards wait
    (their rows are held in memory), and beyond that ``submit`` waits for the oldest write.
    ``written`` returns the shards written since it was last asked; ``close`` waits for every
    write. A shard in ``merge`` already has labels: its new rows are added to those of the
    samples still in its tar (``keep``), and the file is rewritten whole. A failed write does
    not stop the others; the first failure is raised by the ``submit`` that waits for it (or any
    later one; nothing more is queued) and by ``close``."""

    def __init__(self, out: Storage, depth: int = 16, merge: set[str] | None = None) -> None:
        self._out, self._depth, self._merge = out, depth, merge or set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: deque[tuple[str, int, Future]] = deque()
        self._done: list[tuple[str, int]] = []
        self._error: BaseException | None = None

    def _write(self, shard: str, rows: list[dict[str, Any]], keep: list[str] | None) -> None:
        url = layout.shard_file(self._out.root, shard, ".parquet")
        table = shard_table(rows)
        if shard in self._merge:  # the shard's labels so far, with its new images' rows
            with self._out.fs.open(url, "rb") as fh:
                before = pq.read_table(fh, schema=LABELED_SCHEMA)
            new = set(table.column("key").to_pylist())
            still = set(keep) if keep is not None else None  # the samples in the tar now
            kept = [
                k not in new and (still is None or k in still)
                for k in before.column("key").to_pylist()
            ]
            table = pa.concat_tables([before.filter(pa.array(kept)), table]).sort_by("key")
        self._out.write_parquet(url, table, **LABELED_FILE_OPTIONS)

    def _reap(self, wait_for: int = 0) -> None:
        """Move finished writes (and, waiting for them, the ``wait_for`` oldest) to the done."""
        while self._pending and (wait_for > 0 or self._pending[0][2].done()):
            shard, rows, future = self._pending.popleft()
            wait_for -= 1
            try:
                future.result()
                self._done.append((shard, rows))
            except BaseException as exc:  # raised by submit or close, in the main thread
                self._error = self._error or exc

    def submit(self, shard: str, rows: list[dict[str, Any]], keep: list[str] | None = None) -> None:
        # make room first (wait for the oldest writes beyond depth - 1), so that a failure among
        # them is raised here, before this shard is queued
        self._reap(wait_for=len(self._pending) + 1 - self._depth)
        if self._error is not None:
            raise self._error
        future = self._pool.submit(self._write, shard, rows, keep)
        self._pending.append((shard, len(rows), future))

    def written(self) -> list[tuple[str, int]]:
        """(shard, rows) of the writes finished since the last call, in submission order."""
        self._reap()
        done, self._done = self._done, []
        return done

    def close(self) -> list[tuple[str, int]]:
        """Wait for every write; returns those not yet reported by :meth:`written`."""
        self._pool.shutdown(wait=True)
        done = self.written()
        if self._error is not None:
            raise self._error
        return done
