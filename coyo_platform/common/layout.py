"""Every path below the storage root, in one place. Each stage writes below a folder named for
its asset::

    <root>/coyo700m_metadata/<part>.parquet
    <root>/downloaded_shards/<part>/NNNNN.tar|.parquet|_stats.json    (img2dataset's layout)
    <root>/downloaded_shards/<part>/_fingerprint.json                  (source part, settings)
    <root>/downloaded_shards/<part>/_revisions.json      (shards rewritten by retry_failed)
    <root>/downloaded_shards/<part>/NNNNN_rewrite.json   (a rewrite in progress, or cut short)
    <root>/downloaded_shards/_complete/<part>.json  (the download program finished the part)
    <root>/labeled_shards/<labeler id>/<part>/NNNNN.parquet, <root>/labeled_shards/<labeler id>/
        _labeler.json, <root>/labeled_shards/_current/<part>.json        (one set per labeler)
    <root>/labeled_shards/<labeler id>/<part>/_revisions.json   (the revision each was labeled at)
    <root>/label_stats/<part>.json|.index.parquet|.png, _all_partitions.json|.png, _classes.parquet
    <root>/subset_plan/plan.json, <root>/subset_plan/<plan id>/duplicates/<part>.parquet,
        <root>/subset_plan/<plan id>/class_cutoffs.parquet
    <root>/coyo_labeled_300m/<part>.parquet, README.md (the dataset card), and hidden from
        dataset loaders: .coyo/manifest.json, .coyo/top1.png, .coyo/summary/<part>.json
    <root>/coyo_labeled_300m_wds/<part>/NNNNN.tar, _info.json (timm's reader's), and
        .coyo/progress/<part>.json (one partition's shards so far), .coyo/manifest.json
    <root>/taxonomy/classes.parquet, hierarchy.parquet
    <root>/label_agreement/<baseline>_vs_<candidate>.json

The programs are handed folders (a partition's shards, its labels) and name the shard files in
them with :func:`shard_file`; the download program builds each shard in :func:`staging` first.
Imports no ``dagster``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from coyo_platform.common.storage import Storage, is_local

METADATA = "coyo700m_metadata"
DOWNLOADS = "downloaded_shards"
LABELS = "labeled_shards"
STATS = "label_stats"
PLAN = "subset_plan"
SUBSET = "coyo_labeled_300m"
WDS = "coyo_labeled_300m_wds"
TAXONOMY = "taxonomy"
AGREEMENT = "label_agreement"

FINGERPRINT = "_fingerprint.json"  # a downloaded-shards folder's (download/fingerprint.py)
LABELER_FILE = "_labeler.json"
CURRENT = "_current"
COMPLETE = "_complete"  # downloaded_shards/_complete/<part>.json: every shard of the part done
REVISIONS = "_revisions.json"  # shards rewritten by retry_failed: {shard: revision}
REWRITE = "_rewrite.json"  # NNNNN_rewrite.json: a shard's rewrite in progress (or cut short)
STATS_DONE = "_stats.json"  # img2dataset's "this shard is finished" file: NNNNN_stats.json
ROLLUP = "_all_partitions"
PLAN_FILE = "plan.json"
#: The subset folder's own files that are not data, in a hidden folder: dataset loaders
#: (``datasets.load_dataset("parquet", data_dir=...)``) read every other file in it as parquet.
SUBSET_META = ".coyo"
MANIFEST_FILE = "manifest.json"
LEGACY_MANIFEST = "_manifest.json"  # before the card: beside the parts, which broke loaders
CARD_FILE = "README.md"
WDS_INFO = "_info.json"  # timm's webdataset reader reads the splits and shard lengths from it


def metadata(store: Storage, key: str) -> str:
    return store.url(METADATA, f"{key}.parquet")


def shards(store: Storage, key: str) -> str:
    """The folder of a partition's downloaded shards."""
    return store.url(DOWNLOADS, key)


def label_sets(store: Storage) -> str:
    """The folder holding one label set per labeler."""
    return store.url(LABELS)


def labels(store: Storage, key: str, labeler: str) -> str:
    """The folder of a partition's labeled shards in ``labeler``'s label set."""
    return labels_in(label_sets(store), key, labeler)


def labels_in(sets: str, key: str, labeler: str) -> str:
    """:func:`labels` below a label sets' folder (the label program's ``--output``)."""
    return f"{sets.rstrip('/')}/{labeler}/{key}"


def labeler_record(labels_root: str, labeler: str) -> str:
    """A label set's fingerprint (``label/labeler.py``)."""
    return f"{labels_root.rstrip('/')}/{labeler}/{LABELER_FILE}"


def current_labels(store: Storage, key: str) -> str:
    """Which label set is the partition's current one."""
    return current_in(label_sets(store), key)


def current_in(sets: str, key: str) -> str:
    return f"{sets.rstrip('/')}/{CURRENT}/{key}.json"


def labelers(store: Storage) -> list[str]:
    """The ids of the label sets under the storage root."""
    found = store.glob(labeler_record(store.url(LABELS), "*"))
    return sorted(f.rstrip("/").rsplit("/", 2)[-2] for f in found)


def download_record(folder: str) -> str:
    """A downloaded-shards folder's fingerprint (``download/fingerprint.py``)."""
    return f"{folder.rstrip('/')}/{FINGERPRINT}"


def download_complete(folder: str) -> str | None:
    """The record that the download program finished a downloaded-shards folder of this layout
    (``<root>/downloaded_shards/<part>``): ``<root>/downloaded_shards/_complete/<part>.json``,
    one folder for every partition, so that a sensor tick lists them all at once. None for a
    folder outside the layout (the program run by hand into any folder)."""
    parent, _, key = folder.rstrip("/").rpartition("/")
    if parent.rsplit("/", 1)[-1] != DOWNLOADS:
        return None
    return f"{parent}/{COMPLETE}/{key}.json"


