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
    and 4 partitions; on S3 every request is counted: a first tick reads each partition with a
    few requests (its pointers and two listings), not a listing per file, and a tick with
    nothing new, its cursor holding every partition finished, lists three folders, whatever
    the number of partitions."""
    out = tmp_path / "scale.json"
    stdout = _benchmark("scale.py", "--quick", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["store"], r["parts"], r["sensor"], r["case"]) for r in rows}
    for store in ("folder", "s3 (moto)"):
        for parts in (2, 4):
            for case in ("first tick (no cursor)", "nothing new", "one new shard", "one new part"):
                assert (store, parts, "unlabeled_shards_sensor", case) in cases
            assert (store, parts, "coyo_parts_sensor", "one new part") in cases
    s3 = {
        (r["parts"], r["case"]): r
        for r in rows
        if r["store"] != "folder" and r["sensor"] == "unlabeled_shards_sensor"
    }
    for parts in (2, 4):
        first = s3[(parts, "first tick (no cursor)")]
        assert first["run_requests"] == 0
        assert 0 < first["requests"] <= 4 + 5 * parts, first  # 3 folders, a label set, 5 a part
        idle = s3[(parts, "nothing new")]
        assert (idle["run_requests"], idle["by_kind"]) == (0, {"LIST": 3}), idle
        assert s3[(parts, "one new shard")]["run_requests"] == 1
    assert any(line.startswith("target: unlabeled_shards_sensor") for line in stdout.splitlines())
    # with everything materialized, automation requests nothing, on a first tick or a next one,
    # and the partitions pages show every partition materialized
    instance = json.loads(out.read_text())["instance"]
    for parts in (2, 4):
        ticks = [r for r in instance if r["parts"] == parts and "run_requests" in r]
        assert [(r["case"], r["run_requests"]) for r in ticks] == [
            ("first tick (no cursor)", 0),
            ("next tick", 0),
        ]
        pages = {r["case"]: r for r in instance if r["parts"] == parts and "run_requests" not in r}
        assert sorted(pages) == ["coyo_labeled_300m", "labeled_shards"]
        assert all(r["partitions_materialized"] == parts for r in pages.values())
    coverage = json.loads(out.read_text())["coverage"]
    assert [r["store"] for r in coverage] == ["folder", "s3 (moto)"]
    assert coverage[1]["requests"] > 0


def test_scale_stages_benchmark_times_the_rollup_and_the_plan_at_each_size(tmp_path: Path):
    """``benchmarks/scale_stages.py --quick``: the roll-up and three plans at 2 and 4 partitions
    (and at twice the rows at 2), each in its own process with its seconds and peak memory; every
    plan agrees with the rules computed independently over every index, dedup finds duplicates
    across partitions, and a target size is met as closely as any threshold allows."""
    out = tmp_path / "stages.json"
    stdout = _benchmark("scale_stages.py", "--quick", "--json", str(out))
    figures = json.loads(out.read_text())
    rows = figures["rows_per_partition"]
    assert figures["machine"] and figures["parts"] == [2, 4] and rows == 500
    steps = {(r["step"], r["parts"], r["rows_per_partition"]): r for r in figures["steps"]}
    plans = ("plan_threshold", "plan_target_dedup", "plan_rows_cap")
    sizes = [(2, rows), (4, rows), (2, 2 * rows)]
    for step in ("rollup", "rollup_full_json", *plans):
        for parts, per in sizes if step != "rollup_full_json" else sizes[:2]:
            r = steps[(step, parts, per)]
            assert r["partitions"] == parts and r["rows"] == parts * per, r
            assert r["seconds"] > 0 and r["peak_mb"] > 0 and r["peak_mb"] >= r["before_mb"], r
            failed = {k: v for k, v in r["checks"].items() if k != "target_gap" and v is not True}
            assert not failed, (step, parts, per, r["checks"])
        assert "4/2" in figures["growth"][step]
    for parts, per in sizes:
        labeled = steps[("rollup", parts, per)]["images"]
        assert 0.9 * parts * per < labeled < parts * per  # ~3% of rows failed
        for step in plans:
            r = steps[(step, parts, per)]
            assert r["images_labeled"] == labeled and 0 < r["kept_rows"] <= r["images_eligible"]
        fixed = steps[("plan_threshold", parts, per)]
        assert fixed["threshold"] == 0.22 and fixed["images_eligible"] == labeled
        for step, share in (("plan_target_dedup", 0.4), ("plan_rows_cap", 0.3)):
            r = steps[(step, parts, per)]
            assert r["target_rows"] == round(share * labeled), r
            assert abs(r["kept_rows"] - r["target_rows"]) <= max(1, r["target_rows"] // 200), r
            assert r["duplicates_dropped"] > 0 and r["phash_ranges"] > 1, r
            assert r["images_eligible"] <= labeled - r["duplicates_dropped"], r
        assert steps[("plan_rows_cap", parts, per)]["classes_capped"] > 0
    assert steps[("plan_target_dedup", 4, rows)]["cross_partition_duplicates"] > 0
    for step in plans:
        assert figures["extrapolated"][step]["seconds_747m"] > 0
        assert figures["flat"][step]["peak"] > 0
    assert figures["target"]["limit"] == 1.25 and isinstance(figures["target"]["met"], bool)
    assert "scaled down: 500 rows a partition instead of 5.84M" in stdout
    assert "target: plan peak memory flat in rows (within 1.25x when rows double): " in stdout
    assert any(ln.startswith("# load average after: ") for ln in stdout.splitlines())


def test_wds_benchmark_prints_speed_the_copy_ratio_and_memory(tmp_path: Path):
    out = tmp_path / "figures.json"
    stdout = _benchmark(
        "wds.py", "--quick", "--workdir", str(tmp_path / "work"), "--json", str(out)
    )
    assert "machine: " in stdout and "load after" in stdout
    for rows in ("200 rows", "800 rows"):
        [line] = [ln for ln in stdout.splitlines() if ln.startswith(rows)]
        assert "samples/s" in line and "MB/s written" in line and "peak RSS" in line
        assert "rerun" in line and "(0 shards written)" in line
        assert "ratio copy s / wds s = " in line and "(target >= 0.5)" in line
    assert "peak RSS 800 rows / 200 rows = " in stdout and "(target <= 1.2: " in stdout
    figures = json.loads(out.read_text())
    for size in figures["sizes"].values():
        assert size["wds"]["samples"] > 0 and size["wds"]["written"] > 1
        assert size["rerun"]["written"] == 0 and size["copy"]["bytes"] > 0
    assert figures["rss_ratio"] > 0
