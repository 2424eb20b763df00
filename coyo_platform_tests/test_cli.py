"""``coyo-platform run``, as a newcomer runs it: a real process, a fresh SQLite instance, progress
lines, and materializations that ``dagster dev`` will show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from coyo_platform import demo
from coyo_platform.definitions import PIPELINE

BIN = Path(sys.executable).parent


def test_run_two_parts_with_limit(site, source: Path, tmp_path: Path):
    home, root = tmp_path / "dagster_home", tmp_path / "data"
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    done = subprocess.run(
        [
            str(BIN / "coyo-platform"), "run", "--source", str(source),
            "--parts", "part-00000", "part-00001", "--limit", "12",
            "--model", demo.DEMO_MODEL, "--checkpoint", str(site.checkpoint), "--preset", "timm",
            "--threshold", "0.5", "--data-root", str(root),
        ],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for part in ("part-00000", "part-00001"):
        for asset in PIPELINE:
            assert f"[{part}] {asset.key.to_user_string()}" in out
        subset = pl.read_parquet(root / "coyo_labeled_300m" / f"{part}.parquet")
        assert subset.height <= 12
        assert (subset["label_probs"].list.first() >= 0.5).all()
        assert str(root / "coyo_labeled_300m" / f"{part}.parquet") in out
    assert pl.read_parquet(root / "coyo700m_metadata" / "part-00000.parquet").height == 12

    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = dg.DagsterInstance.get()
        assert set(instance.get_dynamic_partitions("coyo_parts")) == {"part-00000", "part-00001"}
        for asset in PIPELINE:
            done_parts = instance.get_materialized_partitions(asset.key)
            assert done_parts == {"part-00000", "part-00001"}, asset.key
    finally:
        del os.environ["DAGSTER_HOME"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threshold", "1.5"], "threshold must be in [0, 1]"),
        (["--model", "tf_efficientnetv2_xxl"], "unknown model 'tf_efficientnetv2_xxl'"),
        (["--allow-network", "intranet"], "'intranet' is not an IP network"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path: Path, flags: list[str], message):
    done = subprocess.run(
        [str(BIN / "coyo-platform"), "run", "--parts", "part-00000", *flags],
        env={**os.environ, "DAGSTER_HOME": str(tmp_path / "h")},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert not (tmp_path / "h").exists() and not (tmp_path / "data").exists()
