"""The benchmarks run and print every figure they promise (tiny sizes here; real sizes and the
results are in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _benchmark(script: str, *args: str) -> str:
    """``benchmarks/<script> *args`` from the repository root; its stdout (it must succeed)."""
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_label_benchmark_prints_all_three_rates_and_ratios(tmp_path: Path):
    out = tmp_path / "figures.json"
    stdout = _benchmark(
        "label.py",
        *("--model", "test_efficientnet", "--images", "48", "--shard-size", "12"),
        *("--batch-size", "8", "--ceiling-seconds", "0.5"),
        *("--workdir", str(tmp_path / "work"), "--json", str(out)),
    )
    for line in ("(a) model alone", "(b) label program end to end", "(c) timm inference.py style"):
        assert line in stdout
    assert "target b/c >= 1.3" in stdout and "b/a = " in stdout
    assert "(d) loader CPU per image: coyo preset, 512 px path" in stdout
    assert "(target <= 2.5 ms per core" in stdout
    figures = json.loads(out.read_text())
    assert figures["b_images_labeled"] == 48
    assert figures["d_loader_cpu_ms_per_image_coyo_512"] > 0
    assert figures["outputs"] == 21_843
    for key in ("a_model_alone", "b_label_program", "c_baseline", "b/a", "b/c", "peak_rss_mb_all"):
        assert figures[key] > 0


def test_stats_benchmark_prints_both_engines_the_ratio_and_agreement(tmp_path: Path):
    out = _benchmark("stats.py", "--quick", "--workdir", str(tmp_path))
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


def _ratio_line(lines: list[str], target: str) -> str:
    """The benchmark's last line: the ratio, its target and met/missed (any value)."""
    shape = re.compile(
        r"ours / img2dataset \(images per second\): \d+\.\d\d "
        rf"\(target >= {re.escape(target)}: (met|missed)\)"
    )
    assert shape.fullmatch(lines[-1]), lines[-1]
    return lines[-1]


def _download_benchmark(tmp_path: Path, *args: str) -> tuple[list[str], dict, dict[str, str]]:
    """``benchmarks/download.py *args --json``: its lines, its figures, each engine's line."""
    out = tmp_path / "figures.json"
    lines = _benchmark("download.py", *args, "--json", str(out)).splitlines()
    engines = {}
    for engine in ("img2dataset", "ours"):
        [engines[engine]] = [ln for ln in lines if ln.split()[:1] == [engine] and "img/s " in ln]
    return lines, json.loads(out.read_text()), engines


def test_download_benchmark_prints_both_engines_and_the_ratio(tmp_path: Path):
    lines, figures, engines = _download_benchmark(tmp_path, "--quick")
    for engine, line in engines.items():  # CPU per image: the engine's processes over its rows
        result = figures["engines"][engine]
        ms = 1000 * result["cpu_seconds"] / result["rows"]
        assert "peak RSS" in line and f"CPU {ms:5.1f} ms/img" in line, line
    _ratio_line(lines, "0.95")
    assert any(ln.startswith("# load average before: ") for ln in lines)
    assert any(ln.startswith("# load average after: ") for ln in lines)
    assert figures["target"] == 0.95 and figures["ratio_images_per_second"] > 0
    assert all(figures["engines"][e]["success"] == 40 for e in ("img2dataset", "ours"))


def test_download_web_benchmark_reaches_tls_hosts_and_times_out_stalled_ones(tmp_path: Path):
    """``--web --quick``: 150 rows over 64 loopback hosts (16 over TLS, verified against the
    benchmark's throwaway CA; 3 that never answer). Both engines report, both download over TLS,
    both time out on every stalled row, and both succeed on the same rows."""
    lines, figures, engines = _download_benchmark(tmp_path, "--web", "--quick")
    for line in engines.values():
        for part in ("images", "timeouts", "other failures", "peak RSS"):
            assert part in line, line
    _ratio_line(lines, "1.2")
    assert sum(ln.startswith("  server side: ") and "connections" in ln for ln in lines) == 2
    assert any(ln.startswith("# machine: ") and "load average before: " in ln for ln in lines)
    assert any(ln.startswith("# load average after: ") for ln in lines)
    [check] = [ln for ln in lines if ln.startswith("# TLS check on ")]
    assert "without our CA: refused:" in check and "CERTIFICATE_VERIFY_FAILED" in check
    assert "verified TLSv1.3" in check
    [tls] = [ln for ln in lines if ln.startswith("TLS rows: ")]
    hit = re.fullmatch(r"TLS rows: (\d+); succeeded: img2dataset (\d+), ours (\d+) .*", tls)
    assert hit, tls
    assert int(hit[1]) > 0 and int(hit[2]) > 0 and int(hit[3]) > 0, tls
    [stalls] = [ln for ln in lines if ln.startswith("stalled rows: ")]
    hit = re.fullmatch(
        r"stalled rows: (\d+); timed out: img2dataset (\d+), ours (\d+); "
        r"succeeded: img2dataset 0, ours 0",
        stalls,
    )
    assert hit, stalls
    assert int(hit[1]) > 0 and hit[1] == hit[2] == hit[3], stalls
    assert any(ln.startswith("same successful rows for both engines: yes") for ln in lines)
    assert figures["rows"] == 150 and figures["target"] == 1.2
    assert figures["same_successful_rows"] is True
    for engine in ("img2dataset", "ours"):
        assert figures["tls_successes"][engine] > 0
        assert figures["stalled_timeouts"][engine] == figures["stalled_rows"] > 0
        assert figures["engines"][engine]["images_per_second"] > 0


def test_download_soak_prints_its_figures_and_loses_nothing():
    """The soak in small: hostile rows, transient ones and an outage; every id once."""
    out = _benchmark("download.py", "--soak", "--quick", "--transient", "0.05")
    for line in ("first run:", "retry run:", "rows recovered", "img/s", "peak RSS"):
        assert line in out
    assert "every id once: True" in out
    assert "every image once in the tars: True" in out


def test_scale_benchmark_times_each_sensor_tick_and_counts_s3_requests(tmp_path: Path):
    """``benchmarks/scale.py --quick``: both sensors' ticks on a folder and on moto's S3 at 2
    and 4 partitions; on S3 every request is counted, and a tick with nothing new reads each
    partition with a few requests (its pointers and two listings), not a listing per file."""
    out = tmp_path / "scale.json"
    stdout = _benchmark("scale.py", "--quick", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["store"], r["parts"], r["sensor"], r["case"]) for r in rows}
    for store in ("folder", "s3 (moto)"):
        for parts in (2, 4):
            for case in ("nothing new", "one new shard", "one new part"):
                assert (store, parts, "unlabeled_shards_sensor", case) in cases
            assert (store, parts, "coyo_parts_sensor", "one new part") in cases
    s3 = {(r["parts"], r["case"]): r for r in rows if r["store"] != "folder"}
    for parts in (2, 4):
        idle = s3[(parts, "nothing new")]
        assert idle["run_requests"] == 0
        assert 0 < idle["requests"] <= 2 + 5 * parts, idle  # the root, a label set, 5 a part
        assert s3[(parts, "one new shard")]["run_requests"] == 1
    assert any(line.startswith("target: unlabeled_shards_sensor") for line in stdout.splitlines())
