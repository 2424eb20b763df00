"""The label program's shard writer: shards are written in the background, at most ``depth``
wait in memory, every shard is written once whatever the others do, and a failed write fails
the run after the rest are written."""

from __future__ import annotations

import threading
from pathlib import Path

import polars as pl
import pytest

from coyo_platform.common.storage import Storage
from coyo_platform.label.writer import ShardWriter


def _rows(shard: int, n: int = 3) -> list[dict]:
    return [{"id": shard * 10 + i, "key": f"{shard:05d}{i:04d}", "error": None} for i in range(n)]


class SlowStorage(Storage):
    """Writes wait until the test lets them through (``gate``); ``fail`` names a shard whose
    write fails."""

    def __init__(self, root: str, fail: str | None = None) -> None:
        super().__init__(root)
        self.gate, self.fail = threading.Event(), fail

    def write_parquet(self, url: str, table, **options) -> None:
        self.gate.wait()
        if self.fail and url.endswith(f"/{self.fail}.parquet"):
            raise OSError(f"disk full writing {url}")
        super().write_parquet(url, table, **options)


def test_more_shards_than_the_queue_holds_are_all_written_in_order(tmp_path: Path):
    """Beyond ``depth`` waiting shards, ``submit`` waits for the oldest write, then goes on."""
    out = SlowStorage(str(tmp_path / "labels"))
    writer = ShardWriter(out, depth=2)
    out.gate.set()
    for s in range(7):
        writer.submit(f"{s:05d}", _rows(s))
        assert len(writer._pending) <= 2  # never more rows held than the queue's depth
    reported = writer.written() + writer.close()
    assert reported == [(f"{s:05d}", 3) for s in range(7)]
    files = sorted(p.name for p in (tmp_path / "labels").glob("*.parquet"))
    assert files == [f"{s:05d}.parquet" for s in range(7)]
    for s in range(7):
        frame = pl.read_parquet(tmp_path / "labels" / f"{s:05d}.parquet")
        assert frame["id"].to_list() == [s * 10 + i for i in range(3)]


def test_a_failed_write_fails_the_run_after_the_others_are_written(tmp_path: Path):
    out = SlowStorage(str(tmp_path / "labels"), fail="00001")
    writer = ShardWriter(out, depth=8)
    for s in range(4):
        writer.submit(f"{s:05d}", _rows(s))
    out.gate.set()
    with pytest.raises(OSError, match="disk full writing .*/00001.parquet"):
        writer.close()
    files = sorted(p.name for p in (tmp_path / "labels").glob("*.parquet"))
    assert files == ["00000.parquet", "00002.parquet", "00003.parquet"]
    assert not list((tmp_path / "labels").glob("*.tmp-*"))  # nothing half-written left


def test_after_a_failed_write_the_next_submit_raises_it(tmp_path: Path):
    """With depth 1, submitting 00001 waits for 00000's write; that write failed, so the submit
    raises and queues nothing more."""
    out = SlowStorage(str(tmp_path / "labels"), fail="00000")
    writer = ShardWriter(out, depth=1)
    out.gate.set()
    writer.submit("00000", _rows(0))
    with pytest.raises(OSError, match="disk full"):
        writer.submit("00001", _rows(1))
    with pytest.raises(OSError, match="disk full"):  # any later submit too
        writer.submit("00002", _rows(2))
    with pytest.raises(OSError, match="disk full"):  # and close says so too
        writer.close()
    assert not list((tmp_path / "labels").glob("*.parquet"))
