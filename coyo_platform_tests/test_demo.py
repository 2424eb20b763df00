"""`make demo` run twice, as a newcomer does (once, then again after a change): the second demo's
image server has another port, so its parts have other URLs; it must not fail on the first
demo's downloads (refused as another source's), and it ends with the subset, its card and the
webdataset shards of its images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl


def _demo(tmp_path: Path, workdir: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "COYO_DATA_ROOT": str(tmp_path / "data"),
        "DAGSTER_HOME": str(tmp_path / "home"),
    }
    cmd = [sys.executable, "-m", "coyo_platform.cli", "demo", "--workdir", str(workdir)]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)


def test_the_demo_runs_again_over_its_own_output(tmp_path: Path):
    first = _demo(tmp_path, tmp_path / "demo-1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = _demo(tmp_path, tmp_path / "demo-2")
    out = again.stdout
    assert again.returncode == 0, out[-3000:] + again.stderr[-3000:]
    assert out.count("an earlier demo's output") == 2  # both parts, said
    assert "FAILED" not in out
    subset = tmp_path / "data" / "coyo_labeled_300m"
    assert sorted(p.name for p in subset.glob("*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert f"its dataset card (how to load it, what made it): {subset / 'README.md'}" in out
    wds = tmp_path / "data" / "coyo_labeled_300m_wds"
    assert f"its webdataset shards: {wds}" in out
    manifest = json.loads((wds / ".coyo" / "manifest.json").read_text())
    rows = pl.read_parquet(subset / "*.parquet").height
    assert manifest["complete"] and manifest["samples"] == rows > 0
