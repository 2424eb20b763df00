"""Webdataset shards of the kept images: for one partition, the images of the rows its subset part
keeps, as downloaded (the same bytes), with their labels, in ``NNNNN.tar`` shards of about
``shard_bytes`` each, so that a team that ran the platform trains on its subset without a second
crawl. Each sample is ``<id>.<image extension>`` (the image), ``<id>.cls`` (the top-1 class, in
the card's label space, as text) and ``<id>.json`` (``id``, ``url``, ``imagehash``, ``labels``,
``label_probs``, ``width``, ``height``: the subset's row; probabilities are the float32 values
written as the doubles they are, so they read back to the same float32).

Which rows: exactly the subset part's (the product is the parquet; the shards follow it). Each
row's image is found through the label row it was chosen from, the first labeled row of its id
that clears the part's threshold, in shard order (as ``subset.build_subset`` chose it), whose
``key`` names the sample in its downloaded tar. Order: input shard by input shard, in tar order;
the same input gives the same shards, byte for byte (``common.tars.TarWriter``).

Memory: where each kept row came from (input shard, id and sample key: three small columns a
row) and one input shard's rows as Python values; the rows' labels are read from the subset file
in order, a few thousand at a time, and images are read, written and dropped one at a time, from
a stream of each input tar. Each shard is written whole
(``Storage.write_file``); after each, the partition's progress record (``layout.wds_progress``)
holds the shards written and the input position, under the partition's *identity*: this format's
version, the shard size, the downloads' revisions, and the sha256 of what the shards hold but
the images (:func:`content_digest`: every kept row with its sample key, in order). A rerun whose
subset part is the same file (its sha256) as the complete record's does nothing; otherwise the
content digest decides: the same keeps the shards (another plan that keeps the same rows of this
partition, a subset part rewritten alike) or resumes after the last shard recorded; another
starts the partition over. Imports no ``dagster``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from coyo_platform.common import layout, shards
from coyo_platform.common.formats import CARD_SCHEMA, labeled_ok, top1
from coyo_platform.common.settings import setting
from coyo_platform.common.storage import Storage
from coyo_platform.common.tars import TarWriter, image_member, iter_tar_samples
from coyo_platform.sample.rules import above
from coyo_platform.sample.subset import LABELER_KEY, PLAN_DIGEST_KEY

#: Bumped when what a shard holds changes: a partition written by an older version is rewritten.
FORMAT_VERSION = 1
#: The json sidecar's fields, the subset's columns but for none.
JSON_FIELDS = ("id", "url", "imagehash", "labels", "label_probs", "width", "height")


@dataclass(frozen=True)
class WdsSettings:
    """How the webdataset shards of the kept images are cut."""

    shard_bytes: int = setting(
        1_000_000_000,
        "bytes a webdataset shard reaches before the next one starts (the last of a partition "
        "is smaller); default 1 GB, timm's and webdataset's usual size",
    )

    def __post_init__(self) -> None:
        if self.shard_bytes < 1:
            raise ValueError(f"shard_bytes must be at least 1, got {self.shard_bytes}")


class WdsRefused(ValueError):
    """The partition's shards cannot be written from what is there now (a stale or missing
    subset part, labels or downloads that no longer give its rows)."""


@dataclass
class WdsPart:
    key: str
    folder: str
    shards: list[dict[str, Any]]  # {"name", "samples", "bytes"}, in order
    written: int  # shards written by this run (0: the partition was complete already)
    kept: int  # shards an earlier run wrote, kept as they were
    identity: dict[str, Any]

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards)


def _sha256(store: Storage, url: str) -> str:
    h = hashlib.sha256()
    with store.fs.open(url, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def subset_part(store: Storage, key: str) -> dict[str, Any]:
    """Partition ``key``'s subset part as it is now: plan, labeler, threshold, rows, bytes and
    sha256.

    Raises:
        WdsRefused: no subset part, or one written under another plan or labeler than now.
    """
    from coyo_platform.sample.plan import current_plan

    url = layout.subset(store, key)
    if not store.exists(url):
        raise WdsRefused(f"{key}: no subset part at {url}: materialize coyo_labeled_300m for it")
    rows, pairs = store.parquet_metadata(url)
    plan = current_plan(store)
    if pairs.get(PLAN_DIGEST_KEY) != plan.digest:
        raise WdsRefused(
            f"{key}: its subset part was written under plan {pairs.get(PLAN_DIGEST_KEY) or '?'}, "
            f"not the current {plan.digest}: materialize coyo_labeled_300m for it first"
        )
    labeler = pairs.get(LABELER_KEY) or None
    if labeler != shards.current_labeler(store, key):
        raise WdsRefused(
            f"{key}: its subset part was written from the labels of {labeler}, not the "
            "partition's current ones: materialize coyo_labeled_300m for it first"
        )
    return {
        "plan_digest": plan.digest,
        "labeler": labeler,
        "threshold": pairs.get("coyo.threshold"),
        "rows": rows,
        "bytes": store.size(url),
        "sha256": _sha256(store, url),
    }


#: Rows a digest chunk holds: the digest is over chunks of exactly this many rows (the last
#: smaller), whatever the subset file's row groups.
DIGEST_ROWS = 65_536
#: The digest's columns and types, spelled out (list items named ``item``, no metadata): the
#: same bytes whatever the subset file's own footer says.
DIGEST_SCHEMA = pa.schema(
    [pa.field("shard", pa.string()), pa.field("key", pa.string())]
    + [
        pa.field(f.name, pa.list_(f.type.value_type) if pa.types.is_list(f.type) else f.type)
        for f in CARD_SCHEMA
    ]
)


def kept_index(store: Storage, key: str, part: dict[str, Any]) -> pl.DataFrame:
    """Where each of the subset part's rows came from: ``shard`` (the input shard), ``id`` and
    ``key`` (its sample in the downloaded tar), in the subset's order, found through the label
    row it was chosen from. Three small columns a row; the rows' labels stay in the file.

    Raises:
        WdsRefused: a subset row that no label row of the partition gives, or a subset part not
            in shard order (written otherwise than ``subset.build_subset`` writes it).
    """
    subset = store.scan_parquet(layout.subset(store, key)).select("id")
    labeler = part["labeler"]
    files = shards.label_files(store, key, labeler) if labeler else []
    if not files:
        rows = subset.select(pl.len()).collect().item()
        if rows:
            raise WdsRefused(f"{key}: {rows:,} subset rows but no labels to find their images by")
        return pl.DataFrame(schema={"shard": pl.String, "id": pl.Int64, "key": pl.String})
    chosen = (
        store.scan_parquet(files, include_file_paths="file")
        .select("file", "id", "key", "error", "label_probs")
        .filter(labeled_ok())
        .with_columns(top1())
        .filter(above(float(part["threshold"])))
        .unique("id", keep="first", maintain_order=True)
        .select("file", "id", "key")
    )
    index = subset.join(chosen, on="id", how="left", maintain_order="left").collect()
    lost = index.filter(pl.col("key").is_null())
    if lost.height:
        raise WdsRefused(
            f"{key}: {lost.height:,} subset rows (e.g. id {lost['id'][0]}) have no label row "
            "that gives them: the labels changed after the part was written; materialize "
            "coyo_labeled_300m for it again"
        )
    names = {f: layout.shard_name(f) for f in files}
    rank = pl.col("file").replace_strict({f: i for i, f in enumerate(files)}, return_dtype=pl.Int64)
    if not index.select(rank.diff().fill_null(0).ge(0).all()).item():
        raise WdsRefused(
            f"{key}: its subset part's rows are not in shard order: materialize "
            "coyo_labeled_300m for it again"
        )
    shard = pl.col("file").replace_strict(names, return_dtype=pl.String).alias("shard")
    return index.select(shard, "id", "key")


def _runs(index: pl.DataFrame) -> list[tuple[str, int, int]]:
    """``(shard, first row, end row)`` of each input shard's rows in ``index``, in order."""
    runs = (
        index.with_row_index("row")
        .group_by("shard", maintain_order=True)
        .agg(pl.col("row").first().alias("first"), pl.len().alias("rows"))
    )
    return [(s, int(f), int(f) + int(n)) for s, f, n in runs.iter_rows()]


