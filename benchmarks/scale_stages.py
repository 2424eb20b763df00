"""Scale rehearsal (issue 18), second part: the label-stats roll-up and the sampling plan over 16,
64 and 128 partitions.

    python benchmarks/scale_stages.py                            # 16, 64, 128 parts x 20,000 rows
    python benchmarks/scale_stages.py --parts 16,64 --rows 50000
    python benchmarks/scale_stages.py --quick --json out.json    # tiny sizes (the tests)

A full COYO-700M run is 128 partitions of about 5.84M rows (747M rows). **Scaled down:** each
partition here has ``--rows`` rows (default 20,000), so the whole rehearsal fits a few minutes on
2 cores. For each partition count it lays out a local storage root as the platform writes it:
per partition the labeled shards of one label set (``labeled_shards/<labeler>/<part>/
NNNNN.parquet`` in the label program's schema, 10,000 rows a shard, from ``benchmarks/stats.py``'s
generator: ids unique across partitions, ~1% of rows copying an earlier row's pHash, mostly in
another partition, so dedup has work across partitions), the set's ``_labeler.json`` and the
partition's ``_current`` pointer; then each partition's stats JSON and index, made one partition
at a time by the real ``stats.write.write_partition_stats`` (its seconds are printed too). The
16- and 64-partition roots are the first partitions of the 128 (the same files, hard-linked).

Then, in a fresh subprocess each, one after the other, so each peak is the step's own (the peak
resident set while the step runs, ``VmHWM`` reset just before it, and how far it rose above what
the process held before the step), for each partition count:

  rollup               ``stats.write.write_rollup``: every partition's stats JSON read and summed,
                       the roll-up JSON, its chart and the class-counts parquet
  rollup_full_json     the same on stats JSON of a full partition's shape: every class in every
                       threshold's counts and in the top-1 counts, every fine top-1 bin (as at
                       5.84M rows; its counts x 5.84M / rows, a missing entry as one image so
                       scaled: counts of a full partition's size). The roll-up reads only the JSON,
                       whose size stops growing with rows once every class and bin is present, so
                       this is the roll-up at full size, not an extrapolation
  plan_threshold       ``sample.plan.plan_and_write`` with the asset's defaults (threshold 0.22)
  plan_target_dedup    the same with ``target_fraction=0.4`` and ``dedup=True``
  plan_rows_cap        ``target_rows`` (30% of the labeled images), ``dedup`` and ``class_cap``
                       (10,000 images a class at full size, scaled with the rows)

The plan's memory bounds (``sample.rules.BUCKET_ROWS`` rows a pHash range in dedup,
``CAP_ROWS`` in class caps) are scaled with ``--rows`` (x rows / 5.84M) in the plan's processes,
so the plan makes as many passes as at full size and each holds the same share of the data; the
same scaled values are used at twice the rows, so that memory flat in rows means bounded. Each
plan's result is checked against the rules computed here over every index at once (dedup, caps,
the rows at the threshold, the target, and that no other threshold comes closer to it); a
mismatch exits 1.

The platform's ``labelspace.class_names()`` (the roll-up's class-counts table and every stats
chart call it) is measured once on its own in a fresh process and printed: it imported torch
(through timm) until this rehearsal found it, 4.8-9.1 s and 877 MB in every stats process.

It prints per step: partitions, rows, seconds, peak MB, MB above the process before the step,
seconds per million rows; the growth 16 -> 64 and 16 -> 128; ``write_partition_stats``'s seconds
a partition; the roll-up on full-shape JSON per partition; each plan's per-row cost at the
largest count extrapolated to 747M rows; and whether each step's memory stays flat when the rows
per partition double at the smallest count. Target (the issue gives none in numbers but "memory
shown flat"): the plan's peak within 1.25x when the rows double, judged on the peak and, since
the process's imports are most of the peak at these sizes, on the memory above them too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PART_ROWS = 5_840_000  # a COYO-700M part
COYO_ROWS = 747_000_000
SHARD_ROWS = 10_000  # img2dataset's shards
LABELER = "tf_efficientnetv2_xl-0123456789ab"
DEFAULT_ROWS = 20_000
TARGET_FRACTION = 0.40
TARGET_ROWS_SHARE = 0.30
CLASS_CAP_FULL = 10_000  # images a top-1 class, at full size
FLAT_TARGET = 1.25  # plan peak memory when the rows double
SEED = 0
STEPS = ("rollup", "rollup_full_json", "plan_threshold", "plan_target_dedup", "plan_rows_cap")
PLAN_STEPS = tuple(s for s in STEPS if s.startswith("plan"))


# ---- memory, in the child itself -------------------------------------------------------------


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class Measured:
    """Seconds, peak RSS (VmHWM) and the RSS before, around one step of a child process."""

    def __enter__(self) -> Measured:
        self.reset = _reset_peak()
        self.before_mb = _status_mb("VmRSS")
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak_mb = _status_mb("VmHWM")

    def figures(self) -> dict:
        return {
            "seconds": self.seconds,
            "peak_mb": self.peak_mb,
            "before_mb": self.before_mb,
            "above_mb": max(0.0, self.peak_mb - self.before_mb),
            "peak_reset": self.reset,
        }


# ---- the children ----------------------------------------------------------------------------


def _label_generator():
    """``benchmarks/stats.py``: its synthetic label files in the label program's schema."""
    spec = importlib.util.spec_from_file_location(
        "coyo_benchmark_stats", Path(__file__).with_name("stats.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def class_names_cost() -> dict:
    """What the platform's ``class_names()`` costs a fresh process (the roll-up, a partition's
    stats and its chart call it): it reads timm's label files without importing timm (which
    imports torch: 4.8-9.1 s and 877 MB here before that was fixed)."""
    from coyo_platform.common import labelspace

    before = _status_mb("VmRSS")
    with Measured() as m:
        names = labelspace.class_names()
    return m.figures() | {
        "imports_torch": "torch" in sys.modules,
        "rss_before_mb": before,
        "names": len(names),
    }


def scaled(value: int, rows: int) -> int:
    """A full-size count scaled to ``rows`` rows a partition."""
    return max(1, round(value * rows / PART_ROWS))


def prepare(work: Path, root: Path, parts: int, rows: int, shard_rows: int, full_json: Path | None):
    """Labels for ``parts`` partitions of ``rows`` rows under the storage ``root``, their stats
    by ``write_partition_stats`` one partition at a time; with ``full_json``, a copy of the stats
    JSON in a full partition's shape there (indexes linked)."""
    import pyarrow.parquet as pq

    from coyo_platform.common import layout, shards
    from coyo_platform.common.labelspace import NUM_CLASSES
    from coyo_platform.common.storage import Storage
    from coyo_platform.stats.aggregate import FINE_BINS, StatsSettings
    from coyo_platform.stats.write import write_partition_stats

    generator = _label_generator()
    start = time.perf_counter()
    data = generator.ensure_data(work / "generated", parts, rows, shard_rows, SEED)
    generated = time.perf_counter() - start
    store = Storage(str(root))
    sets = Storage(layout.label_sets(store))
    sets.write_json(
        layout.labeler_record(sets.root, LABELER), {"labeler": LABELER, "weights_sha256": "0" * 64}
    )
    keys = [f"part-{p:05d}" for p in range(parts)]
    for key in keys:
        for f in sorted((data / key).glob("*.parquet")):
            _link(f, Path(layout.labels(store, key, LABELER)) / f.name)
        shards.set_current_labels(sets, key, {"labeler": LABELER})
    from coyo_platform.stats import aggregate

    # each index in as many row groups as a full partition's (DuckDB writes at least 2,048 rows
    # a group): dedup's pHash ranges read only the row groups they overlap
    aggregate.INDEX_ROW_GROUP = scaled(aggregate.INDEX_ROW_GROUP, rows)
    settings = StatsSettings()
    seconds, images = [], []
    with Measured() as m:
        for key in keys:
            t = time.perf_counter()
            written = write_partition_stats(store, key, settings)
            seconds.append(time.perf_counter() - t)
            images.append(written.aggregate.images)
    out = {
        "rows": parts * rows,
        "images_per_partition": images,
        "generate_seconds": generated,
        "stats_seconds": seconds,
        "stats_peak_mb": m.peak_mb,
        "stats_above_mb": m.figures()["above_mb"],
        "json_bytes": [os.path.getsize(layout.stats(store, k)) for k in keys],
        "index_bytes": [os.path.getsize(layout.index(store, k)) for k in keys],
        "index_row_groups": pq.ParquetFile(layout.index(store, keys[0])).metadata.num_row_groups,
        "json_entries": [],
    }
    for key in keys:
        value = store.read_json(layout.stats(store, key))
        out["json_entries"].append(_entries(value))
        if full_json is None:
            continue
        for t in value["thresholds"]:
            _fill(t["class_counts"], NUM_CLASSES, rows)
        _fill(value["top1_counts"], NUM_CLASSES, rows)
        _fill(value["top1_fine"], FINE_BINS, rows)
        full = Storage(str(full_json))
        full.write_json(layout.stats(full, key), value, compact=True)
        _link(Path(layout.index(store, key)), Path(layout.index(full, key)))
    if full_json is not None:
        full = Storage(str(full_json))
        out["full_json_bytes"] = os.path.getsize(layout.stats(full, keys[0]))
        out["full_json_entries"] = _entries(full.read_json(layout.stats(full, keys[0])))
    return out


def _entries(value: dict) -> int:
    """Count entries of a stats JSON: the per-class, per-bin and per-count dicts."""
    n = len(value["top1_counts"]) + len(value["top1_fine"])
    return n + sum(len(t["class_counts"]) + len(t["labels_per_image"]) for t in value["thresholds"])


def _fill(counts: dict, n: int, rows: int) -> None:
    """Every key ``0 .. n-1``, each count as a full partition's (ints of their own, not the
    small ones Python shares)."""
    scale = max(1, round(PART_ROWS / rows))
    for i in range(n):
        counts[str(i)] = counts.get(str(i), 1) * scale


def sampling_for(step: str, rows: int, images: int):
    """The plan step's ``Sampling``, as the asset's config would give it."""
    from coyo_platform.sample.rules import Sampling

    if step == "plan_threshold":
        return Sampling()
    if step == "plan_target_dedup":
        return Sampling(target_fraction=TARGET_FRACTION, dedup=True)
    return Sampling(
        target_rows=max(1, round(TARGET_ROWS_SHARE * images)),
        dedup=True,
        class_cap=scaled(CLASS_CAP_FULL, rows),
    )


def run_step(step: str, root: Path, rows: int, images: int, limits_rows: int) -> dict:
    from coyo_platform.common import layout
    from coyo_platform.common.storage import Storage

    store = Storage(str(root))
    keys = layout.partitions_with_stats(store)
    out: dict = {"partitions": len(keys)}
    if step.startswith("rollup"):
        from coyo_platform.stats.write import write_rollup

        with Measured() as m:
            written, _ = write_rollup(store)
        out |= m.figures()
        out["images"] = written.aggregate.images
        out["checks"] = {"images": written.aggregate.images == images}
        out["json_bytes_read"] = sum(os.path.getsize(layout.stats(store, k)) for k in keys)
        return out

    import polars as pl

    from coyo_platform.sample import rules
    from coyo_platform.sample.plan import plan_and_write

    rules.BUCKET_ROWS = scaled(rules.BUCKET_ROWS, limits_rows)  # as many passes as at full size
    rules.CAP_ROWS = scaled(rules.CAP_ROWS, limits_rows)
    sampling = sampling_for(step, rows, images)
    logs: list[str] = []
    with Measured() as m:
        plan, _ = plan_and_write(store, sampling, log=logs.append)
    out |= m.figures()
    ranges = [re.search(r"\((\d+) pHash range", line) for line in logs]
    dup_files = store.glob(plan.duplicates_glob) if plan.duplicates_glob else []
    out |= {
        "sampling": {k: v for k, v in vars(sampling).items() if v not in (None, False)},
        "bucket_rows": rules.BUCKET_ROWS,
        "cap_rows": rules.CAP_ROWS,
        "phash_ranges": next((int(m[1]) for m in ranges if m), 0),
        "threshold": plan.threshold,
        "target_rows": plan.target_rows,
        "kept_rows": plan.rows,
        "images_labeled": plan.images_labeled,
        "images_eligible": plan.images_eligible,
        "duplicates_dropped": plan.duplicates_dropped,
        "classes_capped": plan.classes_capped,
        "log": logs,
    }
    if dup_files:  # how many duplicates lost to a row of another partition (ids: part * rows + i)
        dups = pl.read_parquet(dup_files)
        out["cross_partition_duplicates"] = int(
            (dups["id"] // rows != dups["kept_id"] // rows).sum()
        )
    out["checks"] = check_plan(store, keys, sampling, plan)
    return out


def check_plan(store, keys, sampling, plan) -> dict:  # noqa: ANN001
    """The plan against the rules computed here over every index at once (small sizes only)."""
    import numpy as np
    import polars as pl

    from coyo_platform.common import layout

    rows = pl.concat([pl.read_parquet(layout.index(store, k)) for k in keys])
    checks = {"images": rows.height == plan.images_labeled}
    eligible = rows
    if sampling.dedup:  # one row per pHash: the highest top-1, then the smallest id
        eligible = eligible.sort(["phash", "top1", "id"], descending=[False, True, False])
        eligible = eligible.filter(pl.col("phash").is_null() | pl.col("phash").is_first_distinct())
        checks["duplicates"] = rows.height - eligible.height == plan.duplicates_dropped
    if sampling.class_cap is not None:
        eligible = eligible.sort(["top1", "id"], descending=[True, False]).filter(
            pl.int_range(pl.len()).over("top1_class") < sampling.class_cap
        )
    checks["eligible"] = eligible.height == plan.images_eligible
    top1 = eligible["top1"].cast(pl.Float64).to_numpy()
    checks["kept_rows"] = int((top1 >= plan.threshold).sum()) == plan.rows
    if plan.target_rows is not None:
        target = sampling.target_rows or max(1, round(sampling.target_fraction * rows.height))
        checks["target"] = plan.target_rows == target
        values = np.sort(eligible["top1"].to_numpy())[::-1].astype(np.float64)
        distinct, first = np.unique(-values, return_index=True)  # descending values
        sizes = np.append(first[1:], len(values))  # rows >= each distinct value
        best = int(np.abs(sizes - target).min()) if len(sizes) else target
        checks["target_closest"] = abs(plan.rows - target) == best
        checks["target_gap"] = plan.rows - target  # a figure, not a check
    return checks


def child(args) -> None:  # noqa: ANN001
    if args.child == "class_names":
        out = class_names_cost()
    elif args.child == "prepare":
        full = Path(args.full_json) if args.full_json else None
        out = prepare(Path(args.work), Path(args.root), args.n, args.rows, args.shard_rows, full)
    else:
        out = run_step(args.child, Path(args.root), args.rows, args.images, args.limits_rows)
    print(json.dumps(out))


# ---- the parent (standard library only) -------------------------------------------------------


def _run_child(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *args], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _subset_root(source: Path, dest: Path, parts: int) -> Path:
    """A storage root holding the stats JSON and index of the first ``parts`` partitions."""
    for p in range(parts):
        for suffix in (".json", ".index.parquet"):
            name = f"part-{p:05d}{suffix}"
            _link(source / "label_stats" / name, dest / "label_stats" / name)
    return dest


def measure(sizes: list[int], rows: int, shard_rows: int, work: Path, log=print) -> dict:  # noqa: ANN001
    """Every figure: the stats made for ``max(sizes)`` partitions at ``rows`` rows and for
    ``min(sizes)`` at twice that, then every step at every size (and at twice the rows at the
    smallest)."""
    names = _run_child("--child", "class_names")
    log(f"# the platform's class_names() in a fresh process: {names['seconds']:.2f} s, "
        f"+{names['above_mb']:,.0f} MB (imports torch: {names['imports_torch']})")  # fmt: skip
    prepared = {}
    for n, r in ((max(sizes), rows), (min(sizes), 2 * rows)):
        log(f"# preparing {n} partitions x {r:,} rows (labels, then write_partition_stats) ...")
        root = work / f"labels-{r}"
        extra = ["--full-json", str(work / f"full-json-{r}")] if r == rows else []
        prepared[r] = _run_child(
            "--child", "prepare", "--work", str(work), "--root", str(root), "--n", str(n),
            "--rows", str(r), "--shard-rows", str(shard_rows), *extra,
        )  # fmt: skip
        prepared[r]["root"] = str(root)
        s = prepared[r]["stats_seconds"]
        log(f"#   generated in {prepared[r]['generate_seconds']:.1f} s; write_partition_stats "
            f"{sum(s) / len(s):.2f} s a partition (min {min(s):.2f}, max {max(s):.2f}), peak "
            f"{prepared[r]['stats_peak_mb']:,.0f} MB; stats JSON "
            f"{sum(prepared[r]['json_bytes']) / len(s) / 1e3:,.0f} kB a partition")  # fmt: skip
    results = []
    log(HEADER)
    runs = [(p, rows) for p in sizes] + [(min(sizes), 2 * rows)]
    for parts, r in runs:
        images = sum(prepared[r]["images_per_partition"][:parts])
        for step in STEPS:
            if step == "rollup_full_json" and r != rows:
                continue
            source = work / (f"full-json-{r}" if step == "rollup_full_json" else f"labels-{r}")
            root = work / f"{step}-{parts}-{r}"
            shutil.rmtree(root, ignore_errors=True)
            _subset_root(source, root, parts)
            got = _run_child(
                "--child", step, "--root", str(root), "--rows", str(r),
                "--images", str(images), "--limits-rows", str(rows),
            )  # fmt: skip
            shutil.rmtree(root, ignore_errors=True)
            got |= {"step": step, "parts": parts, "rows_per_partition": r, "rows": parts * r}
            got["seconds_per_million_rows"] = got["seconds"] / (parts * r / 1e6)
            results.append(got)
            log(_line(got))
            failed = [k for k, v in got["checks"].items() if v is False]
            if failed:
                sys.exit(f"MISMATCH: {step} at {parts} partitions: {failed}: {got['checks']}")
    return {"class_names": names, "prepared": prepared, "steps": results}


HEADER = (f"{'step':18s} {'parts':>5s} {'rows':>11s} {'seconds':>8s} {'peak MB':>8s} "
          f"{'+MB':>6s} {'s/M rows':>9s}")  # fmt: skip


def _line(r: dict) -> str:
    return (f"{r['step']:18s} {r['parts']:5d} {r['rows']:11,d} {r['seconds']:8.2f} "
            f"{r['peak_mb']:8,.0f} {r['above_mb']:6,.0f} "
            f"{r['seconds_per_million_rows']:9.2f}")  # fmt: skip


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def flat_text(x: float) -> str:
    return "flat" if x <= 1.05 else f"grows x{x:.2f}"


def report(figures: dict, sizes: list[int], rows: int, log=print) -> dict:  # noqa: ANN001
    """Growth with partitions, the plan per row extrapolated to 747M rows, memory against rows;
    returns those figures."""
    by = {(r["step"], r["parts"], r["rows_per_partition"]): r for r in figures["steps"]}
    lo, hi = min(sizes), max(sizes)
    out: dict = {"growth": {}, "extrapolated": {}, "flat": {}}
    log(f"\ngrowth from {lo} partitions (rows grow with the partitions):")
    for step in STEPS:
        base = by[(step, lo, rows)]
        growth = {}
        for p in sizes:
            if p == lo:
                continue
            r = by[(step, p, rows)]
            growth[f"{p}/{lo}"] = {
                "seconds": ratio(r["seconds"], base["seconds"]),
                "peak_mb": ratio(r["peak_mb"], base["peak_mb"]),
                "above_mb": ratio(r["above_mb"], base["above_mb"]),
            }
        out["growth"][step] = growth
        text = "; ".join(
            f"{k} ({int(k.split('/')[0]) // lo}x the partitions): seconds x{g['seconds']:.2f}, "
            f"peak x{g['peak_mb']:.2f}, +MB x{g['above_mb']:.2f}"
            for k, g in growth.items()
        )
        log(f"  {step:18s} {text}")

    prep = figures["prepared"]
    small, large = prep[rows], prep[2 * rows]
    mean = [sum(p["stats_seconds"]) / len(p["stats_seconds"]) for p in (small, large)]
    out["extrapolated"]["stats"] = {
        "seconds_per_partition": mean,
        "peak_mb": [small["stats_peak_mb"], large["stats_peak_mb"]],
    }
    log(f"\nwrite_partition_stats, one partition at a time: {mean[0]:.2f} s a partition at "
        f"{rows:,} rows, {mean[1]:.2f} s at {2 * rows:,}, peak {small['stats_peak_mb']:,.0f} -> "
        f"{large['stats_peak_mb']:,.0f} MB (at these sizes mostly its fixed costs: DuckDB, the "
        "index file, the chart; benchmarks/stats.py measures its rate per row)")  # fmt: skip
    kb = [sum(p["json_bytes"]) / len(p["json_bytes"]) / 1e3 for p in (small, large)]
    entries = [sum(p["json_entries"]) / len(p["json_entries"]) for p in (small, large)]
    full, first = by[("rollup_full_json", hi, rows)], by[("rollup_full_json", lo, rows)]
    span = hi - lo if hi > lo else hi  # per partition: the slope, or (one size) the mean
    base = first if hi > lo else {"seconds": 0.0, "above_mb": 0.0}
    per_part = {k: (full[k] - base[k]) / span for k in ("seconds", "above_mb")}
    at_128 = {k: full[k] + per_part[k] * (128 - hi) for k in ("seconds", "above_mb")}
    out["extrapolated"]["rollup"] = {
        "json_kb_per_partition": kb, "json_entries_per_partition": entries,
        "full_json_kb": small["full_json_bytes"] / 1e3,
        "full_json_entries": small["full_json_entries"],
        "per_partition": per_part, "at_128_partitions": at_128,
    }  # fmt: skip
    log(f"\nthe roll-up scales with partitions x the stats JSON's size, not with rows: JSON "
        f"{kb[0]:,.0f} kB ({entries[0]:,.0f} entries) a partition at {rows:,} rows, "
        f"{kb[1]:,.0f} kB ({entries[1]:,.0f}) at {2 * rows:,}, "
        f"{small['full_json_bytes'] / 1e3:,.0f} kB ({small['full_json_entries']:,}) in a full "
        "partition's shape (every class and bin, "
        f"its size at 5.84M rows); on full-shape JSON, {per_part['seconds']:.3f} s and "
        f"{per_part['above_mb']:,.1f} MB more per partition: at 128 partitions "
        f"{at_128['seconds']:.1f} s, {at_128['above_mb']:,.0f} MB above the process "
        f"({'measured' if hi == 128 else 'extrapolated'})")  # fmt: skip

    log(f"\nthe plan: seconds per 1M rows at {', '.join(map(str, sizes))} partitions, and x "
        f"seconds when the rows a partition double at {lo}:")  # fmt: skip
    for step in PLAN_STEPS:
        per = ", ".join(f"{by[(step, p, rows)]['seconds_per_million_rows']:.2f}" for p in sizes)
        doubled = by[(step, lo, 2 * rows)]["seconds"] / by[(step, lo, rows)]["seconds"]
        log(f"  {step:18s} {per}; x{doubled:.2f}")
    groups = small.get("index_row_groups", 1)
    full_groups = -(-PART_ROWS // 122_880)  # DuckDB's default row group, the platform's
    log(f"its per-row cost at {hi} partitions x {rows:,} rows, extrapolated to {COYO_ROWS:,} rows "
        "on this machine (all of it scaled with rows, the files opened included, whose number "
        f"stays as here at full size; an index here has {groups} row groups of at least 2,048 "
        f"rows, DuckDB's least, where a full one has {full_groups}, so that a pHash range reads "
        "a larger share of each index here: on the high side):")  # fmt: skip
    for step in PLAN_STEPS:
        r = by[(step, hi, rows)]
        seconds = r["seconds_per_million_rows"] * COYO_ROWS / 1e6
        out["extrapolated"][step] = {"seconds_747m": seconds}
        if r["sampling"].get("dedup"):
            cross = r.get("cross_partition_duplicates", 0)
            how = (f"{r['phash_ranges']} pHash ranges of {r['bucket_rows']:,} rows, "
                   f"{r['duplicates_dropped']:,} duplicates dropped ({cross:,} to another "
                   "partition)")  # fmt: skip
        else:
            how = "no dedup"
        if r["sampling"].get("class_cap"):
            how += (f", cap {r['sampling']['class_cap']:,}: {r['classes_capped']:,} classes "
                    "capped, in two passes over every index")  # fmt: skip
        target = f", target {r['target_rows']:,}" if r["target_rows"] else ""
        log(f"  {step:18s} {r['seconds_per_million_rows']:8.2f} s per 1M rows -> "
            f"{seconds / 60:8.1f} min ({how}; kept {r['kept_rows']:,} of "
            f"{r['images_labeled']:,}{target} at threshold {r['threshold']:.6g})")  # fmt: skip

    log(
        f"\nmemory against rows: {lo} partitions at {rows:,} and {2 * rows:,} rows a partition "
        "(the plan's range sizes fixed):"
    )
    worst = worst_above = 0.0
    for step in STEPS:
        if step == "rollup_full_json":
            continue
        a, b = by[(step, lo, rows)], by[(step, lo, 2 * rows)]
        peak, above = ratio(b["peak_mb"], a["peak_mb"]), ratio(b["above_mb"], a["above_mb"])
        out["flat"][step] = {"peak": peak, "above": above, "seconds": b["seconds"] / a["seconds"]}
        if step in PLAN_STEPS:
            worst, worst_above = max(worst, peak), max(worst_above, above)
        log(f"  {step:18s} peak {a['peak_mb']:,.0f} -> {b['peak_mb']:,.0f} MB: {flat_text(peak)}"
            f"; above the process {a['above_mb']:,.0f} -> {b['above_mb']:,.0f} MB: "
            f"{flat_text(above)}; seconds x{b['seconds'] / a['seconds']:.2f}")  # fmt: skip
    met, met_above = worst <= FLAT_TARGET, worst_above <= FLAT_TARGET
    out["target"] = {"plan_peak_flat": worst, "plan_above_flat": worst_above,
                     "limit": FLAT_TARGET, "met": met, "met_above": met_above}  # fmt: skip
    log(f"target: plan peak memory flat in rows (within {FLAT_TARGET:g}x when rows double): "
        f"worst x{worst:.2f} ({'met' if met else 'missed'}); the same on the memory above the "
        f"process before the plan (the imports, ~{by[(PLAN_STEPS[0], lo, rows)]['before_mb']:,.0f}"
        f" MB, are most of the peak at these sizes): worst x{worst_above:.2f} "
        f"({'met' if met_above else 'missed'})")  # fmt: skip
    return out


def rehearse(
    sizes: list[int], rows: int, shard_rows: int = SHARD_ROWS, json_path: str | None = None,
    workdir: str | None = None,
) -> dict:  # fmt: skip
    """The whole rehearsal, printed; its figures returned (and written to ``json_path``)."""
    from coyo_platform.common.machine import cpu_model

    def load() -> str:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())

    sizes = sorted(set(sizes))
    before = load()
    print(f"# {cpu_model()}; load average before: {before}")
    print(f"# scaled down: {rows:,} rows a partition instead of {PART_ROWS / 1e6:.2f}M "
          f"({shard_rows:,}-row shards); partitions {', '.join(map(str, sizes))}; the plan's "
          f"BUCKET_ROWS and CAP_ROWS x {rows:,} / {PART_ROWS:,}", flush=True)  # fmt: skip
    print("# each step in a fresh process: seconds, the step alone (not its imports); peak MB, "
          "its process's peak RSS during the step; +MB, above its RSS before the step")  # fmt: skip
    work = Path(workdir or tempfile.mkdtemp(prefix="coyo-scale-stages-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures = measure(sizes, rows, shard_rows, work, log=lambda s: print(s, flush=True))
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)
    summary = report(figures, sizes, rows)
    after = load()
    print(f"# load average after: {after}")
    figures = {"machine": cpu_model(), "load_before": before, "load_after": after,
               "parts": sizes, "rows_per_partition": rows, "shard_rows": shard_rows,
               "full_rows_per_partition": PART_ROWS, **figures, **summary}  # fmt: skip
    figures["prepared"] = {str(k): v for k, v in figures["prepared"].items()}
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=1))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="16,64,128", help="partition counts, comma-separated")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows per partition")
    parser.add_argument("--shard-rows", type=int, default=SHARD_ROWS, help="rows per label file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the tests)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--workdir", help="keep the generated files here (default: a temp dir)")
    children = ("class_names", "prepare", *STEPS)
    parser.add_argument("--child", choices=children, help=argparse.SUPPRESS)
    for hidden in ("--work", "--root", "--full-json"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    for hidden in ("--n", "--images", "--limits-rows"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sizes = [int(p) for p in args.parts.split(",")]
    rows, shard_rows = args.rows, args.shard_rows
    if args.quick:
        sizes, rows, shard_rows = [2, 4], 500, 250
    rehearse(sizes, rows, shard_rows, args.json, args.workdir)


if __name__ == "__main__":
    main()
