"""Which shards are done, read from storage alone: the two programs, the sensors and the checks
all list them here. A person can ask the same questions without Dagster.

Labels are kept per labeler (``labeled_shards/<labeler id>/<part>/``); a partition's *current*
label set is the one its pointer names (``labeled_shards/_current/<part>.json``), written by the
label program once every finished shard has labels in that set. Everything downstream (stats,
plan, subset, coverage, the sensor) reads the current set, so labels of two labelers never mix.

A downloaded shard is *finished* when its ``NNNNN_stats.json`` exists: the download program moves
it into place after the shard's tar and parquet (``download/shard.py``), img2dataset writes it last
too, and img2dataset's incremental mode uses the same test. So shards that an img2dataset run
outside Dagster (a Spark cluster, say) is still writing are never picked up. A labeled shard is
done when its parquet exists (written whole, ``label/writer.py``).
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import polars as pl

from coyo_platform.common import layout, provenance
from coyo_platform.common.storage import Storage

_KEY = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def tars(store: Storage, folder: str) -> list[str]:
    """The tars in a downloaded-shards ``folder``, finished or not, in shard order."""
    return store.glob(layout.shard_file(folder, "*", ".tar"))


def finished(store: Storage, folder: str) -> list[str]:
    """Names (``00000``) of the shards finished in a downloaded-shards ``folder`` (any URL)."""
    done = store.glob(layout.shard_file(folder, "*", layout.STATS_DONE))
    return sorted(layout.shard_name(p) for p in done)


def revisions(store: Storage, folder: str) -> dict[str, int]:
    """A shards or labels folder's record of its revised shards, ``{"00003": 1}`` (shards not
    named are at revision 0): for a shards folder, the shards ``retry_failed`` rewrote (written
    by the download program after each); for a labels folder, the revision each shard was
    labeled at. One read: what the sensor asks every tick."""
    return store.read_json_if_exists(layout.revisions(folder)) or {}


def shard_revisions(store: Storage, folder: str, names: list[str]) -> dict[str, int]:
    """The revisions of finished shards ``names``, read from their ``_stats.json`` (where the
    download program writes it with the shard itself; one batched read), those above 0 only."""
    if not names:
        return {}
    urls = [layout.shard_file(folder, n, layout.STATS_DONE) for n in names]
    found = store.fs.cat(urls)
    revised = {}
    for url, data in found.items():
        revision = json.loads(data).get("revision", 0)
        if revision:
            revised[layout.shard_name(url)] = int(revision)
    return revised


#: A rewritten shard's revision in its parquet's key-value metadata (``download/recover.py``).
REVISION_KEY = "coyo.revision"


def pending_rewrites(store: Storage, folder: str) -> dict[str, int]:
    """The shards whose rewrite (``retry_failed``) was begun and not finished:
    ``{name: revision}``, from their ``NNNNN_rewrite.json``."""
    found = {}
    for url in store.glob(layout.rewrite_marker(folder, "*")):
        record = store.read_json_if_exists(url)
        if record is not None:
            found[url.rsplit("/", 1)[-1].removesuffix(layout.REWRITE)] = int(record["revision"])
    return found


def parquet_revision(store: Storage, url: str) -> int:
    """The revision a shard's parquet says it is (0: never rewritten), from its footer."""
    _, pairs = store.parquet_metadata(url)
    return int(pairs.get(REVISION_KEY, 0))


def revisions_read_first(store: Storage, folder: str, names: list[str]) -> dict[str, int]:
    """The revisions of finished shards ``names`` (above 0), as a reader must take them before
    it reads the tars: each ``_stats.json``'s, or, for a rewrite cut short after its parquet
    moved, the parquet's. Both files move after the tar, so neither is ahead of it."""
    revised, listed = shard_revisions(store, folder, names), set(names)
    for name in pending_rewrites(store, folder):
        if name in listed:
            url = layout.shard_file(folder, name, ".parquet")
            revised[name] = max(revised.get(name, 0), parquet_revision(store, url))
    return {n: r for n, r in revised.items() if r}


def labeled(store: Storage, folder: str) -> set[str]:
    """Names of the shards with labels in a labeled-shards ``folder``."""
    return {layout.shard_name(p) for p in store.glob(layout.shard_file(folder, "*", ".parquet"))}


def current_labels(store: Storage, key: str) -> dict | None:
    """The partition's current label set: ``{"labeler": id, ...}`` (None: never labeled)."""
    return store.read_json_if_exists(layout.current_labels(store, key))


def current_labeler(store: Storage, key: str) -> str | None:
    record = current_labels(store, key)
    return record["labeler"] if record else None


