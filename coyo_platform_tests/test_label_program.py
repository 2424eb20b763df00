"""The label program as the platform runs it: ``python -m coyo_platform.label`` in its own
process, killed halfway, fed unreadable tars, and run where dagster cannot be imported."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pytest

from coyo_platform_tests.conftest import (
    label_cmd,
    label_folder,
    label_parquets,
    photo_shards,
    without_dagster,
)

SHARDS, PER_SHARD = 12, 6


@pytest.fixture(scope="module")
def many_shards(site, tmp_path_factory) -> Path:
    return photo_shards(site, tmp_path_factory.mktemp("many_shards"), SHARDS, PER_SHARD)


def test_killed_label_program_rerun_finishes_only_missing_shards(site, many_shards, tmp_path: Path):
    out = tmp_path / "labels"
    # slow enough per shard (one image per batch, a larger input) that the kill lands mid-run
    slow = ("--num-workers", "0", "--batch-size", "1", "--image-size", "320")
    proc = subprocess.Popen(
        label_cmd(many_shards, out, site.checkpoint, *slow),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None and not label_parquets(out):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the program finished before it could be killed"

    before = {p.name: p.read_bytes() for p in label_parquets(out)}
    folder = label_folder(out)
    print(f"killed after {len(before)} of {SHARDS} shards")
    assert 1 <= len(before) < SHARDS
    for name in before:  # whatever a reader can see is a whole shard
        assert pl.read_parquet(folder / name).height == PER_SHARD

    rerun = subprocess.run(
        label_cmd(many_shards, out, site.checkpoint, "--num-workers", "1", *slow[2:]),
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(rerun.stdout)
    assert report["shards_skipped"] == len(before)
    assert report["shards_labeled"] == SHARDS - len(before)
    assert label_folder(out) == folder  # the same labeler: the same label set
    assert {p.name: p.read_bytes() for p in folder.glob("*.parquet") if p.name in before} == before

    labels = pl.read_parquet(folder / "*.parquet")
    expected = sorted(s * 100 + i for s in range(SHARDS) for i in range(PER_SHARD))
    assert sorted(labels["id"].to_list()) == expected  # every image once: none lost, none twice
    assert labels["error"].null_count() == labels.height


def test_unreadable_tars_fail_the_run_by_name_and_the_rest_is_written(
    site, many_shards, tmp_path: Path
):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (shards / name).write_bytes((many_shards / name).read_bytes())
    (shards / "00002.tar").write_bytes(b"")  # a download that died before its first byte
    whole = (many_shards / "00003.tar").read_bytes()
    (shards / "00003.tar").write_bytes(whole[: len(whole) // 2])  # cut inside a member

    out = tmp_path / "labels"
    done = subprocess.run(
        label_cmd(shards, out, site.checkpoint, "--num-workers", "1"),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "2 shard(s) could not be read" in done.stderr
    assert "00002.tar" in done.stderr and "00003.tar" in done.stderr
    assert [p.name for p in label_parquets(out)] == ["00000.parquet", "00001.parquet"]
    assert not (out / "_current").exists()  # an incomplete set does not become the current one


def test_label_program_runs_without_dagster(site, many_shards, tmp_path: Path):
    """The programs image ships without dagster: run it with dagster made unimportable."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes((many_shards / "00000.tar").read_bytes())
    done = subprocess.run(
        label_cmd(shards, tmp_path / "out", site.checkpoint, "--num-workers", "0"),
        capture_output=True,
        text=True,
        env=without_dagster(tmp_path / "no_dagster"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["images_labeled"] == PER_SHARD
