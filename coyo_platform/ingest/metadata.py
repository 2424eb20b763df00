"""Copy one COYO-700M part from its source into storage, after checking it is usable."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec
import polars as pl

from coyo_platform.common import layout, provenance
from coyo_platform.common.settings import setting
from coyo_platform.common.storage import Storage
from coyo_platform.ingest.schema import BadPartError, check_coyo700m_schema, normalize_coyo700m
from coyo_platform.ingest.sources import locate_part


@dataclass(frozen=True)
class IngestSettings:
    """How a source part is taken in."""

    limit: int | None = setting(None, "keep only the first N rows of the part (a first try)")

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class PartCopy:
    source_url: str
    url: str
    rows: int
    source_rows: int | None
    unique_urls: int
    bytes_written: int
    fingerprint: dict[str, Any]


def copy_part(
    source: str, key: str, storage: Storage, settings: IngestSettings | None = None
) -> PartCopy:
    """Read part ``key`` from ``source``, check it, and write it to ``<root>/coyo700m_metadata``.

    Nothing is written unless every check passes. ``settings.limit`` keeps only the first N rows.

    Raises:
        BadPartError: unreadable file, missing or mistyped column, no rows, bad ids, or rows
            without a URL; the message names the file.
        FileNotFoundError: no such part in ``source``.
    """
    limit = (settings or IngestSettings()).limit
    url = locate_part(source, key)
    try:
        frame = pl.scan_parquet(url)
        schema = frame.collect_schema()
    except Exception as exc:  # polars/arrow/fsspec each raise their own type for a bad file
        raise BadPartError(f"{url}: cannot be read as parquet: {exc}") from exc
    check_coyo700m_schema(schema, url)
    try:
        table = normalize_coyo700m(frame.head(limit) if limit else frame).collect()
    except Exception as exc:
        raise BadPartError(f"{url}: cannot be read as parquet: {exc}") from exc
    if table.height == 0:
        raise BadPartError(f"{url}: the part has no rows")
    if table["id"].null_count():
        raise BadPartError(f"{url}: column 'id' has {table['id'].null_count()} null value(s)")
    duplicated = table.filter(pl.col("id").is_duplicated())["id"]
    if len(duplicated):
        raise BadPartError(
            f"{url}: column 'id' has {duplicated.n_unique()} duplicated id(s), e.g. {duplicated[0]}"
        )
    no_url = table.filter(pl.col("url").is_null() | (pl.col("url").str.strip_chars() == ""))["id"]
    if len(no_url):
        raise BadPartError(
            f"{url}: column 'url' has {len(no_url)} null or empty value(s), e.g. id {no_url[0]}"
        )
    fingerprint = {
        "location": url,
        "bytes": _size(url),
        "rows": table.height,
        "limit": limit,
        "ids_and_urls_sha256": provenance.ids_and_urls_digest(table),
    }
    out = layout.metadata(storage, key)
    arrow = table.to_arrow()
    meta = {**(arrow.schema.metadata or {}), provenance.SOURCE_KEY: json.dumps(fingerprint)}
    storage.write_parquet(out, arrow.replace_schema_metadata(meta))
    return PartCopy(
        source_url=url,
        url=out,
        rows=table.height,
        source_rows=table.height if limit is None else None,
        unique_urls=table["url"].n_unique(),
        bytes_written=storage.size(out),
        fingerprint=fingerprint,
    )


def _size(url: str) -> int | None:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return int(fs.size(path))
    except Exception:  # a source that cannot say (an HTTP server without Content-Length)
        return None


def source_fingerprint(storage: Storage, metadata_url: str) -> dict[str, Any] | None:
    """The source part's fingerprint recorded in its copy (None: copied by an older version)."""
    _, pairs = storage.parquet_metadata(metadata_url)
    value = pairs.get(provenance.SOURCE_KEY)
    return json.loads(value) if value else None
