"""How fast label statistics and the target-size threshold are, against the same queries in DuckDB.

    python benchmarks/stats.py                      # 5M, 10M, 20M rows (generates ~8 GB once)
    python benchmarks/stats.py --rows 5e6 --engines ours
    python benchmarks/stats.py --quick --workdir /tmp/x   # tiny sizes, for the tests

It writes synthetic labeled shards shaped like the label program's output (``LABELED_SCHEMA``,
written with its ``LABELED_FILE_OPTIONS``): parts of ``--part-rows`` rows as img2dataset-style
shard files of ``--shard-rows`` rows (``<data>/part-XXXXX/NNNNN.parquet``), 50 labels and float32
probabilities per row sorted descending, a top-1 probability whose share above 0.05..0.25 is the
card's share-kept column, a Zipf-like top-1 class, ~2% of rows sharing a pHash, ~3% failed rows
(error set, no hash, no labels, as the label program writes them). The data is generated once per
parameter set under ``--workdir`` and reused.

Then, for each size (the first 1, 2, 4 ... parts), in a fresh subprocess per engine, one after the
other, so each peak RSS is that engine's own:

  ours:   per part ``stats.aggregate.aggregate_files`` (the label_stats asset's call: DuckDB
          reading and counting a chunk of files at a time, the index written as parquet) and its
          JSON; ``merge_aggregates``, ``stats.report.threshold_rows``; the exact
          threshold for a target of 40% of labeled images with ``sample.rules.threshold_for_target``
          reading the fine histogram's bin from the index files (``sample.plan``'s own filter);
  duckdb: the same outputs in SQL: one scan into a compact temp table (top-1, top-1 class and the
          (label, prob) pairs above the lowest threshold), then the threshold table, per-class
          counts per threshold, labels-per-image, top-1 classes, the 20-bin histogram and the
          k-th largest top-1 with the same closest-size rule; with ``preserve_insertion_order``
          off (its faster mode, as ours runs it).

Both must agree exactly (every count, the threshold and its size), else it prints MISMATCH and
exits 1. It prints rows/s, peak RSS, the ratio duckdb seconds / ours seconds (>= 1: ours is at
least as fast), whether ours' memory stays flat as rows grow, and the figures extrapolated to
COYO-700M's 747M rows.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_WORKDIR = "/tmp/coyo-stats-bench"
GENERATOR_VERSION = 1
NUM_CLASSES = 21_841  # coyo_platform.common.labelspace.NUM_CLASSES (not imported: DuckDB's child)
CARD_THRESHOLDS = (0.05, 0.10, 0.15, 0.20, 0.25)  # stats.aggregate's (checked in ours)
#: P(top-1 >= t) on the card (kakaobrain/coyo-dataset, COYO-Labeled-300M: share kept).
SHARE_KEPT = ((0.0, 1.0), (0.05, 0.967), (0.10, 0.858), (0.15, 0.745), (0.20, 0.643),
              (0.25, 0.556), (1.0, 0.0))  # fmt: skip
TOP_K = 50
FAILED_SHARE = 0.03
#: Share of rows that copy an earlier row's pHash: about twice as many rows share one.
DUP_SHARE = 0.01
TARGET_FRACTION = 0.40
COYO_ROWS = 747_000_000
TARGETS = {"ratio": 1.0, "peak_mb": 2048.0, "flat": 1.2}
FAILED_ERROR = (
    "decode: UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x7f3c2>"
)


# ---- synthetic labeled shards ----------------------------------------------------------------


def _splitmix64(x):
    import numpy as np

    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _fixed_strings(chars, valid=None):
    """A pyarrow string array from an (n, width) uint8 array of ASCII codes."""
    import numpy as np
    import pyarrow as pa

    n, width = chars.shape
    offsets = np.arange(0, n * width + 1, width, dtype=np.int32)
    bitmap = None if valid is None else pa.py_buffer(np.packbits(valid, bitorder="little"))
    nulls = 0 if valid is None else int(n - valid.sum())
    return pa.Array.from_buffers(
        pa.string(),
        n,
        [bitmap, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars))],
        null_count=nulls,
    )


def _class_sampler(seed: int):
    """Top-1 classes: Zipf-like over a fixed random order of the classes."""
    import numpy as np

    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(NUM_CLASSES).astype(np.int32)
    weights = 1.0 / (np.arange(NUM_CLASSES) + 3.0) ** 1.05
    cdf = np.cumsum(weights / weights.sum())
    return order, cdf


def shard_table(
    seed: int, part: int, shard: int, rows: int, part_rows: int, shard_rows: int, sampler
):
    """One shard's rows in ``LABELED_SCHEMA``, deterministic in (seed, part, shard)."""
    import numpy as np
    import pyarrow as pa

    from coyo_platform.common.formats import LABELED_SCHEMA

    rng = np.random.default_rng([seed, part, shard])
    first = part * part_rows + shard * shard_rows
    gidx = np.arange(first, first + rows, dtype=np.int64)
    ok = rng.random(rows) >= FAILED_SHARE
    m = int(ok.sum())

    # pHash: a hash of the row's own index, or (DUP_SHARE of rows) of an earlier row's index
    src = gidx.copy()
    dup = (rng.random(rows) < DUP_SHARE) & (gidx > 0)
    src[dup] = (rng.random(int(dup.sum())) * gidx[dup]).astype(np.int64)
    phash = _splitmix64(src.astype(np.uint64) ^ np.uint64(seed * 0x5851F42D4C957F2D % 2**64))
    shifts = np.arange(60, -1, -4, dtype=np.uint64)
    nibbles = ((phash[:, None] >> shifts[None, :]) & np.uint64(15)).astype(np.uint8)
    hexchars = np.frombuffer(b"0123456789abcdef", np.uint8)[nibbles]

    # img2dataset keys: 5-digit shard, then the sample's index in the shard
    width = max(4, len(str(shard_rows - 1)))
    value = shard * 10**width + np.arange(rows, dtype=np.int64)
    pows = 10 ** np.arange(5 + width - 1, -1, -1, dtype=np.int64)
    keychars = ((value[:, None] // pows[None, :]) % 10 + 48).astype(np.uint8)

    # top-1 probability through the card's share-kept points (piecewise-linear inverse CDF)
    share = np.array([s for _, s in SHARE_KEPT][::-1])
    at = np.array([t for t, _ in SHARE_KEPT][::-1])
    top1 = np.interp(rng.random(m), share, at)
    probs = np.empty((m, TOP_K), np.float64)
    probs[:, 0] = top1
    probs[:, 1:] = top1[:, None] * np.cumprod(rng.uniform(0.05, 0.9, (m, TOP_K - 1)), axis=1)
    order, cdf = sampler
    labels = rng.integers(0, NUM_CLASSES, (m, TOP_K), dtype=np.int32)
    labels[:, 0] = order[np.minimum(np.searchsorted(cdf, rng.random(m)), NUM_CLASSES - 1)]

    offsets = np.zeros(rows + 1, np.int32)
    offsets[1:] = np.cumsum(ok * TOP_K)
    mask = pa.array(~ok)

    def lists(values):
        return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)

    columns = {
        "id": pa.array(gidx),
        "key": _fixed_strings(keychars),
        "imagehash": _fixed_strings(hexchars, valid=ok),
        "labels": lists(pa.array(labels.ravel())),
        "label_probs": lists(pa.array(probs.astype(np.float32).ravel())),
        "width": pa.array(rng.integers(256, 4096, rows, dtype=np.int32)),
        "height": pa.array(rng.integers(256, 4096, rows, dtype=np.int32)),
        "error": pa.array(np.where(ok, None, FAILED_ERROR), pa.string()),
    }
    return pa.Table.from_arrays(
        [columns[f.name].cast(f.type) for f in LABELED_SCHEMA], schema=LABELED_SCHEMA
    )


def ensure_data(work: Path, parts: int, part_rows: int, shard_rows: int, seed: int) -> Path:
    """The first ``parts`` parts, generated where missing (a part is complete once renamed)."""
    import pyarrow.parquet as pq

    from coyo_platform.common.formats import LABELED_FILE_OPTIONS

    options = ",".join(f"{k}={v}" for k, v in sorted(LABELED_FILE_OPTIONS.items()))
    data = work / f"data-v{GENERATOR_VERSION}-p{part_rows}-s{shard_rows}-seed{seed}-{options}"
    data.mkdir(parents=True, exist_ok=True)
    sampler = _class_sampler(seed)
    for part in range(parts):
        final = data / f"part-{part:05d}"
        if final.exists():
            continue
        tmp = data / f"part-{part:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        start = time.perf_counter()
        for shard in range(math.ceil(part_rows / shard_rows)):
            rows = min(shard_rows, part_rows - shard * shard_rows)
            table = shard_table(seed, part, shard, rows, part_rows, shard_rows, sampler)
            pq.write_table(table, tmp / f"{shard:05d}.parquet", **LABELED_FILE_OPTIONS)
            del table
        tmp.rename(final)
        print(
            f"generated {final.name}: {part_rows:,} rows in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return data


def part_files(data: Path, parts: int) -> list[list[str]]:
    return [
        sorted(str(f) for f in (data / f"part-{p:05d}").glob("*.parquet")) for p in range(parts)
    ]


# ---- the two engines, each in its own process ------------------------------------------------


def run_ours(data: Path, parts: int, run_dir: Path) -> dict:
    import polars as pl

    from coyo_platform.common.storage import Storage
    from coyo_platform.sample import rules
    from coyo_platform.stats import aggregate as stats
    from coyo_platform.stats.report import threshold_rows

    assert stats.CARD_THRESHOLDS == CARD_THRESHOLDS
    steps = dict.fromkeys(("aggregate_files", "write_json", "merge", "threshold"), 0.0)
    start = time.perf_counter()
    store = Storage(str(run_dir))
    aggs, index_files = [], []
    for p, files in enumerate(part_files(data, parts)):
        t = time.perf_counter()
        path = str(run_dir / f"part-{p:05d}.index.parquet")
        agg = stats.aggregate_files(files, stats.CARD_THRESHOLDS, store, index_url=path)
        steps["aggregate_files"] += time.perf_counter() - t  # the index written included
        t = time.perf_counter()
        store.write_json(str(run_dir / f"part-{p:05d}.json"), agg.to_json(), compact=True)
        steps["write_json"] += time.perf_counter() - t
        index_files.append(path)
        aggs.append(agg)
    t = time.perf_counter()
    merged = stats.merge_aggregates(aggs)
    table = threshold_rows(merged)
    steps["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    histogram = {int(b): n for b, n in merged.top1_fine.items()}
    target = max(1, round(TARGET_FRACTION * merged.images))
    read = {"values": 0}

    def values_in_bins(lo: int, hi: int):
        frames = pl.collect_all(
            [pl.scan_parquet(f).filter(rules.in_bins(lo, hi)).select("top1") for f in index_files]
        )
        values = pl.concat(frames)["top1"].to_numpy()
        read["values"] += len(values)
        return values

    threshold, size = rules.threshold_for_target(histogram, target, values_in_bins)
    steps["threshold"] = time.perf_counter() - t
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "steps": steps,
        "bin_values_read": read["values"],
        "table": table,
        "result": {
            "images": merged.images,
            "failed": merged.failed,
            "thresholds": [
                {
                    "threshold": t.threshold,
                    "kept": t.kept,
                    "labels_above": t.labels_above,
                    "unique_labels": len(t.class_counts),
                    "class_counts": t.class_counts,
                    "labels_per_image": t.labels_per_image,
                }
                for t in merged.thresholds
            ],
            "top1_counts": merged.top1_counts,
            "top1_histogram": merged.top1_histogram,
            "target": target,
            "threshold": threshold,
            "size": size,
        },
    }


def run_duckdb(data: Path, parts: int, run_dir: Path, memory_limit: str | None) -> dict:
    import duckdb

    ts = CARD_THRESHOLDS
    start = time.perf_counter()
    con = duckdb.connect(config={"preserve_insertion_order": False})
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    globs = ", ".join(f"'{data}/part-{p:05d}/*.parquet'" for p in range(parts))
    src = f"[{globs}]"

    def cut(t: float) -> str:  # float32 probabilities compared as float64(p) >= t
        return f"{float(t)!r}::DOUBLE"

    con.execute(
        f"""
        CREATE TEMP TABLE t AS
        SELECT label_probs[1] AS top1,
               labels[1] AS cls1,
               list_filter(list_zip(labels, label_probs),
                           lambda x: x[2]::DOUBLE >= {cut(ts[0])}) AS above
        FROM read_parquet({src})
        WHERE error IS NULL
        """
    )
    total = con.execute(f"SELECT sum(num_rows) FROM parquet_file_metadata({src})").fetchone()[0]
    images = con.execute("SELECT count(*) FROM t").fetchone()[0]
    # labels above each threshold per image (a prefix of the sorted pairs), as a distribution
    counts = ", ".join(
        f"len(list_filter(above, lambda x: x[2]::DOUBLE >= {cut(t)})) AS n{i}"
        for i, t in enumerate(ts)
    )
    names = ", ".join(f"n{i}" for i in range(len(ts)))
    per_image = con.execute(
        f"""
        WITH c AS (SELECT {counts} FROM t)
        SELECT substr(ti, 2)::INT AS ti, n, count(*) AS images
        FROM (UNPIVOT c ON {names} INTO NAME ti VALUE n)
        WHERE n > 0
        GROUP BY ALL
        """
    ).fetchall()
    # images above each threshold per class
    per_class = ", ".join(
        f"count(*) FILTER (WHERE p[2]::DOUBLE >= {cut(t)}) AS c{i}" for i, t in enumerate(ts)
    )
    classes = con.execute(
        f"SELECT p[1] AS cls, {per_class} FROM (SELECT unnest(above) AS p FROM t) GROUP BY cls"
    ).fetchall()
    top1_counts = con.execute("SELECT cls1, count(*) FROM t GROUP BY cls1").fetchall()
    histogram = con.execute(
        "SELECT least(floor(top1::DOUBLE * 20), 19)::INT AS b, count(*) FROM t GROUP BY b"
    ).fetchall()
    # the exact target threshold: the k-th largest top-1, or the next value above it
    target = max(1, round(TARGET_FRACTION * images))
    (v_k,) = con.execute(
        f"SELECT top1 FROM t ORDER BY top1 DESC LIMIT 1 OFFSET {min(target, images) - 1}"
    ).fetchone()
    size_k, size_up, v_up = con.execute(
        "SELECT count(*) FILTER (WHERE top1 >= $v), count(*) FILTER (WHERE top1 > $v), "
        "min(top1) FILTER (WHERE top1 > $v) FROM t",
        {"v": v_k},
    ).fetchone()
    if v_up is not None and target - size_up < size_k - target:
        threshold, size = float(v_up), int(size_up)
    else:
        threshold, size = float(v_k), int(size_k)
    seconds = time.perf_counter() - start

    thresholds = []
    for i, t in enumerate(ts):
        dist = {str(n): c for ti, n, c in per_image if ti == i}
        class_counts = {str(row[0]): row[1 + i] for row in classes if row[1 + i]}
        thresholds.append(
            {
                "threshold": t,
                "kept": sum(dist.values()),
                "labels_above": sum(int(n) * c for n, c in dist.items()),
                "unique_labels": len(class_counts),
                "class_counts": class_counts,
                "labels_per_image": dist,
            }
        )
    coarse = [0] * 20
    for b, c in histogram:
        coarse[b] = c
    return {
        "seconds": seconds,
        "result": {
            "images": images,
            "failed": int(total) - images,
            "thresholds": thresholds,
            "top1_counts": {str(c): n for c, n in top1_counts},
            "top1_histogram": coarse,
            "target": target,
            "threshold": threshold,
            "size": size,
        },
    }


def child(args) -> None:
    if args.child == "generate":
        data = ensure_data(
            Path(args.workdir), args.parts, args.part_rows, args.shard_rows, args.seed
        )
        print(json.dumps({"data": str(data)}))
        return
    run_dir = Path(args.run_dir)
    if args.child == "ours":
        out = run_ours(Path(args.data), args.parts, run_dir)
    else:
        out = run_duckdb(Path(args.data), args.parts, run_dir, args.duckdb_memory)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["library"] = _library(args.child)
    result = run_dir / "result.json"
    result.write_text(json.dumps(out))
    print(json.dumps({k: v for k, v in out.items() if k != "result"} | {"result": str(result)}))


def _library(engine: str) -> str:
    import duckdb

    if engine == "ours":
        import polars

        return f"duckdb {duckdb.__version__}, polars {polars.__version__}"
    return f"duckdb {duckdb.__version__}"


def measure(engine: str, data: Path, parts: int, run_dir: Path, args) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--child", engine, "--data", str(data),
           "--parts", str(parts), "--run-dir", str(run_dir)]  # fmt: skip
    if args.duckdb_memory:
        cmd += ["--duckdb-memory", args.duckdb_memory]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{engine} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["result"] = json.loads(Path(report["result"]).read_text())["result"]
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def differences(a: dict, b: dict, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                found.append(f"{path}.{k}: only in {'ours' if k in a else 'duckdb'}")
            else:
                found += differences(a[k], b[k], f"{path}.{k}")
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: ours {str(a)[:80]}, duckdb {str(b)[:80]}"]


# ---- the run ---------------------------------------------------------------------------------


def machine() -> str:
    from coyo_platform.common.machine import cpu_model

    mem = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return f"{cpu_model()}, {mem:.1f} GiB RAM"


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="5e6,10e6,20e6", help="sizes, comma-separated")
    p.add_argument("--part-rows", type=int, default=5_000_000, help="rows per partition")
    p.add_argument("--shard-rows", type=int, default=10_000, help="rows per shard file")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="generated data (kept) and runs")
    p.add_argument("--engines", default="ours,duckdb")
    p.add_argument("--duckdb-memory", default=None, help="DuckDB memory_limit (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep each run's index and result files")
    p.add_argument("--quick", action="store_true", help="tiny sizes: 40k and 80k rows")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--child", choices=("generate", "ours", "duckdb"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--parts", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.rows, args.part_rows, args.shard_rows = "40e3,80e3", 20_000, 5_000
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - {"ours", "duckdb"}:
        sys.exit(f"--engines: ours and/or duckdb, got {args.engines!r}")
    sizes = sorted({max(1, math.ceil(float(r) / args.part_rows)) for r in args.rows.split(",")})

    # the parent stays small (no torch, polars or DuckDB here): on Linux a child's ru_maxrss
    # starts from the RSS of the process it was forked from
    work = Path(args.workdir)
    cmd = [sys.executable, __file__, "--child", "generate", "--workdir", str(work),
           "--parts", str(max(sizes)), "--part-rows", str(args.part_rows),
           "--shard-rows", str(args.shard_rows), "--seed", str(args.seed)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit("generating the data failed")
    data = Path(json.loads(done.stdout.strip().splitlines()[-1])["data"])
    on_disk = sum(f.stat().st_size for f in data.glob("part-*/*.parquet"))
    print(f"machine: {machine()}")
    print(
        f"data: {data} ({on_disk / 1e9:.2f} GB on disk): parts of {args.part_rows:,} rows in "
        f"{args.shard_rows:,}-row shards, the label program's LABELED_FILE_OPTIONS; target "
        f"{TARGET_FRACTION:.0%} of labeled images",
        flush=True,
    )
    runs: dict[int, dict[str, dict]] = {}
    mismatch = False
    for parts in sizes:
        rows = parts * args.part_rows
        runs[rows] = {}
        print(f"\n{rows:,} rows ({parts} part{'s' if parts > 1 else ''})")
        for engine in engines:
            r = measure(engine, data, parts, work / "runs" / f"{rows}-{engine}", args)
            r["rows_per_second"] = rows / r["seconds"]
            runs[rows][engine] = r
            print(
                f"  {engine:<7}{rows:>13,} rows {r['seconds']:8.1f} s "
                f"{r['rows_per_second']:>12,.0f} rows/s   "
                f"peak RSS {r['peak_rss_mb']:7,.0f} MB   ({r['library']})",
                flush=True,
            )
        ours = runs[rows].get("ours")
        if ours:
            s = ours["steps"]
            print(
                "  ours' steps: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in s.items())
                + f" ({ours['bin_values_read']:,} values read for the threshold)"
            )
            res = ours["result"]
            print(
                f"  share kept at {', '.join(f'{t:g}' for t in CARD_THRESHOLDS)}: "
                + ", ".join(f"{t['kept'] / res['images']:.1%}" for t in res["thresholds"])
                + f"; target {res['target']:,}: threshold {res['threshold']!r} "
                f"({res['size']:,} images)"
            )
        if len(runs[rows]) == 2:
            duck = runs[rows]["duckdb"]
            ratio = duck["seconds"] / ours["seconds"]
            runs[rows]["ratio"] = ratio
            print(
                f"  ratio duckdb/ours = {ratio:.2f} (target >= {TARGETS['ratio']:g}: "
                f"{verdict(ratio >= TARGETS['ratio'])})"
            )
            diffs = differences(ours["result"], duck["result"])
            if diffs:
                mismatch = True
                print(f"  MISMATCH ({len(diffs)} differences):")
                for d in diffs[:20]:
                    print(f"    {d}")
            else:
                res = ours["result"]
                print(
                    f"  engines agree: threshold table ({len(res['thresholds'])} thresholds: "
                    "kept, labels above, unique labels, per-class and labels-per-image counts), "
                    f"top-1 classes and histogram, target threshold {res['threshold']!r} "
                    f"({res['size']:,} images)"
                )

    largest, smallest = max(runs), min(runs)
    print(f"\nat {largest:,} rows:")
    if "ratio" in runs[largest]:
        ratio = runs[largest]["ratio"]
        print(f"  target ratio >= {TARGETS['ratio']:g}: {ratio:.2f} ({verdict(ratio >= 1.0)})")
    if "ours" in runs[largest]:
        peak = runs[largest]["ours"]["peak_rss_mb"]
        print(
            f"  target ours peak RSS < {TARGETS['peak_mb']:,.0f} MB: {peak:,.0f} MB "
            f"({verdict(peak < TARGETS['peak_mb'])})"
        )
        low = runs[smallest]["ours"]["peak_rss_mb"]
        flat = peak / low
        steps = " -> ".join(f"{runs[r]['ours']['peak_rss_mb']:,.0f}" for r in sorted(runs))
        print(
            f"  ours peak RSS {smallest:,} -> {largest:,} rows: {steps} MB "
            f"(x{flat:.2f}; target <= {TARGETS['flat']:g}: {verdict(flat <= TARGETS['flat'])})"
        )
        ours = runs[largest]["ours"]
        rate = largest / ours["seconds"]
        per_row = {k: v / largest for k, v in ours["steps"].items()}
        stats_hours = sum(v for k, v in per_row.items() if k != "threshold") * COYO_ROWS / 3600
        print(
            f"  extrapolated to {COYO_ROWS:,} rows on this machine at {rate:,.0f} rows/s: "
            f"{COYO_ROWS / rate / 3600:.2f} h (label stats {stats_hours:.2f} h, "
            f"{math.ceil(COYO_ROWS / args.part_rows):,} partitions of {args.part_rows:,}, one at a "
            f"time; threshold {per_row['threshold'] * COYO_ROWS / 60:.1f} min, reading the top-1 "
            f"column of every index); peak RSS ~{peak:,.0f} MB (per partition, flat)"
        )
    if "duckdb" in runs[largest]:
        duck, low = runs[largest]["duckdb"], runs[smallest]["duckdb"]["peak_rss_mb"]
        text = (
            f"  duckdb extrapolated: {COYO_ROWS / (largest / duck['seconds']) / 3600:.2f} h; "
            f"its peak RSS {low:,.0f} -> {duck['peak_rss_mb']:,.0f} MB"
        )
        if largest > smallest:  # its temp table holds every row: memory grows with rows
            slope = (duck["peak_rss_mb"] - low) / (largest - smallest)
            at_coyo = duck["peak_rss_mb"] + slope * (COYO_ROWS - largest)
            text += f", growing {slope * 1e6:,.1f} MB per 1M rows: ~{at_coyo / 1024:,.0f} GiB"
            text += f" at {COYO_ROWS:,} rows in one query (beyond RAM it spills)"
        print(text)
    if args.json:
        figures = {
            str(rows): {
                e: {k: v for k, v in r.items() if k != "result"} if isinstance(r, dict) else r
                for e, r in runs[rows].items()
            }
            for rows in runs
        }
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    if mismatch:
        sys.exit("MISMATCH: the engines disagree")


if __name__ == "__main__":
    main()
