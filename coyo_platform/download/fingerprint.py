"""A partition's download fingerprint (``downloaded_shards/<part>/_fingerprint.json``): the
source part it was downloaded from and the download settings that change the bytes. Finished
shards are reused only under the same fingerprint; anything else fails at once, naming the field,
its old and new value and the command that starts the partition over. Imports no ``dagster``."""

from __future__ import annotations

import uuid
from dataclasses import asdict, replace
from typing import Any

from coyo_platform.common import layout, provenance, shards
from coyo_platform.common.storage import Storage
from coyo_platform.download.settings import DownloadSettings
from coyo_platform.ingest.metadata import source_fingerprint

#: The settings that change what a shard holds (its rows, images, statuses); the others (threads,
#: timeouts, retries, processes, networks allowed) change how fast or how often, not what.
OUTPUT_SETTINGS = (
    "image_size",
    "resize_mode",
    "resize_only_if_bigger",
    "skip_reencode",
    "min_image_size",
    "max_aspect_ratio",
    "number_sample_per_shard",
    "max_bytes",
    "max_pixels",
    "drift_distance",
    "drop_drifted",
    "dedup_crawl_phash",
    "keep_original",
)
#: The shards' own format: 2 added each row's ``transient`` flag to the parquet.
FORMAT = 2
#: The source fields compared: the content (a part moved to another bucket is the same part).
SOURCE_FIELDS = ("rows", "ids_and_urls_sha256")


def record_url(folder: str) -> str:
    return layout.download_record(folder)


def current(store: Storage, metadata_url: str, settings: DownloadSettings) -> dict[str, Any]:
    """The fingerprint a download of ``metadata_url`` (read through ``store``: its endpoint and
    retries) with ``settings`` has."""
    source = source_fingerprint(store, metadata_url) or {}
    return {
        "format": FORMAT,
        "source": {name: source.get(name) for name in SOURCE_FIELDS},
        "source_location": source.get("location"),
        "settings": current_settings(settings),
    }


def current_settings(settings: DownloadSettings) -> dict[str, Any]:
    """The settings of :data:`OUTPUT_SETTINGS`, as recorded."""
    values = asdict(settings)
    return {
        name: list(v) if isinstance(v, tuple) else v
        for name, v in values.items()
        if name in OUTPUT_SETTINGS
    }


def start_over(folder: str) -> str:
    parent, _, key = folder.rstrip("/").rpartition("/")
    root, _, stage = parent.rpartition("/")
    if stage == layout.DOWNLOADS and root:
        return provenance.start_over_command(root, key, layout.DOWNLOADS)
    return f"delete {folder} and rerun"


def check_folder(store: Storage, folder: str, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """Raise :class:`provenance.Mismatch` unless ``folder``'s shards were made as ``wanted``
    says; returns the recorded fingerprint (None: no finished shard yet, so nothing to reuse and
    nothing to compare: a run stopped before its first shard may be rerun with other settings)."""
    if not shards.finished(store, folder):
        return None
    recorded = store.read_json_if_exists(record_url(folder))
    if recorded is None:  # shards without a record: made by an older version, or by img2dataset
        raise provenance.Mismatch(
            folder, "fingerprint", "none (shards from an older version or another "
            "tool)", "this run's", start_over(folder)
        )  # fmt: skip
    what = f"the downloaded shards in {folder}"
    old, new = provenance.compared(recorded), provenance.compared(wanted)
    provenance.check(old, new, what, start_over(folder))
    return recorded


def check_or_record(store: Storage, folder: str, wanted: dict[str, Any]) -> None:
    """Before a download: check the folder's fingerprint, or record it in a folder with no
    finished shard yet, with a fresh ``made`` id (another download than any before it)."""
    if check_folder(store, folder, wanted) is None:
        store.write_json(record_url(folder), {**wanted, "made": uuid.uuid4().hex})


def for_retry(
    store: Storage, folder: str, settings: DownloadSettings
) -> tuple[DownloadSettings, dict[str, tuple[Any, Any]]]:
    """With ``retry_failed``, the settings a recovery uses: the folder's recorded
    :data:`OUTPUT_SETTINGS` (a shard is rewritten as it was made, whatever the launchpad's
    defaults say), this run's for the rest (threads, timeouts, retries, networks). Returns them
    and what was taken from the record, ``{name: (given, recorded)}``."""
    if not settings.retry_failed or not shards.finished(store, folder):
        return settings, {}
    recorded = store.read_json_if_exists(record_url(folder))
    if recorded is None or recorded.get("format") != FORMAT:
        return settings, {}  # check_folder names the problem
    given = current_settings(settings)
    taken = {k: (given[k], v) for k, v in recorded["settings"].items() if given.get(k) != v}
    values = {k: tuple(v) if isinstance(v, list) else v for k, (_, v) in taken.items()}
    return replace(settings, **values), taken


def identity(store: Storage, folder: str) -> str | None:
    """Which download the folder holds (``provenance.identity``; None: no record)."""
    recorded = store.read_json_if_exists(record_url(folder))
    return provenance.identity(recorded) if recorded else None


def data_version(store: Storage, folder: str) -> str:
    """What downstream depends on: which download it is, its finished shards and their
    revisions (``retry_failed``)."""
    parts: list = [identity(store, folder), shards.finished(store, folder)]
    revised = shards.revisions(store, folder)
    return provenance.digest(parts + [revised] if revised else parts)
