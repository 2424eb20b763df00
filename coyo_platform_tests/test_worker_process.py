"""The worker as the platform runs it: ``python -m coyo_platform.worker`` in its own process,
killed halfway, fed unreadable tars, and driven by the asset's own config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from coyo_platform import demo
from coyo_platform.assets.downloaded_shards import DownloadConfig
from coyo_platform.assets.labeled_shards import LabelConfig
from coyo_platform.resources import program_args
from coyo_platform_tests.conftest import write_tar

SHARDS, PER_SHARD = 12, 6


@pytest.fixture(scope="module")
def many_shards(site, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many_shards")
    photos = [p.read_bytes() for p in sorted(site.images.glob("*.jpg"))[:PER_SHARD]]
    for s in range(SHARDS):
        samples = [
            (f"{s:05d}{i:04d}", photo, {"id": s * 100 + i}) for i, photo in enumerate(photos)
        ]
        write_tar(folder / f"{s:05d}.tar", samples)
    return folder


def _worker(shards: Path, out: Path, site, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "coyo_platform.worker",
        "--shards",
        str(shards),
        "--output",
        str(out),
        "--preset",
        "timm",
        "--model",
        demo.DEMO_MODEL,
        "--checkpoint",
        str(site.checkpoint),
        *extra,
    ]


def test_killed_worker_rerun_finishes_only_missing_shards(site, many_shards, tmp_path: Path):
    out = tmp_path / "labels"
    # slow enough per shard (one image per batch, a larger input) that the kill lands mid-run
    slow = ("--num-workers", "0", "--batch-size", "1", "--image-size", "320")
    proc = subprocess.Popen(
        _worker(many_shards, out, site, *slow),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None and not list(out.glob("*.parquet")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the worker finished before it could be killed"

    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    print(f"killed after {len(before)} of {SHARDS} shards")
    assert 1 <= len(before) < SHARDS
    for name in before:  # whatever a reader can see is a whole shard
        assert pl.read_parquet(out / name).height == PER_SHARD

    rerun = subprocess.run(
        _worker(many_shards, out, site, "--num-workers", "1"),
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(rerun.stdout)
    assert report["shards_skipped"] == len(before)
    assert report["shards_labeled"] == SHARDS - len(before)
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet") if p.name in before} == before

    labels = pl.read_parquet(out / "*.parquet")
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
        _worker(shards, out, site, "--num-workers", "1"), capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "2 shard(s) could not be read" in done.stderr
    assert "00002.tar" in done.stderr and "00003.tar" in done.stderr
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]


def test_asset_config_and_worker_flags_stay_in_step():
    """Every setting the UI offers reaches the worker as a flag it accepts, booleans included."""
    from coyo_platform.downloader.__main__ import parse_args as download_args
    from coyo_platform.worker.__main__ import parse_args as worker_args

    config = LabelConfig(
        model="m", precision="fp32", batch_size=8, compile=True, decode_on_device=False
    )
    args = worker_args(["--shards", "s", "--output", "o", *program_args(config)])
    assert (args.model, args.precision, args.batch_size) == ("m", "fp32", 8)
    assert (args.compile, args.decode_on_device, args.channels_last) == (True, False, True)

    assert set(LabelConfig.model_fields) <= set(vars(args))

    download = DownloadConfig(image_size=384, processes_count=3)
    args = download_args(["--metadata", "m", "--output", "o", *program_args(download)])
    assert (args.image_size, args.processes_count, args.resize_only_if_bigger) == (384, 3, True)
    assert set(DownloadConfig.model_fields) <= set(vars(args))


def test_worker_imports_no_dagster_even_when_running(site, many_shards, tmp_path: Path):
    """The worker image ships without dagster: run it with dagster made unimportable."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "dagster.py").write_text("raise ImportError('dagster is not in the worker image')")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes((many_shards / "00000.tar").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    done = subprocess.run(
        _worker(shards, tmp_path / "out", site, "--num-workers", "0"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["images_labeled"] == PER_SHARD