def set_current_labels(sets: Storage, key: str, record: dict) -> None:
    """Make a label set the partition's current one (``sets``: the label sets' folder)."""
    sets.write_json(layout.current_in(sets.root, key), record)


def unlabeled(
    store: Storage, key: str, labeler: str | None = None, revised: dict[str, int] | None = None
) -> list[str]:
    """Finished shards of the partition without labels in ``labeler``'s set (default: its
    current one), or labeled before ``retry_failed`` added images to them (``revised``: the
    partition's :func:`revisions`, when the caller has read them)."""
    labeler = labeler or current_labeler(store, key)
    folder = layout.labels(store, key, labeler) if labeler else None
    done = labeled(store, folder) if folder else set()
    if revised is None:
        revised = revisions(store, layout.shards(store, key))
    labeled_at = revisions(store, folder) if folder and revised else {}
    return [
        s
        for s in finished(store, layout.shards(store, key))
        if s not in done or revised.get(s, 0) > labeled_at.get(s, 0)
    ]


@dataclass
class LabelingTodo:
    """What a labeling run of a partition would do: its ``missing`` shards, with the settings
    of the partition's current label set (None: never labeled, the defaults), and a ``run_key``
    that changes with the shards and their revisions, the downloads (a part downloaded again)
    and the labeler."""

    missing: list[str]
    settings: dict | None
    run_key: str


def labeler_settings(store: Storage, labeler: str) -> dict | None:
    """The settings a label set was made with, from its record (None: no record)."""
    made = store.read_json_if_exists(layout.labeler_record(layout.label_sets(store), labeler))
    return (made or {}).get("settings")


def labeling_todo(
    store: Storage, key: str, settings_of: Callable[[str], dict | None] | None = None
) -> LabelingTodo:
    """``settings_of``: a label set's settings by labeler id (a sensor's tick asks about every
    partition, and most share one label set: :func:`labeling_todos` reads each once)."""
    record = current_labels(store, key)
    labeler = record["labeler"] if record else None
    settings = (
        (settings_of or functools.partial(labeler_settings, store))(labeler) if labeler else None
    )
    downloads = store.read_json_if_exists(layout.download_record(layout.shards(store, key)))
    revised = revisions(store, layout.shards(store, key))
    missing = unlabeled(store, key, labeler, revised)
    made_from = provenance.identity(downloads) if downloads else None
    # a shard revised twice is two runs: the key names each missing shard's revision
    named = [(s, revised[s]) if s in revised else s for s in missing]
    return LabelingTodo(missing, settings, provenance.digest([named, made_from, labeler]))


#: Partitions whose storage a tick of the sensor reads at once on S3: each is a few GETs and
#: LISTs (``benchmarks/scale.py``), which overlap instead of queueing one after the other. A
#: local folder is read on one thread (matching names holds the GIL: threads made it slower).
TODO_THREADS = 16


def labeling_todos(store: Storage, keys: list[str]) -> list[LabelingTodo]:
    """:func:`labeling_todo` for each of ``keys``, in order, ``TODO_THREADS`` partitions at a
    time on S3, each label set's record read once."""
    read: dict[str, dict | None] = {}
    lock = threading.Lock()

    def settings_of(labeler: str) -> dict | None:
        with lock:  # this tick's only lock: the first partition of a label set reads its record
            if labeler not in read:
                read[labeler] = labeler_settings(store, labeler)
            return read[labeler]

    def todo(key: str) -> LabelingTodo:
        return labeling_todo(store, key, settings_of)

    if store.is_local:
        return [todo(key) for key in keys]
    with ThreadPoolExecutor(TODO_THREADS, thread_name_prefix="labeling-todo") as pool:
        return list(pool.map(todo, keys))


def mark_downloading(store: Storage, folder: str) -> None:
    """A download is about to change the folder's shards: its completion record goes first, so
    that nothing takes the partition for finished meanwhile."""
    record = layout.download_complete(folder)
    if record is not None:
        store.remove(record)


def mark_downloaded(store: Storage, folder: str, record: dict) -> None:
    """Every shard of the folder is finished (``record``: what the partition holds); written
    only when it says something new, so that a rerun with nothing to do changes nothing."""
    url = layout.download_complete(folder)
    if url is not None and store.read_json_if_exists(url) != record:
        store.write_json(url, record)


