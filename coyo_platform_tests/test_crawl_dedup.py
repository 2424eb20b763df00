"""Dedup before download (``ingest/dedup.py``): one row per crawl ``image_phash`` across every
part, the smallest id, whatever order the parts are registered in; ``coyo-platform run`` as a
user types it, part by part, against the loopback image server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import polars as pl
import pytest

from coyo_platform import demo
from coyo_platform_tests.conftest import BIN, LOOPBACK

ROWS = 10
#: (part, row) pairs that share a crawl image_phash; the smallest id of each group is kept.
GROUPS = [
    [(0, 0), (1, 0)],  # the smaller id in part 0: part 1's row is never downloaded
    [(0, 2), (1, 1)],  # the smaller id in part 1: part 0's row is dropped, in either order
    [(0, 3), (0, 4)],  # within one part
    [(0, 5), (1, 5), (1, 6)],  # three rows, two parts
]


def _ids(part: int) -> list[int]:
    """Interleaved ids, so that either part can hold a group's smallest one."""
    return [10 * i + 1 + 4 * part for i in range(ROWS)]


def _write_parts(site, source: Path) -> dict[int, int]:
    """Two parts of photos only (each URL unique), with the shared hashes of :data:`GROUPS`;
    returns the id each row of a group loses to."""
    photos = [item for item in site.items if item.kind == "photo"]
    frames = []
    for part in range(2):
        frame = demo.make_part(site.images, photos, site.base_url, ROWS, 10**6 * (part + 1))
        url = frame["url"].to_list()
        url[-1] = f"{site.base_url}/{photos[part].name}?last={part}"  # no refused host here
        frames.append(frame.with_columns(id=pl.Series(_ids(part)), url=pl.Series(url)))
    lost_to = {}
    for n, group in enumerate(GROUPS):
        shared = f"{0xABC0 + n:016x}"
        for part, row in group:
            phash = frames[part]["image_phash"].to_list()
            phash[row] = shared
            frames[part] = frames[part].with_columns(image_phash=pl.Series(phash))
        ids = [_ids(part)[row] for part, row in group]
        lost_to |= {i: min(ids) for i in ids if i != min(ids)}
    source.mkdir(parents=True)
    for part, frame in enumerate(frames):
        frame.write_parquet(source / demo.part_file_name(part))
    return lost_to


