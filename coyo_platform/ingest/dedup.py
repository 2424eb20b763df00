"""Dedup before download, as the card's makers did ("We first removed the duplicated images by
``image_phash``. Then, we labeled 300M unique images"): of the rows that share a crawl
``image_phash`` across every registered part, the one with the smallest ``id`` is downloaded and
labeled, the others never are. Rows without an ``image_phash`` are all kept.

The rule is a minimum, so it does not depend on the order in which parts are registered: once
every part is registered, the rows kept are the same whatever came first. A part's download
decides with the parts registered when it starts (the copies in ``coyo700m_metadata/``), and
that decision is frozen with its shards (``downloaded_shards/<part>/_crawl_dedup.json`` and
``_crawl_dedup/dropped.parquet``, out of the way of globs for the shards' parquets): a resumed
download never reshuffles its shards. A part registered later can only take the smallest id away
from rows already downloaded (never give it to a row that was dropped), so nothing is ever
downloaded again: :func:`since` names those rows, and the sampling plan drops them from
the subset (README, "Dedup before download").

Memory: the part's own unique hashes, and the other parts' rows that share one of them, never
all rows. Imports no ``dagster``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from coyo_platform.common.storage import Storage

#: The decision's record and its dropped rows, in the part's download folder.
DECISION = "_crawl_dedup.json"
DROPPED = "_crawl_dedup/dropped.parquet"


def registered(store: Storage) -> dict[str, str]:
    """The parts registered in ``store`` (a folder of part copies, ``<part>.parquet``): each
    with the digest of its ids and URLs (its recorded source fingerprint; "" where none)."""
    from coyo_platform.ingest.metadata import source_fingerprint

    parts = {}
    for url in store.glob(store.url("*.parquet")):
        name = url.rsplit("/", 1)[-1]
        if name.startswith((".", "_")):
            continue
        fingerprint = source_fingerprint(store, url) or {}
        parts[name.removesuffix(".parquet")] = fingerprint.get("ids_and_urls_sha256") or ""
    return parts


def _rows(store: Storage, part: str) -> pl.LazyFrame:
    return (
        store.scan_parquet(store.url(f"{part}.parquet"))
        .select("id", "image_phash")
        .filter(pl.col("image_phash").is_not_null() & (pl.col("image_phash") != ""))
    )


def losers(store: Storage, part: str, against: list[str]) -> pl.DataFrame:
    """The rows of ``part`` whose ``image_phash`` a row with a smaller id holds, in ``part``
    itself or in any part of ``against``: ``id``, ``kept_id``, ``kept_part``, by id."""
    mine = _rows(store, part)
    hashes = mine.select("image_phash").unique()
    holders = pl.concat(
        [
            _rows(store, other)
            .join(hashes, on="image_phash", how="semi")
            .with_columns(kept_part=pl.lit(other))
            for other in sorted({part, *against})
        ]
    )
    best = holders.sort("id").group_by("image_phash").agg(pl.col("id", "kept_part").first())
    best = best.rename({"id": "kept_id"})
    return (
        mine.join(best, on="image_phash")
        .filter(pl.col("id") != pl.col("kept_id"))
        .select("id", "kept_id", "kept_part")
        .sort("id")
        .collect(engine="streaming")
    )


def decide(parts: Storage, part: str, folder: Storage) -> dict[str, Any]:
    """Decide which rows of ``part`` (a copy in ``parts``) are not downloaded, against every part
    registered now, and freeze the decision in the download folder; returns its record."""
    now = registered(parts)
    dropped = losers(parts, part, list(now))
    folder.write_parquet(folder.url(DROPPED), dropped.to_arrow())
    total = parts.scan_parquet(parts.url(f"{part}.parquet")).select(pl.len()).collect().item()
    record = {
        "registered": now,
        "rows": total,
        "dropped": dropped.height,
        "kept": total - dropped.height,
        "dropped_for": dict(sorted(dropped["kept_part"].value_counts().iter_rows())),
    }
    folder.write_json(folder.url(DECISION), record)
    return record


def decision(folder: Storage) -> dict[str, Any] | None:
    """The frozen decision of a download folder (None: none made, or dedup off)."""
    return folder.read_json_if_exists(folder.url(DECISION))


def dropped_ids(folder: Storage) -> pl.LazyFrame:
    return folder.scan_parquet(folder.url(DROPPED)).select("id")


@dataclass
class Since:
    """What the parts registered since a download change for it."""

    later: pl.DataFrame  # rows downloaded that a smaller id elsewhere now holds (id, kept_id, ...)
    revived: int = 0  # rows not downloaded whose holder is gone (its part cleared or changed)


def since(parts: Storage, part: str, folder: Storage, now: dict[str, str]) -> Since | None:
    """Against the parts registered ``now`` (:func:`registered`), the rows of ``part``'s frozen
    decision the rule no longer agrees with. None when the part was downloaded without dedup;
    nothing when no part was registered, changed or removed since."""
    record = decision(folder)
    if record is None:
        return None
    if now == record["registered"]:
        empty = {"id": pl.Int64, "kept_id": pl.Int64, "kept_part": pl.String}
        return Since(pl.DataFrame(schema=empty))
    current = losers(parts, part, list(now))
    dropped = dropped_ids(folder).collect()
    later = current.join(dropped, on="id", how="anti").sort("id")
    revived = dropped.join(current.select("id"), on="id", how="anti").height
    return Since(later, revived)