def revisions(folder: str) -> str:
    """A shards or labels folder's record of its shards' revisions (``download/recover.py``)."""
    return f"{folder.rstrip('/')}/{REVISIONS}"


def rewrite_marker(folder: str, shard: str) -> str:
    """``NNNNN_rewrite.json``: the revision a rewrite of the shard is writing."""
    return shard_file(folder, shard, REWRITE)


def shard_file(folder: str, shard: str, suffix: str) -> str:
    """``<folder>/<shard><suffix>``: ``.tar``, ``.parquet`` or ``_stats.json``."""
    return f"{folder.rstrip('/')}/{shard}{suffix}"


def staging(folder: str) -> str:
    """Where the download program builds shards before they move into ``folder``: its ``_tmp``
    on a local disk (a rename away), else one folder per output URL in this machine's temp
    folder (an upload away)."""
    if is_local(folder):
        return os.path.join(folder, "_tmp")
    digest = hashlib.sha1(folder.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "coyo-staging", digest)


def shard_name(url: str) -> str:
    """``.../00042.tar`` or ``.../00042_stats.json`` -> ``00042``."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(STATS_DONE).rsplit(".", 1)[0]


def stats(store: Storage, key: str) -> str:
    return store.url(STATS, f"{key}.json")


def index(store: Storage, key: str) -> str:
    """A partition's index for the plan: id, pHash, top-1 (``stats.aggregate.INDEX_SCHEMA``)."""
    return store.url(STATS, f"{key}.index.parquet")


def rollup(store: Storage) -> str:
    return store.url(STATS, f"{ROLLUP}.json")


def chart(stats_url: str) -> str:
    """The PNG beside a stats JSON (a partition's or the roll-up's)."""
    return stats_url.removesuffix(".json") + ".png"


def class_counts(store: Storage) -> str:
    return store.url(STATS, "_classes.parquet")


def partitions_with_stats(store: Storage) -> list[str]:
    """Partition keys whose stats JSON and index are both written (a plan reads both)."""
    names = {p.rsplit("/", 1)[-1] for p in store.glob(store.url(STATS, "*"))}
    keys = [n.removesuffix(".json") for n in names if n.endswith(".json") and n[0] != "_"]
    return sorted(k for k in keys if f"{k}.index.parquet" in names)


def plan(store: Storage) -> str:
    return store.url(PLAN, PLAN_FILE)


def plan_folder(store: Storage, plan_id: str) -> str:
    """Where one plan's files (duplicates, class cutoffs) go; a new plan gets a new folder."""
    return store.url(PLAN, plan_id)


def plan_folders(store: Storage) -> list[str]:
    return [p for p in store.glob(store.url(PLAN, "*")) if not p.endswith(PLAN_FILE)]


def duplicates(folder: str, key: str | None = None) -> str:
    """A partition's rows dropped as pHash duplicates, in a plan folder, or (no key) a glob of
    every duplicates file (``crawl_duplicates``'s too)."""
    return f"{folder}/duplicates/{key or '*'}.parquet"


def crawl_duplicates(folder: str, key: str) -> str:
    """A partition's rows that dedup before download would have dropped had a part registered
    after its download been there (``ingest/dedup.py``), in a plan folder."""
    return f"{folder}/duplicates/crawl-{key}.parquet"


def class_cutoffs(folder: str) -> str:
    return f"{folder}/class_cutoffs.parquet"


def subset(store: Storage, key: str) -> str:
    return store.url(SUBSET, f"{key}.parquet")


def subset_files(store: Storage) -> dict[str, str]:
    """The subset's part files by partition key."""
    files = store.glob(store.url(SUBSET, "*.parquet"))
    return {f.rsplit("/", 1)[-1].removesuffix(".parquet"): f for f in files}


def manifest(store: Storage) -> str:
    return store.url(SUBSET, SUBSET_META, MANIFEST_FILE)


def card(store: Storage) -> str:
    """The subset's dataset card (``sample/card.py``)."""
    return store.url(SUBSET, CARD_FILE)


def card_chart(store: Storage) -> str:
    return store.url(SUBSET, SUBSET_META, "top1.png")


def subset_summary(store: Storage, key: str) -> str:
    """What a partition's subset file holds, for the card: top-1 histogram and classes."""
    return store.url(SUBSET, SUBSET_META, "summary", f"{key}.json")


def wds(store: Storage, key: str) -> str:
    """The folder of a partition's webdataset shards of its kept images (``sample/wds.py``)."""
    return store.url(WDS, key)


def wds_shard(folder: str, number: int) -> str:
    return f"{folder.rstrip('/')}/{number:05d}.tar"


def wds_progress(store: Storage, key: str) -> str:
    """A partition's webdataset shards written so far, and where its input stands."""
    return store.url(WDS, SUBSET_META, "progress", f"{key}.json")


def wds_manifest(store: Storage) -> str:
    return store.url(WDS, SUBSET_META, MANIFEST_FILE)


def wds_info(store: Storage) -> str:
    return store.url(WDS, WDS_INFO)


def taxonomy(store: Storage, table: str) -> str:
    """``classes`` or ``hierarchy``."""
    return store.url(TAXONOMY, f"{table}.parquet")


def agreement(store: Storage, baseline: str, candidate: str) -> str:
    """Two label sets compared (``stats/agreement.py``)."""
    return store.url(AGREEMENT, f"{baseline}_vs_{candidate}.json")