def _run(site, source: Path, work: Path, *parts: str) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "coyo-platform"), "run", "--source", str(source), "--parts", *parts,
        "--data-root", str(work / "data"), "--model", demo.DEMO_MODEL,
        "--checkpoint", str(site.checkpoint), "--preset", "timm", "--allow-networks", LOOPBACK,
    ]  # fmt: skip
    env = {**os.environ, "DAGSTER_HOME": str(work / "home")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _kept(data: Path) -> set[int]:
    return set(pl.read_parquet(data / "coyo_labeled_300m" / "*.parquet")["id"].to_list())


def _downloaded(data: Path, part: str) -> set[int]:
    rows = pl.read_parquet(data / "downloaded_shards" / part / "*.parquet")
    return set(rows["id"].to_list())


@pytest.mark.parametrize("order", [("part-00000", "part-00001"), ("part-00001", "part-00000")])
def test_dedup_before_download_keeps_the_smallest_id_whatever_the_order(site, tmp_path, order):
    source = tmp_path / "source"
    lost_to = _write_parts(site, source)
    work = tmp_path / "work"
    first, second = order
    _run(site, source, work, first)  # registered, downloaded, labeled alone
    done = _run(site, source, work, second)
    # the plan over both parts changed the first part's subset: the run rewrote it, and says so
    assert f"subsets written under another plan, rewritten too: {first}" in done.stdout
    data = work / "data"
    every_id = set(_ids(0)) | set(_ids(1))
    # the same subset in either order: every id once, none that lost its image_phash
    assert _kept(data) == every_id - set(lost_to)

    # what each part's download left out, and says it left out
    decided = {
        part: json.loads((data / "downloaded_shards" / part / "_crawl_dedup.json").read_text())
        for part in order
    }
    within = {_ids(0)[4]}  # part 0's row 4 loses to its own row 3, whatever the order
    assert set(_ids(0)) - _downloaded(data, "part-00000") >= within
    for part in order:
        dropped = (set(_ids(0)) | set(_ids(1))) - _downloaded(data, part)
        dropped &= set(_ids(int(part[-1])))
        assert decided[part]["dropped"] == len(dropped)
        assert dropped <= set(lost_to)
    plan = json.loads((data / "subset_plan" / "plan.json").read_text())
    # the plan counts what the subset keeps (every labeled image clears the default threshold)
    assert plan["images_eligible"] == plan["rows"] == len(every_id - set(lost_to))
    if order[0] == "part-00000":
        # part 0 went first: its row 2 was downloaded before part 1 (with a smaller id for
        # its image_phash) was registered; the plan names it and drops it from the subset
        assert plan["crawl_duplicates_dropped"] == {"part-00000": 1}
        assert _ids(0)[2] in _downloaded(data, "part-00000")
        assert decided["part-00001"]["dropped_for"] == {"part-00000": 3}
    else:
        # part 1 went first: part 0's download saw it and never fetched its row 2; part 1's
        # rows 0 and 5, downloaded before part 0 was registered, are the plan's to drop
        assert plan["crawl_duplicates_dropped"] == {"part-00001": 2}
        assert _ids(0)[2] not in _downloaded(data, "part-00000")
        assert decided["part-00000"]["dropped_for"] == {"part-00000": 1, "part-00001": 1}


def test_dedup_before_download_can_be_turned_off(site, tmp_path):
    source = tmp_path / "source"
    _write_parts(site, source)
    work = tmp_path / "work"
    done = _run(site, source, work, "part-00000", "--no-dedup-crawl-phash")
    assert "crawl_duplicates_dropped" not in done.stdout + done.stderr
    data = work / "data"
    assert _downloaded(data, "part-00000") == set(_ids(0))
    assert not (data / "downloaded_shards" / "part-00000" / "_crawl_dedup.json").exists()


def test_a_part_cleared_or_added_later_is_named_not_silently_applied(tmp_path):
    """The frozen decision against parts registered since: a part added with a smaller id takes
    a downloaded row (``later``); a part removed leaves rows never downloaded (``revived``)."""
    from coyo_platform.common.storage import Storage
    from coyo_platform.ingest import dedup

    copies = Storage(str(tmp_path / "coyo700m_metadata"))

    def register(part: str, ids: list[int], hashes: list[str | None]) -> None:
        frame = pl.DataFrame({"id": ids, "image_phash": hashes}, schema_overrides={"id": pl.Int64})
        copies.write_parquet(copies.url(f"{part}.parquet"), frame.to_arrow())

    register("part-a", [10, 20, 30, 40], ["h1", "h2", "h2", None])
    register("part-b", [5, 25], ["h1", "h9"])
    folder = Storage(str(tmp_path / "downloaded_shards" / "part-a"))
    record = dedup.decide(copies, "part-a", folder)
    assert (record["rows"], record["dropped"], record["kept"]) == (4, 2, 2)  # 10 to b, 30 to 20
    assert record["dropped_for"] == {"part-a": 1, "part-b": 1}
    assert dedup.since(copies, "part-a", folder, dedup.registered(copies)).later.is_empty()

    register("part-c", [15], ["h2"])  # a smaller id for h2: part-a's downloaded 20 loses it
    changed = dedup.since(copies, "part-a", folder, dedup.registered(copies))
    assert changed.later.rows() == [(20, 15, "part-c")] and changed.revived == 0

    copies.fs.rm(copies.url("part-b.parquet"))  # cleared: part-a's 10 was dropped for nothing
    changed = dedup.since(copies, "part-a", folder, dedup.registered(copies))
    assert changed.revived == 1
