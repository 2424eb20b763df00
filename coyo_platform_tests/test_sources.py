"""Part files map to partition keys, and a missing part is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from coyo_platform.ingest import sources


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("part-00000-17da4908-939c-46e5-91d0-15f256041956-c000.snappy.parquet", "part-00000"),
        ("s3://bucket/coyo/part-00127-17da4908-x-c000.snappy.parquet", "part-00127"),
        ("my_shard.parquet", "my_shard"),
        ("_SUCCESS", None),
        ("notes.txt", None),
    ],
)
def test_part_key(name: str, key: str | None):
    assert sources.part_key(name) == key


def test_hub_parts_need_no_listing():
    parts = sources.list_parts(sources.HUB_SOURCE)
    assert len(parts) == 128
    assert parts["part-00000"].endswith(
        "data/part-00000-17da4908-939c-46e5-91d0-15f256041956-c000.snappy.parquet"
    )


def test_locate_in_folder(tmp_path: Path):
    (tmp_path / "part-00003-abc-c000.snappy.parquet").write_bytes(b"")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    assert sources.locate_part(str(tmp_path), "part-00003").endswith(
        "part-00003-abc-c000.snappy.parquet"
    )
    with pytest.raises(FileNotFoundError, match="no part 'part-00004'.*part-00003"):
        sources.locate_part(str(tmp_path), "part-00004")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.locate_part(str(tmp_path / "nope"), "part-00003")
