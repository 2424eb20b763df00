"""How fast the webdataset shards of the kept images are written, and whether memory stays flat.

    python benchmarks/wds.py                        # 10,000 and 40,000 rows of 48 KB images
    python benchmarks/wds.py --rows 2000 --image-kb 64
    python benchmarks/wds.py --quick --workdir /tmp/x   # tiny sizes, for the tests

For each size it builds one partition as the platform leaves it: the source part (id, url),
downloaded tars of ``--shard-rows`` samples (``<key>.jpg`` of ``--image-kb`` random bytes, the
writer copies bytes and never decodes them, ``<key>.json``, ``<key>.txt``), a label set (50
labels and probabilities a row, ~3% failed rows), and through Dagster its label stats, the
roll-up, a plan at threshold 0.5 (about half the rows kept) and its subset part. Then, in a fresh
subprocess each, so each peak RSS is that step's own:

  wds:   ``sample.wds.write_wds`` with ``--shard-mb`` shards (the asset's call): samples/s, MB/s
         written, peak RSS;
  rerun: the same call again over the complete partition (what a rerun or an automation tick
         with nothing changed costs);
  copy:  the partition's downloaded tars copied whole with ``shutil.copyfile``: the floor, the
         disk's own speed for the same bytes read.

It prints each figure, the ratio of the copy's seconds to the shards' (the same input read by
each: how close the stage comes to reading its input once at the disk's speed), and the ratio of
peak RSS between the largest and smallest size (flat: the stage never holds a partition's
images). Figures go to ``--json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = "part-00000"
TARGETS = {"copy_ratio": 0.5, "flat": 1.2}
LABELER = "bench-labeled-000000000000"


def build(root: Path, rows: int, shard_rows: int, image_kb: int) -> None:
    """One partition under ``root``, as the platform leaves it, through its subset part."""
    import dagster as dg
    import numpy as np
    import pyarrow as pa

    from coyo_platform.assets.coyo_labeled_300m import coyo_labeled_300m
    from coyo_platform.assets.label_stats import label_stats
    from coyo_platform.assets.label_stats_rollup import label_stats_rollup
    from coyo_platform.assets.subset_plan import subset_plan
    from coyo_platform.common import layout, shards
    from coyo_platform.common.formats import LABELED_FILE_OPTIONS, LABELED_SCHEMA
    from coyo_platform.common.storage import Storage
    from coyo_platform.resources import StorageResource

    store = Storage(str(root))
    rng = np.random.default_rng(0)
    ids = np.arange(rows, dtype=np.int64)
    store.write_parquet(
        store.url("coyo700m_metadata", f"{KEY}.parquet"),
        pa.table({"id": ids, "url": [f"http://example.com/{i}.jpg" for i in ids]}),
    )
    sets = Storage(layout.label_sets(store))
    sets.write_json(layout.labeler_record(sets.root, LABELER), {"labeler": LABELER})
    shards.set_current_labels(sets, KEY, {"labeler": LABELER})
    labels_folder, tars = layout.labels(store, KEY, LABELER), Path(layout.shards(store, KEY))
    tars.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        failed = rng.random(n) < 0.03
        top1 = rng.random(n).astype(np.float32)
        probs = np.sort(rng.random((n, 50)).astype(np.float32) * top1[:, None], axis=1)[:, ::-1]
        probs[:, 0] = top1
        labels = rng.integers(0, 21_841, (n, 50), dtype=np.int32)
        table = pa.table(
            {
                "id": ids[start : start + n],
                "key": [f"{s:05d}{i:04d}" for i in range(n)],
                "imagehash": [
                    None if f else f"{h:016x}"
                    for f, h in zip(failed, rng.integers(0, 2**63, n), strict=True)
                ],
                "labels": [
                    None if f else row.tolist() for f, row in zip(failed, labels, strict=True)
                ],
                "label_probs": [
                    None if f else row.tolist() for f, row in zip(failed, probs, strict=True)
                ],
                "width": np.where(failed, 0, 640).astype(np.int32),
                "height": np.where(failed, 0, 480).astype(np.int32),
                "error": [("decode: OSError" if f else None) for f in failed],
            }
        ).cast(LABELED_SCHEMA)
        store.write_parquet(f"{labels_folder}/{s:05d}.parquet", table, **LABELED_FILE_OPTIONS)
        with tarfile.open(tars / f"{s:05d}.tar", "w") as tar:
            for i in range(n):
                if failed[i]:
                    continue
                key = f"{s:05d}{i:04d}"
                meta = json.dumps({"key": key, "id": int(ids[start + i]), "status": "success"})
                for ext, data in (
                    ("jpg", os.urandom(image_kb * 1024)),
                    ("json", meta.encode()),
                    ("txt", b"a caption of a few words"),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    resources = {"storage": StorageResource(root=str(root))}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [KEY])
        for assets, part, config in (
            ([label_stats], KEY, None),
            ([label_stats_rollup], None, None),
            ([subset_plan], None, {"threshold": 0.5}),
            ([coyo_labeled_300m], KEY, None),
        ):
            name = assets[0].key.path[-1]
            done = dg.materialize(
                assets,
                partition_key=part,
                instance=instance,
                resources=resources,
                run_config={
                    "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
                    **({"ops": {name: {"config": config}}} if config else {}),
                },
            )
            assert done.success, name


def child(root: Path, step: str, shard_mb: float) -> dict:
    """One measured step in this process; its figures."""
    from coyo_platform.common import layout
    from coyo_platform.common.storage import Storage
    from coyo_platform.sample.wds import WdsSettings, write_wds

    store = Storage(str(root))
    start = time.perf_counter()
    if step == "copy":
        source, copied = Path(layout.shards(store, KEY)), root / "copy"
        copied.mkdir(exist_ok=True)
        total = 0
        for tar in sorted(source.glob("*.tar")):
            shutil.copyfile(tar, copied / tar.name)
            total += tar.stat().st_size
        shutil.rmtree(copied)
        figures = {"bytes": total}
    else:
        part = write_wds(
            store, KEY, WdsSettings(shard_bytes=int(shard_mb * 1e6)), log=lambda _: None
        )
        figures = {"samples": part.samples, "bytes": part.bytes, "written": part.written}
    figures["seconds"] = time.perf_counter() - start
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return figures


def _run_child(root: Path, step: str, shard_mb: float) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        step,
        "--workdir",
        str(root),
        "--shard-mb",
        str(shard_mb),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="10000,40000", help="partition sizes, comma-separated")
    parser.add_argument("--image-kb", type=int, default=48)
    parser.add_argument("--shard-rows", type=int, default=10_000, help="downloaded tar size")
    parser.add_argument("--shard-mb", type=float, default=100.0, help="webdataset shard size")
    parser.add_argument("--workdir", default="/tmp/coyo-wds-bench")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the tests)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.workdir), args.child, args.shard_mb)))
        return
    if args.quick:
        args.rows, args.image_kb, args.shard_rows, args.shard_mb = "200,800", 4, 300, 0.5
    from coyo_platform.common.machine import cpu_model

    print(f"machine: {cpu_model()}; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    sizes = [int(float(r)) for r in args.rows.split(",")]
    results: dict = {
        "machine": cpu_model(),
        "image_kb": args.image_kb,
        "shard_mb": args.shard_mb,
        "sizes": {},
    }
    for rows in sizes:
        root = Path(args.workdir) / f"rows-{rows}-kb-{args.image_kb}-shard-{args.shard_rows}"
        shutil.rmtree(root, ignore_errors=True)
        build(root, rows, args.shard_rows, args.image_kb)
        copy = _run_child(root, "copy", args.shard_mb)
        wds = _run_child(root, "wds", args.shard_mb)
        rerun = _run_child(root, "rerun", args.shard_mb)
        shutil.rmtree(root, ignore_errors=True)
        mb_s = wds["bytes"] / 1e6 / wds["seconds"]
        copy_mb_s = copy["bytes"] / 1e6 / copy["seconds"]
        ratio = copy["seconds"] / wds["seconds"]  # the same input, read by each
        print(
            f"{rows:,} rows ({copy['bytes'] / 1e6:,.0f} MB downloaded): wds {wds['samples']:,} "
            f"samples in {wds['seconds']:.2f}s = {wds['samples'] / wds['seconds']:,.0f} samples/s,"
            f" {mb_s:,.0f} MB/s written, {wds['written']} shards, "
            f"peak RSS {wds['peak_rss_mb']:,.0f} MB; "
            f"rerun {rerun['seconds']:.2f}s ({rerun['written']} shards written); copy of the "
            f"downloaded tars {copy_mb_s:,.0f} MB/s; ratio copy s / wds s = {ratio:.2f} "
            f"(target >= {TARGETS['copy_ratio']})"
        )
        results["sizes"][rows] = {"wds": wds, "rerun": rerun, "copy": copy, "copy_ratio": ratio}
    small, large = (results["sizes"][r]["wds"]["peak_rss_mb"] for r in (sizes[0], sizes[-1]))
    flat = large / small
    results["rss_ratio"] = flat
    print(
        f"peak RSS {sizes[-1]:,} rows / {sizes[0]:,} rows = {flat:.2f} "
        f"(target <= {TARGETS['flat']}: {'met' if flat <= TARGETS['flat'] else 'missed'})"
    )
    print(f"load after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
