"""The benchmarks run and print every figure they promise (tiny sizes here; real sizes and the
results are in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_label_benchmark_prints_all_three_rates_and_ratios(tmp_path: Path):
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/label.py",
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
    for line in ("(a) model alone", "(b) label program end to end", "(c) timm inference.py style"):
        assert line in done.stdout
    assert "target b/c >= 1.3" in done.stdout and "b/a = " in done.stdout
    assert "(d) loader CPU per image: coyo preset, 512 px path" in done.stdout
    assert "(target <= 2.5 ms per core" in done.stdout
    figures = json.loads(out.read_text())
    assert figures["b_images_labeled"] == 48
    assert figures["d_loader_cpu_ms_per_image_coyo_512"] > 0
    assert figures["outputs"] == 21_843
    for key in ("a_model_alone", "b_label_program", "c_baseline", "b/a", "b/c", "peak_rss_mb_all"):
        assert figures[key] > 0


def test_stats_benchmark_prints_both_engines_the_ratio_and_agreement(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "benchmarks/stats.py", "--quick", "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "MISMATCH" not in out
    for rows in ("40,000 rows (2 parts)", "80,000 rows (4 parts)"):
        assert rows in out
    for engine in ("ours", "duckdb"):
        lines = [ln for ln in out.splitlines() if ln.split()[:1] == [engine] and "rows/s" in ln]
        assert len(lines) == 2 and all("peak RSS" in ln for ln in lines)
    assert out.count("ratio duckdb/ours = ") == 2
    assert out.count("engines agree: ") == 2
    assert "target ratio >= 1" in out and "target ours peak RSS < 2,048 MB" in out
    assert "extrapolated to 747,000,000 rows" in out and "machine: " in out


def test_download_benchmark_prints_both_engines_and_the_ratio():
    done = subprocess.run(
        [sys.executable, "benchmarks/download.py", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for engine in ("img2dataset", "ours"):
        [line] = [ln for ln in lines if ln.split()[:1] == [engine] and "img/s " in ln]
        assert "peak RSS" in line
    assert any(ln.startswith("ours / img2dataset (images per second): ") for ln in lines)


def test_download_soak_prints_its_figures_and_loses_nothing():
    """The soak in small: hostile rows, transient ones and an outage; every id once."""
    done = subprocess.run(
        [sys.executable, "benchmarks/download.py", "--soak", "--quick", "--transient", "0.05"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for line in ("first run:", "retry run:", "rows recovered", "img/s", "peak RSS"):
        assert line in done.stdout
    assert "every id once: True" in done.stdout
    assert "every image once in the tars: True" in done.stdout
