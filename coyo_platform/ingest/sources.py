"""Where COYO-700M parts come from, and how a part file maps to its partition key.

A partition key is a part's short name: ``part-00000`` for
``part-00000-17da4908-939c-46e5-91d0-15f256041956-c000.snappy.parquet``. A folder of plain
``<name>.parquet`` files works too (key ``<name>``).
"""

from __future__ import annotations

import re

import fsspec

#: The documented default for real runs: the 128 parts on the Hugging Face hub.
HUB_SOURCE = "hf://datasets/kakaobrain/coyo-700m/data"
HUB_PART_SUFFIX = "-17da4908-939c-46e5-91d0-15f256041956-c000.snappy.parquet"
HUB_PART_COUNT = 128

_SPARK_PART = re.compile(r"^(part-\d{5})-.+\.parquet$")
_PLAIN_PART = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*?)(?:\.snappy)?\.parquet$")


def part_key(filename: str) -> str | None:
    """The partition key for a part file name, or None when the name is not a parquet part."""
    name = filename.rstrip("/").rsplit("/", 1)[-1]
    spark = _SPARK_PART.match(name)
    if spark:
        return spark.group(1)
    plain = _PLAIN_PART.match(name)
    return plain.group(1) if plain else None


def list_parts(source: str) -> dict[str, str]:
    """All parts in ``source`` (a folder, ``s3://`` prefix or ``hf://`` path) as {key: url}."""
    source = source.rstrip("/")
    if source == HUB_SOURCE:  # known layout: no listing call to the hub needed
        return {
            f"part-{i:05d}": f"{source}/part-{i:05d}{HUB_PART_SUFFIX}"
            for i in range(HUB_PART_COUNT)
        }
    fs, root = fsspec.core.url_to_fs(source)
    protocol = source.split("://", 1)[0] + "://" if "://" in source else ""
    parts: dict[str, str] = {}
    for path in sorted(fs.ls(root, detail=False, refresh=True)):  # never a cached listing
        key = part_key(path)
        if key is None:
            continue
        url = f"{protocol}{path}" if protocol and not path.startswith(protocol) else path
        if key in parts:
            raise ValueError(f"{source}: two files map to partition {key!r}: {parts[key]}, {url}")
        parts[key] = url
    return parts


def locate_part(source: str, key: str) -> str:
    """The URL of the part with partition key ``key`` in ``source``; a clear error if absent."""
    try:
        parts = list_parts(source)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"source location {source!r} does not exist") from exc
    if key not in parts:
        shown = ", ".join(sorted(parts)[:5]) or "none"
        raise FileNotFoundError(
            f"no part {key!r} in {source!r} (found {len(parts)} part(s): {shown})"
        )
    return parts[key]
