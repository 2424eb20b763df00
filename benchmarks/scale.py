"""Scale rehearsal (issue 18), first part: the sensors' ticks on storage laid out as a full run.

    python benchmarks/scale.py                          # 16, 64, 128 partitions x 580 shards
    python benchmarks/scale.py --parts 16 --shards 58   # smaller
    python benchmarks/scale.py --quick                  # tiny sizes (the tests)

A full COYO-700M run is 128 partitions of about 580 shards. This lays out, for each size,
exactly the files the sensors look at, as the platform writes them: per partition the downloaded
shards (``NNNNN.tar``, ``.parquet``, ``_stats.json``), the download's ``_fingerprint.json``, the
labeled shards of one label set (``NNNNN.parquet``), the partition's ``_current`` pointer and the
label set's ``_labeler.json``; and a source folder of the 128 parts. **Scaled down:** every
shard file is empty (the sensors list names and read only the JSON records), so a full layout
fits this machine's disk and memory.

It lays the same files out twice: in a local folder and in a bucket of moto's S3 server on
loopback, with every HTTP request counted at the server. It registers the partitions in a
temporary Dagster instance and times each tick, in this process, one after the other:

  unlabeled_shards_sensor   nothing new; one new finished shard in one partition; one new part
                            downloaded (580 shards, none labeled)
  coyo_parts_sensor         nothing new; one new part in the source folder

The targets, from issue 18: a tick under 10 s on S3 at full size (Dagster's default sensor
timeout is 60 s), and no listing of every partition per tick where a cursor can avoid it. On
moto's server a listing scans every key in the bucket (so its time grows with the bucket, unlike
S3's), which makes the S3 times here an upper bound; the request counts are what S3 would see.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SHARDS = 580  # a COYO-700M part of ~5.8M rows in shards of 10,000
LABELER = "tf_efficientnetv2_xl-0123456789ab"
TICK_TARGET_S3 = 10.0  # seconds, at full size


def shard_names(count: int) -> list[str]:
    return [f"{i:05d}" for i in range(count)]


def part_files(key: str, shards: int, labeled: int) -> dict[str, bytes]:
    """Relative path -> contents of a partition's files the sensors read or list: ``shards``
    finished downloaded shards, the first ``labeled`` of them labeled."""
    files: dict[str, bytes] = {}
    down = f"downloaded_shards/{key}"
    for name in shard_names(shards):
        files[f"{down}/{name}.tar"] = b""
        files[f"{down}/{name}.parquet"] = b""
        files[f"{down}/{name}_stats.json"] = b'{"count": 10000, "successes": 9000}'
    files[f"{down}/_fingerprint.json"] = json.dumps({"part": key, "made": "0" * 32}).encode()
    for name in shard_names(shards)[:labeled]:
        files[f"labeled_shards/{LABELER}/{key}/{name}.parquet"] = b""
    if labeled:
        files[f"labeled_shards/_current/{key}.json"] = json.dumps({"labeler": LABELER}).encode()
    return files


def layout(parts: int, shards: int) -> dict[str, bytes]:
    files = {f"labeled_shards/{LABELER}/_labeler.json": json.dumps({"settings": {}}).encode()}
    for p in range(parts):
        files |= part_files(f"part-{p:05d}", shards, shards)
    return files


class Folder:
    """The layout in a local folder."""

    kind = "folder"

    def __init__(self, work: Path) -> None:
        self.root = str(work / "root")
        self.source = str(work / "source")
        Path(self.source).mkdir(parents=True)

    def put(self, files: dict[str, bytes], base: str | None = None) -> None:
        base = base or self.root
        made: set[str] = set()
        for rel, data in files.items():
            path = os.path.join(base, rel)
            parent = os.path.dirname(path)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            with open(path, "wb") as fh:
                fh.write(data)

    def requests(self) -> Counter:
        return Counter()


class S3Server:
    """moto's S3 server on loopback, one for the whole run (s3fs keeps its clients per process);
    every request counted by kind at the server."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        for var, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            os.environ[var] = value
        app = DomainDispatcherApplication(create_backend_app)
        self.counted: Counter = Counter()

        def counting(environ, start_response):  # noqa: ANN001, ANN202 - WSGI
            query = environ.get("QUERY_STRING", "")
            kind = "LIST" if "list-type" in query or "delimiter" in query else None
            self.counted[kind or environ["REQUEST_METHOD"]] += 1
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, counting, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        os.environ["AWS_ENDPOINT_URL"] = self.endpoint


class Bucket:
    """The layout in a bucket of the S3 server."""

    kind = "s3 (moto)"

    def __init__(self, server: S3Server, name: str) -> None:
        import boto3
        from moto.backends import get_backend

        self.server, self.endpoint = server, server.endpoint
        boto3.client("s3").create_bucket(Bucket=name)
        self.backend = get_backend("s3")["123456789012"]["global"]
        self.bucket = name
        self.root = f"s3://{name}/run"
        self.source = f"s3://{name}/source"

    def put(self, files: dict[str, bytes], base: str | None = None) -> None:
        prefix = (base or self.root).removeprefix(f"s3://{self.bucket}/")
        for rel, data in files.items():  # straight into moto's store: no request to count
            self.backend.put_object(self.bucket, f"{prefix}/{rel}", data)

    def drop(self) -> None:
        """Empty the bucket from moto's memory (a full layout is 300,000 keys)."""
        self.backend.buckets.pop(self.bucket, None)

    def requests(self) -> Counter:
        return Counter(self.server.counted)