def _exact_chunks(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last smaller) from ``batches`` of any sizes."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def content_digest(store: Storage, url: str, index: pl.DataFrame) -> str:
    """sha256 of what the shards hold but the image bytes: every kept row (the subset file's at
    ``url``) with its input shard and sample key, in order, as Arrow IPC streams of exact
    ``DIGEST_ROWS``-row chunks (a format the Arrow spec fixes). Streamed: one chunk at a time.
    Two plans that keep the same rows of a partition give the same digest."""
    h = hashlib.sha256()
    side = index.select(pl.col("shard").cast(pl.String), pl.col("key").cast(pl.String))
    offset = 0
    with store.fs.open(url, "rb") as fh:
        batches = pq.ParquetFile(fh).iter_batches(batch_size=DIGEST_ROWS, columns=list(JSON_FIELDS))
        for chunk in _exact_chunks(batches, DIGEST_ROWS):
            where = side.slice(offset, chunk.num_rows).to_arrow()
            columns = [where.column(n) for n in ("shard", "key")]
            table = pa.Table.from_arrays(
                [*columns, *chunk.columns], names=["shard", "key", *chunk.column_names]
            )
            table = table.cast(DIGEST_SCHEMA).replace_schema_metadata(None).combine_chunks()
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            h.update(sink.getvalue())
            offset += chunk.num_rows
    return h.hexdigest()


