"""Recovery of finished shards (``retry_failed``): the rows that failed transiently (a timeout, a
5xx, a reset, a resolver's hiccup; never a 404, a blocked URL or a bomb) are fetched again, and
nothing else is.

A shard where a row now succeeds, or now fails for good, is rewritten whole, staged and then
moved into place as a new shard is (tar, parquet, ``_stats.json`` last):

* its tar keeps every existing member, byte for byte and in order, and gains the new images'
  members as img2dataset writes them (image, caption, json);
* its parquet keeps every row in its place; the retried rows get their new outcome; its
  key-value metadata carries the shard's new ``coyo.revision``;
* its ``_stats.json`` is counted again and carries the same ``revision``.

Three moves are not one: before them, ``NNNNN_rewrite.json`` records the revision being written,
and is removed after the last. A rewrite cut short (a kill, an upload that failed for good)
leaves it behind, and the next download run finishes the job: if the parquet is in place, the
``_stats.json`` is counted again from it; if not, the shard still has its transient rows, and
the next recovery rewrites it even if nothing comes back, dropping the tar members the parquet
does not know (no key is ever in a tar twice). Readers take the larger of the two revisions,
each read before the tar: never more than what the tar holds.

A shard where nothing changed is left as it is. The partition's ``_revisions.json`` lists the
revised shards, so the sensor sees, in one read, which labels lack images; the label program
reads the revisions from the shards' own files and labels only the new images.
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
from coyo_platform.download.shard import SHARD_COLUMNS, Done, ShardDownloader, _stats_file
from coyo_platform.download.statuses import SUCCESS
from coyo_platform.download.statuses import failure_reason as reason_of

_ADDED = {name for name, _ in SHARD_COLUMNS}


def finish_interrupted(store: Storage, folder: str) -> dict[str, int]:
    """Finish the rewrites cut short whose parquet is in place: their ``_stats.json`` counted
    again from it, with its revision; returns those shards' revisions. The others keep their
    marker for the next recovery."""
    done = {}
    for name, revision in shards.pending_rewrites(store, folder).items():
        url = layout.shard_file(folder, name, ".parquet")
        if shards.parquet_revision(store, url) != revision:
            continue
        with store.fs.open(url, "rb") as fh:
            table = pq.read_table(fh)
        before = store.read_json(layout.shard_file(folder, name, layout.STATS_DONE))
        stats = _recount(table, before, revision, time.time())
        store.write_json(layout.shard_file(folder, name, layout.STATS_DONE), stats)
        store.remove(layout.rewrite_marker(folder, name))
        done[name] = revision
    return done


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

    def download_batch(self, batch: list[tuple[int, str]]) -> list[Done]:
        """The batch's shards one after the other (each rewrite reads and copies its tar)."""
        results = []
        for row in batch:
            try:
                results.append((True, row, self.download_shard(*row), ""))
            except Exception as exc:  # noqa: BLE001 - reported, retried or left undone
                results.append(self._not_done(row, exc))
        return results

    def download_shard(self, shard_id: int, name: str) -> dict[str, int]:
        store = Storage(self.output)
        start = time.time()
        with store.fs.open(layout.shard_file(store.root, name, ".parquet"), "rb") as fh:
            table = pq.read_table(fh)
        retry = [i for i, t in enumerate(table.column("transient").to_pylist()) if t]
        marker = store.read_json_if_exists(layout.rewrite_marker(store.root, name))
        cut_short = marker["revision"] if marker else None  # the tar may hold members to drop
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
            if not outcome["recovered"] and not outcome["final"] and cut_short is None:
                return {**outcome, "revision": 0}  # nothing to keep: the shard stays as it is
            outcome["revision"] = self._rewrite(
                store, name, table, keys, fresh, staging, start, cut_short or 0
            )
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
        cut_short: int,
    ) -> int:
        """The shard rewritten in ``staging`` from its files and the retried rows' in
        ``fresh``, then moved into place under a rewrite marker; returns its new revision."""
        retried = set(keys)
        with tarfile.open(os.path.join(staging, f"{name}.tar"), "w") as out:
            with store.fs.open(layout.shard_file(store.root, name, ".tar"), "rb") as raw:
                _copy_members(raw, out, skip=retried)  # a cut-short rewrite's: fetched anew
            with open(os.path.join(fresh, f"{name}.tar"), "rb") as raw:
                _copy_members(raw, out, skip=set())
        merged = _merge_rows(table, pq.read_table(os.path.join(fresh, f"{name}.parquet")), keys)
        if merged.num_rows != table.num_rows or len(merged["key"].unique()) != table.num_rows:
            raise RuntimeError(f"shard {name}: the rewritten parquet lost or doubled a row")
        before = store.read_json(layout.shard_file(store.root, name, layout.STATS_DONE))
        was = (table.schema.metadata or {}).get(shards.REVISION_KEY.encode(), b"0")
        revision = max(int(before.get("revision", 0)), int(was), cut_short) + 1
        metadata = {
            **(table.schema.metadata or {}),
            shards.REVISION_KEY.encode(): str(revision).encode(),
        }
        pq.write_table(
            merged.replace_schema_metadata(metadata), os.path.join(staging, f"{name}.parquet")
        )
        stats = _recount(merged, before, revision, start)
        with open(os.path.join(staging, name + layout.STATS_DONE), "w") as fh:
            json.dump(stats, fh, indent=1)
        marker = layout.rewrite_marker(store.root, name)
        store.write_json(marker, {"revision": revision})
        self._commit(name, staging)
        store.remove(marker)
        return revision


def _recount(table: pa.Table, before: dict[str, Any], revision: int, start: float) -> dict:
    """A rewritten shard's ``_stats.json``: counted from its parquet, with its revision."""
    statuses = table.select(["status", "error_message"]).to_pylist()
    counts = Counter(r["status"] for r in statuses)
    reasons = Counter(
        SUCCESS if r["status"] == SUCCESS else reason_of(r["status"], r["error_message"])
        for r in statuses
    )
    stats = _stats_file(table.num_rows, counts, reasons, start)
    stats["revision"] = revision
    stats["first_start_time"] = before.get("first_start_time", before.get("start_time"))
    return stats


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