def _versions(store: Storage, folder: str) -> dict[str, str]:
    """``{key: version}`` of the ``<key>.json`` records in a folder, from one listing: size,
    modification time, inode or ETag, whichever the filesystem gives, so that any rewrite of a
    record (a rename on disk, an upload on S3) changes its version."""
    try:
        entries = store.fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    found = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e["type"] == "file" and name.endswith(".json"):
            parts = (e.get(f) for f in ("size", "mtime", "ino", "LastModified", "ETag"))
            found[name.removesuffix(".json")] = ":".join(str(p) for p in parts if p is not None)
    return found


def partition_versions(store: Storage) -> dict[str, list[str]]:
    """For each partition the download program finished, the versions of its completion record
    and of its current-labels pointer (``""``: never labeled), in two listings for all
    partitions. The sensor skips a partition whose versions it already saw fully labeled."""
    complete = _versions(store, store.url(layout.DOWNLOADS, layout.COMPLETE))
    pointers = _versions(store, f"{layout.label_sets(store)}/{layout.CURRENT}")
    return {key: [version, pointers.get(key, "")] for key, version in complete.items()}


def downloaded_partitions(store: Storage) -> list[str]:
    """Partition keys that have a shard folder under the storage root (written by this platform
    or by img2dataset run elsewhere into the same layout)."""
    root = store.url(layout.DOWNLOADS)
    try:
        entries = store.fs.ls(root, detail=True)  # one listing: names and types together
    except FileNotFoundError:
        return []
    names = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"}
    return sorted(n for n in names if _KEY.match(n))


def download_counts(store: Storage, key: str, done: list[str] | None = None) -> tuple[int, int]:
    """(attempted, succeeded) over the partition's finished shards, from the per-shard parquet
    (one row per input URL with its ``status``)."""
    folder = layout.shards(store, key)
    done = finished(store, folder) if done is None else done
    files = [layout.shard_file(folder, s, ".parquet") for s in done]
    if not files:
        return 0, 0
    counts = store.scan_parquet(files).select(
        pl.len().alias("attempted"), (pl.col("status") == "success").sum().alias("succeeded")
    )
    row = counts.collect().row(0)
    return int(row[0]), int(row[1])


@dataclass
class Coverage:
    """Downloaded images against label rows (labeled, or recorded as failed with a reason):
    equal, with every finished shard labeled, when nothing was lost."""

    downloaded_images: int
    label_rows: int
    unlabeled_shards: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unlabeled_shards and self.label_rows == self.downloaded_images


def label_coverage(store: Storage, key: str) -> Coverage:
    done = finished(store, layout.shards(store, key))
    _, downloaded = download_counts(store, key, done)
    files = label_files(store, key)
    rows = store.scan_parquet(files).select(pl.len()).collect().item() if files else 0
    return Coverage(downloaded, int(rows), unlabeled(store, key))  # or labeled before a retry


def label_files(store: Storage, key: str, labeler: str | None = None) -> list[str]:
    """The partition's labeled-shard parquets in its current label set (or ``labeler``'s), in
    shard order."""
    labeler = labeler or current_labeler(store, key)
    if labeler is None:
        return []
    return store.glob(layout.shard_file(layout.labels(store, key, labeler), "*", ".parquet"))


#: The partitioned stages, in flow order, and what :func:`clear_partition` deletes for each.
STAGES = (
    "downloaded_shards",
    "labeled_shards",
    "label_stats",
    "coyo_labeled_300m",
    "coyo_labeled_300m_wds",
)


def clear_partition(store: Storage, key: str, stage: str) -> list[str]:
    """Delete partition ``key``'s output of ``stage`` and of every stage after it (every label
    set's labels of the part, not only the current one's); returns what was deleted. The source
    part's copy is kept: the next run copies it again anyway."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of: {', '.join(STAGES)}")
    if not _KEY.match(key or ""):  # "" or ".." would name a stage's whole folder, or the root
        raise ValueError(f"not a partition key: {key!r} (e.g. part-00000)")
    targets: list[str] = []
    later = STAGES[STAGES.index(stage) :]
    if "downloaded_shards" in later:
        targets += [layout.shards(store, key), layout.download_complete(layout.shards(store, key))]
    if "labeled_shards" in later:
        targets += [layout.labels(store, key, labeler) for labeler in layout.labelers(store)]
        targets.append(layout.current_labels(store, key))
    if "label_stats" in later:
        stats = layout.stats(store, key)
        targets += [stats, layout.index(store, key), layout.chart(stats)]
    if "coyo_labeled_300m" in later:
        targets += [layout.subset(store, key), layout.subset_summary(store, key)]
    targets += [layout.wds(store, key), layout.wds_progress(store, key)]
    return [url for url in targets if url and store.remove(url)]