class _Rows:
    """The subset file's rows as Python values, read in order from row ``start`` on, a few
    thousand at a time (only the row groups from ``start`` on are read)."""

    def __init__(self, fh: Any, start: int) -> None:
        parquet = pq.ParquetFile(fh)
        groups, before = [], 0
        for g in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(g).num_rows
            if not groups and before + rows <= start:
                before += rows
                continue
            groups.append(g)
        self._batches = parquet.iter_batches(
            batch_size=4096, row_groups=groups, columns=list(JSON_FIELDS)
        )
        self._skip = start - before
        self._buffer: list[dict[str, Any]] = []
        self._at = 0

    def take(self, n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < n:
            if self._at == len(self._buffer):
                batch = next(self._batches, None)
                if batch is None:
                    raise WdsRefused("the subset part has fewer rows than its index")
                drop = min(self._skip, batch.num_rows)
                self._buffer, self._at, self._skip = (
                    batch.slice(drop).to_pylist(),
                    0,
                    self._skip - drop,
                )
                continue
            got = self._buffer[self._at : self._at + n - len(out)]
            self._at += len(got)
            out += got
        return out


def _samples(
    store: Storage, key: str, index: pl.DataFrame, start: tuple[str, int] | None
) -> Iterator[tuple[tuple[str, int], int, list[tuple[str, bytes]]]]:
    """((input shard, its kept samples so far), id, members) of every kept image, in order
    (input shard by input shard, in tar order), after position ``start``. One input shard's rows
    are Python values at a time.

    Raises:
        WdsRefused: a kept sample that its downloaded tar does not hold, or holds no image of.
    """
    folder = layout.shards(store, key)
    runs = _runs(index)
    first = [s for s, _, _ in runs].index(start[0]) if start is not None else 0
    keys = index["key"]
    with store.fs.open(layout.subset(store, key), "rb") as fh:
        rows_of = _Rows(fh, runs[first][1] if runs else 0)
        for shard, begin, end in runs[first:]:
            taken = rows_of.take(end - begin)
            if [r["id"] for r in taken] != index["id"].slice(begin, end - begin).to_list():
                raise WdsRefused(f"{key}: its subset part changed while it was read; run again")
            rows = {  # as the members they become: one shard's rows, a few KB each
                sample: (
                    r["id"],
                    str(r["labels"][0]).encode(),
                    json.dumps(r, separators=(",", ":")),
                )
                for sample, r in zip(keys.slice(begin, end - begin).to_list(), taken, strict=True)
            }
            del taken
            skip = start[1] if start is not None and shard == start[0] else 0
            done = 0
            for sample, members in iter_tar_samples(layout.shard_file(folder, shard, ".tar")):
                row = rows.get(sample)
                if row is None:
                    continue
                done += 1
                if done <= skip:
                    continue
                image = image_member(members)
                if image is None:
                    raise WdsRefused(f"{key}: sample {sample} of shard {shard} has no image now")
                row_id, cls, meta = row
                yield (shard, done), row_id, [("cls", cls), image, ("json", meta.encode())]
            if done != len(rows):
                raise WdsRefused(
                    f"{key}: shard {shard}'s tar holds {done:,} of its {len(rows):,} kept "
                    "samples: the downloads changed after the labels were written; label them "
                    "again"
                )


class _Hashing:
    """A file written through, its sha256 kept as it goes (a shard's, for the export to tell
    a rewritten shard from the one it copied, whatever their sizes)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.sha256 = fh, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.fh.tell()


def write_wds(
    store: Storage, key: str, settings: WdsSettings, log: Callable[[str], Any] = print
) -> WdsPart:
    """Write (or finish, or leave as it is) partition ``key``'s webdataset shards.

    Raises:
        WdsRefused: see :func:`subset_part`, :func:`kept_index` and :func:`_samples`.
    """
    part = subset_part(store, key)
    folder = layout.wds(store, key)
    progress_url = layout.wds_progress(store, key)
    progress = store.read_json_if_exists(progress_url)
    fixed = {  # what decides the shards besides the rows
        "format": FORMAT_VERSION,
        "shard_bytes": settings.shard_bytes,
        "download_revisions": shards.revisions(store, layout.shards(store, key)),
    }
    same = progress is not None and all(progress["identity"].get(k) == v for k, v in fixed.items())
    if same:
        progress = _as_stored(store, key, folder, progress, log)
    if same and progress["complete"] and progress["subset"]["sha256"] == part["sha256"]:
        return _done(store, key, folder, progress, 0)  # the same subset file: nothing to do
    index = kept_index(store, key, part)
    identity = {**fixed, "content_sha256": content_digest(store, layout.subset(store, key), index)}
    if progress is not None and progress["identity"] == identity:
        progress["subset"] = part  # e.g. another plan that keeps the same rows
        if progress["complete"]:
            store.write_json(progress_url, progress)
            log(f"{key}: the subset part keeps the same rows; its shards stay as they are")
            return _done(store, key, folder, progress, 0)
        log(f"{key}: resuming after shard {len(progress['shards'])}")
    else:
        if progress is not None or store.exists(folder):
            log(f"{key}: its shards were written from other rows or settings; writing them anew")
        store.remove(progress_url)
        store.remove(folder)
        progress = {
            "identity": identity,
            "subset": part,
            "shards": [],
            "position": None,
            "complete": False,
        }
    before = len(progress["shards"])
    position = progress["position"]
    stream = _samples(store, key, index, None if position is None else tuple(position))
    pending = next(stream, None)
    while pending is not None:
        number = len(progress["shards"])
        shard: dict[str, Any] = {"name": f"{number:05d}.tar", "samples": 0, "bytes": 0}

        def fill(path: str, shard: dict[str, Any] = shard) -> None:
            nonlocal pending, position
            with open(path, "wb") as raw:
                fh = _Hashing(raw)
                tar = TarWriter(fh)
                while pending is not None and tar.bytes < settings.shard_bytes:
                    position, sample_id, members = pending
                    tar.add(str(sample_id), members)
                    shard["samples"] += 1
                    pending = next(stream, None)
                tar.close()
                shard["bytes"], shard["sha256"] = fh.tell(), fh.sha256.hexdigest()

        store.write_file(layout.wds_shard(folder, number), fill)
        shard["end"] = list(position)
        progress["shards"].append(shard)
        progress["position"] = list(position)
        progress["complete"] = pending is None
        store.write_json(progress_url, progress)
        log(f"{key}: shard {shard['name']}: {shard['samples']:,} samples, {shard['bytes']:,} bytes")
    if not progress["complete"]:  # no kept image at all
        progress["complete"] = True
        store.write_json(progress_url, progress)
    return _done(store, key, folder, progress, len(progress["shards"]) - before)


def stored_sizes(store: Storage, folder: str) -> dict[str, int]:
    """``{name: bytes}`` of the shards in ``folder`` (one listing)."""
    try:
        found = store.fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {
        path.rstrip("/").rsplit("/", 1)[-1]: int(info["size"])
        for path, info in found.items()
        if path.endswith(".tar")
    }


def _as_stored(
    store: Storage, key: str, folder: str, progress: dict, log: Callable[[str], Any]
) -> dict:
    """``progress`` cut to the shards that are in storage as recorded (a shard deleted or
    changed since: it and the ones after it are written again, from the input position the
    last good one ended at)."""
    recorded = progress["shards"]
    good = _first_lost(store, folder, recorded)
    if good is None:
        return progress
    log(
        f"{key}: shard {recorded[good]['name']} is missing or changed in {folder}; writing it "
        "and the ones after it again"
    )
    position = recorded[good - 1]["end"] if good else None
    return {**progress, "shards": recorded[:good], "position": position, "complete": False}


def _done(store: Storage, key: str, folder: str, progress: dict, written: int) -> WdsPart:
    count = len(progress["shards"])
    _remove_beyond(store, folder, count)
    return WdsPart(key, folder, progress["shards"], written, count - written, progress["identity"])


def _remove_beyond(store: Storage, folder: str, count: int) -> None:
    """Shards numbered ``count`` or more: a run killed after writing a shard and before recording
    it left one (the rerun writes it again, the same bytes), or the partition has fewer now."""
    for url in store.glob(layout.shard_file(folder, "*", ".tar")):
        name = layout.shard_name(url)
        if name.isdigit() and int(name) >= count:
            store.remove(url)


def _first_lost(store: Storage, folder: str, recorded: list[dict]) -> int | None:
    """The first of the ``recorded`` shards not in ``folder`` at its recorded size (one
    listing), by its place; None: all are there."""
    sizes = stored_sizes(store, folder)
    return next((i for i, s in enumerate(recorded) if sizes.get(s["name"]) != s["bytes"]), None)


def write_wds_manifest(store: Storage) -> dict[str, Any]:
    """The shards of every partition that has a subset part, in one manifest
    (``layout.wds_manifest``: shards with their samples and bytes, totals, and what is missing or
    stale), and timm's ``_info.json`` (the ``train`` split: the current partitions' shards and
    their lengths). A partition is current when its shards are complete and were written from
    the subset part as it is now (its plan, rows and bytes) with one sample a row, and every
    shard is in storage at its recorded size. Cheap: the parts' footers, the progress records
    and one listing a partition, no data read."""
    problems: list[str] = []
    partitions: list[dict[str, Any]] = []
    subset = layout.subset_files(store)
    for key, url in subset.items():
        progress = store.read_json_if_exists(layout.wds_progress(store, key))
        if progress is None:
            problems.append(f"{key}: no webdataset shards")
            continue
        rows, pairs = store.parquet_metadata(url)
        written = progress["subset"]
        samples = sum(s["samples"] for s in progress["shards"])
        if not progress["complete"]:
            problems.append(f"{key}: {len(progress['shards'])} shards so far, not complete")
        elif (written["plan_digest"], written["rows"], written["bytes"]) != (
            pairs.get(PLAN_DIGEST_KEY),
            rows,
            store.size(url),
        ):
            problems.append(f"{key}: its shards were written from an earlier subset part")
        elif samples != rows:
            problems.append(f"{key}: {samples:,} samples for {rows:,} subset rows")
        elif (lost := _first_lost(store, layout.wds(store, key), progress["shards"])) is not None:
            name = progress["shards"][lost]["name"]
            problems.append(f"{key}: shard {name} is missing or changed in storage")
        else:
            partitions.append({"partition": key, "samples": samples, "shards": progress["shards"]})
    for folder in store.glob(store.url(layout.WDS, "*")):
        key = folder.rstrip("/").rsplit("/", 1)[-1]
        if key not in subset and not key.startswith(("_", ".")):
            problems.append(f"{key}: shards of a partition with no subset part (clear it)")
    filenames = [f"{p['partition']}/{s['name']}" for p in partitions for s in p["shards"]]
    lengths = [s["samples"] for p in partitions for s in p["shards"]]
    info = {
        "name": layout.SUBSET,
        "splits": {
            "train": {
                "name": "train",
                "num_samples": sum(lengths),
                "filenames": filenames,
                "shard_lengths": lengths,
            }
        },
    }
    store.write_json(layout.wds_info(store), info)
    manifest = {
        "partitions": partitions,
        "samples": sum(lengths),
        "shards": len(filenames),
        "bytes": sum(s["bytes"] for p in partitions for s in p["shards"]),
        "problems": problems,
        "complete": not problems,
    }
    store.write_json(layout.wds_manifest(store), manifest)
    return manifest
