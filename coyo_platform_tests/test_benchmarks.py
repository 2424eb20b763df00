"""The benchmarks run and print every figure they promise (tiny sizes here; real sizes and the
results are in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_labeler_benchmark_prints_all_three_rates_and_ratios(tmp_path: Path):
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/labeler.py",
            "--model",
            "test_efficientnet",
            "--images",
            "48",
            "--shard-size",
            "12",
            "--batch-size",
            "8",
            "--ceiling-seconds",
            "0.5",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("(a) model alone", "(b) worker end to end", "(c) timm inference.py style"):
        assert line in done.stdout
    assert "target b/c >= 1.3" in done.stdout and "b/a = " in done.stdout
    figures = json.loads(out.read_text())
    assert figures["b_images_labeled"] == 48
    assert figures["outputs"] == 21_843
    for key in ("a_model_alone", "b_worker", "c_baseline", "b/a", "b/c", "peak_rss_mb_all"):
        assert figures[key] > 0