def tick(sensor, instance, cursor: str | None, **resources):  # noqa: ANN001, ANN201
    import dagster as dg

    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    start = time.perf_counter()
    result = sensor(context)
    return time.perf_counter() - start, result, context.cursor


def requested(result) -> int:  # noqa: ANN001
    return len(getattr(result, "run_requests", None) or [])


def measure(where, parts: int, shards: int) -> list[dict]:  # noqa: ANN001
    import dagster as dg

    from coyo_platform.partitions import coyo_parts
    from coyo_platform.resources import SourceResource, StorageResource
    from coyo_platform.sensors import coyo_parts_sensor, unlabeled_shards_sensor

    start = time.perf_counter()
    where.put(layout(parts, shards))
    where.put({f"part-{p:05d}.parquet": b"" for p in range(parts)}, base=where.source)
    laid = time.perf_counter() - start
    storage = StorageResource(root=where.root, endpoint_url=getattr(where, "endpoint", None))
    source = SourceResource(location=where.source)
    rows = []

    def record(sensor: str, case: str, seconds: float, result, before: Counter) -> None:  # noqa: ANN001
        after = where.requests()
        made = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
        rows.append(
            {
                "store": where.kind,
                "parts": parts,
                "shards": shards,
                "sensor": sensor,
                "case": case,
                "seconds": seconds,
                "requests": sum(made.values()),
                "by_kind": made,
                "run_requests": requested(result),
                "laid_out_seconds": laid,
            }
        )

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(coyo_parts.name, [f"part-{p:05d}" for p in range(parts)])
        before = where.requests()
        seconds, result, _ = tick(unlabeled_shards_sensor, instance, None, storage=storage)
        assert requested(result) == 0, result
        record("unlabeled_shards_sensor", "nothing new", seconds, result, before)

        where.put(  # one more finished shard in the last partition, not labeled yet
            {
                f"downloaded_shards/part-{parts - 1:05d}/{shards:05d}{suffix}": b""
                for suffix in (".tar", ".parquet", "_stats.json")
            }
        )
        before = where.requests()
        seconds, result, _ = tick(unlabeled_shards_sensor, instance, None, storage=storage)
        assert requested(result) == 1, result
        record("unlabeled_shards_sensor", "one new shard", seconds, result, before)

        new = f"part-{parts:05d}"
        where.put(part_files(new, shards, 0))  # a part downloaded, nothing labeled
        before = where.requests()
        seconds, result, _ = tick(unlabeled_shards_sensor, instance, None, storage=storage)
        assert requested(result) == 2, result
        record("unlabeled_shards_sensor", "one new part", seconds, result, before)

        before = where.requests()
        seconds, result, cursor = tick(coyo_parts_sensor, instance, None, source=source)
        record("coyo_parts_sensor", "first tick (all parts new)", seconds, result, before)
        before = where.requests()
        seconds, result, cursor = tick(coyo_parts_sensor, instance, cursor, source=source)
        assert requested(result) == 0, result
        record("coyo_parts_sensor", "nothing new", seconds, result, before)
        where.put({f"{new}.parquet": b""}, base=where.source)
        before = where.requests()
        seconds, result, cursor = tick(coyo_parts_sensor, instance, cursor, source=source)
        assert requested(result) == 1, result
        record("coyo_parts_sensor", "one new part", seconds, result, before)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="16,64,128", help="partition counts, comma-separated")
    parser.add_argument("--shards", type=int, default=SHARDS, help="finished shards per part")
    parser.add_argument("--stores", default="folder,s3", help="folder, s3 or both")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the tests)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    sizes = [2, 4] if args.quick else [int(p) for p in args.parts.split(",")]
    shards = 5 if args.quick else args.shards
    stores = args.stores.split(",")
    from coyo_platform.common.machine import cpu_model

    print(f"# {cpu_model()}; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# {shards} finished shards per partition, every shard file empty (names only)")
    rows = []
    server = S3Server() if "s3" in stores else None
    with tempfile.TemporaryDirectory(prefix="coyo-scale-") as work:
        for n, parts in enumerate(sizes):
            for kind in stores:
                where = (
                    Folder(Path(work) / f"{kind}-{parts}")
                    if kind == "folder"
                    else Bucket(server, f"coyo-scale-{n}")
                )
                got = measure(where, parts, shards)
                rows += got
                for r in got:
                    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["by_kind"].items()))
                    kinds = f" ({kinds})" if kinds else ""
                    print(f"{r['store']:10s} {parts:4d} parts  {r['sensor']:24s} "
                          f"{r['case']:27s} {r['seconds']:7.2f} s  "
                          f"{r['requests']:6d} requests{kinds}")  # fmt: skip
                if kind != "folder":
                    where.drop()
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    full = [r for r in rows if r["parts"] == max(sizes) and r["store"] != "folder"]
    for r in full:
        if r["sensor"] == "unlabeled_shards_sensor":
            met = "met" if r["seconds"] < TICK_TARGET_S3 else "missed"
            print(f"target: {r['sensor']} '{r['case']}' on S3 at {max(sizes)} parts under "
                  f"{TICK_TARGET_S3:g} s: {r['seconds']:.1f} s on moto ({met} on moto, whose "
                  f"listings scan the whole bucket); {r['requests']} requests, "
                  f"{r['requests'] / max(sizes):.1f} a partition")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": cpu_model(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
