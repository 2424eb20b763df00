"""Recovery of finished shards (``retry_failed``): the rows that failed transiently (a timeout, a
5xx, a reset, a resolver's hiccup; never a 404, a blocked URL or a bomb) are fetched again, and
nothing else is.

A shard where a row now succeeds, or now fails for good, is rewritten whole and atomically, as a
new shard is (staged, then moved into place tar, parquet, ``_stats.json`` last):

* its tar keeps every existing member, byte for byte and in order, and gains the new images'
  members as img2dataset writes them (image, caption, json);
* its parquet keeps every row in its place; the retried rows get their new outcome;
* its ``_stats.json`` is counted again and carries the shard's ``revision``, one higher.

A shard where nothing changed is left as it is. The partition's ``_revisions.json`` lists the
revised shards, so the sensor sees, in one read, which labels lack images; the label program
reads the revisions from the ``_stats.json`` files themselves and labels only the new images.

A retry killed between its moves leaves a tar with the new members and the old parquet; the
next retry drops those members and fetches their rows again, so no key is in a tar twice.
Imports no ``dagster``.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
import uuid
from collections import Counter
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from coyo_platform.common import layout, shards
from coyo_platform.common.storage import Storage
from coyo_platform.download.shard import SHARD_COLUMNS, ShardDownloader, _stats_file
from coyo_platform.download.statuses import SUCCESS
from coyo_platform.download.statuses import failure_reason as reason_of

_ADDED = {name for name, _ in SHARD_COLUMNS}


def candidates(store: Storage, folder: str) -> list[tuple[int, str]]:
    """The finished shards with rows that failed transiently, as ``(shard id, name)``: one scan
    of the ``transient`` column of every finished shard's parquet."""
    names = shards.finished(store, folder)
    files = [layout.shard_file(folder, n, ".parquet") for n in names]
    if not files:
        return []
    found = (
        store.scan_parquet(files, include_file_paths="file")
        .filter(pl.col("transient"))
        .select("file")
        .unique()
        .collect()
    )
    named = sorted({layout.shard_name(f) for f in found["file"]})
    return [(int(n), n) for n in named]


def _key_of(member: str) -> str:
    return os.path.basename(member).partition(".")[0]


class ShardRecoverer(ShardDownloader):
    """Recovers one finished shard, ``(shard id, name)``; pickled into each pool process as
    :class:`ShardDownloader` is. Its counts: ``retried``, ``recovered`` (now a success),
    ``final`` (now a failure for good), ``dns`` (failed again to resolve) and ``revision`` (the
    shard's, after)."""

    def download_shard(self, shard_id: int, name: str) -> dict[str, int]:
        store = Storage(self.output)
        start = time.time()
        with store.fs.open(layout.shard_file(store.root, name, ".parquet"), "rb") as fh:
            table = pq.read_table(fh)
        retry = [i for i, t in enumerate(table.column("transient").to_pylist()) if t]
        if not retry:
            return {"retried": 0, "recovered": 0, "final": 0, "dns": 0, "revision": 0}
        columns = [n for n in table.schema.names if n not in _ADDED]
        rows = table.select(columns).take(retry).to_pylist()
        keys = table.column("key").take(retry).to_pylist()
        staging = os.path.join(layout.staging(self.output), f"retry-{name}-{uuid.uuid4().hex}")
        fresh = os.path.join(staging, "fresh")
        os.makedirs(fresh)
        try:
            counts, reasons, transient = self._write(shard_id, rows, table.schema, fresh, keys)
            outcome = {
                "retried": len(rows),
                "recovered": counts.get(SUCCESS, 0),
                "final": len(rows) - sum(transient.values()) - counts.get(SUCCESS, 0),
                "dns": sum(n for r, n in transient.items() if r == "download: dns"),
            }
            if not outcome["recovered"] and not outcome["final"]:
                return {**outcome, "revision": 0}  # nothing to keep: the shard stays as it is
            outcome["revision"] = self._rewrite(store, name, table, keys, fresh, staging, start)
            return outcome
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _rewrite(
        self,
        store: Storage,
        name: str,
        table: pa.Table,
        keys: list[str],
        fresh: str,
        staging: str,
        start: float,
    ) -> int:
        """The shard rewritten in ``staging`` from its files and the retried rows' in
        ``fresh``, then moved into place; returns its new revision."""
        retried = set(keys)
        with tarfile.open(os.path.join(staging, f"{name}.tar"), "w") as out:
            with store.fs.open(layout.shard_file(store.root, name, ".tar"), "rb") as raw:
                _copy_members(raw, out, skip=retried)  # a killed retry's members: fetched anew
            with open(os.path.join(fresh, f"{name}.tar"), "rb") as raw:
                _copy_members(raw, out, skip=set())
        merged = _merge_rows(table, pq.read_table(os.path.join(fresh, f"{name}.parquet")), keys)
        pq.write_table(merged, os.path.join(staging, f"{name}.parquet"))
        statuses = merged.select(["status", "error_message"]).to_pylist()
        counts = Counter(r["status"] for r in statuses)
        reasons = Counter(
            SUCCESS if r["status"] == SUCCESS else reason_of(r["status"], r["error_message"])
            for r in statuses
        )
        before = store.read_json(layout.shard_file(store.root, name, layout.STATS_DONE))
        stats = _stats_file(merged.num_rows, counts, reasons, start)
        stats["revision"] = int(before.get("revision", 0)) + 1
        stats["first_start_time"] = before.get("first_start_time", before.get("start_time"))
        with open(os.path.join(staging, name + layout.STATS_DONE), "w") as fh:
            json.dump(stats, fh, indent=1)
        self._commit(name, staging)
        return stats["revision"]


def _copy_members(raw: Any, out: tarfile.TarFile, skip: set[str]) -> None:
    """Every file member of the tar stream ``raw`` into ``out``, as it is (header fields and
    bytes), but those whose sample key is in ``skip``."""
    with tarfile.open(fileobj=raw, mode="r|*") as tar:
        for info in tar:
            if info.isfile() and _key_of(info.name) not in skip:
                out.addfile(info, tar.extractfile(info))


def _merge_rows(old: pa.Table, new: pa.Table, keys: list[str]) -> pa.Table:
    """``old``'s rows in their order, those of ``keys`` replaced by ``new``'s (same schema)."""
    before = pl.from_arrow(old).with_row_index("_row")
    placed = pl.from_arrow(new).join(before.select("key", "_row"), on="key")
    kept = before.filter(~pl.col("key").is_in(keys))
    merged = pl.concat([kept, placed.select(kept.columns)]).sort("_row").drop("_row")
    return merged.to_arrow().cast(old.schema)


def record_revisions(store: Storage, folder: str, revised: dict[str, int]) -> None:
    """The partition's ``_revisions.json``: the shards above revision 0."""
    store.write_json(layout.revisions(folder), dict(sorted(revised.items())))
