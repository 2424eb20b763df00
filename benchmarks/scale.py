"""Scale rehearsal (issue 18): the sensors, the automation tick, the UI's partitions pages and
the coverage check on storage and an instance laid out as a full run.

    python benchmarks/scale.py                          # 16, 64, 128 partitions x 580 shards
    python benchmarks/scale.py --parts 16 --shards 58   # smaller
    python benchmarks/scale.py --quick                  # tiny sizes (the tests)

A full COYO-700M run is 128 partitions of about 580 shards. This lays out, for each size,
exactly the files the sensors look at, as the platform writes them: per partition the downloaded
shards (``NNNNN.tar``, ``.parquet``, ``_stats.json``), the download's ``_fingerprint.json`` and
completion record (``downloaded_shards/_complete/<part>.json``), the labeled shards of one label
set (``NNNNN.parquet``), the partition's ``_current`` pointer and the label set's
``_labeler.json``; and a source folder of the 128 parts. **Scaled down:** every shard file is
empty (the sensors list names and read only the JSON records), so a full layout fits this
machine's disk and memory.

It lays the same files out twice: in a local folder and in a bucket of moto's S3 server on
loopback, with every HTTP request counted at the server and listings answered as S3 answers them
(from a sorted index, see ``Bucket``: moto's own scan every key of the bucket each time). It
registers the partitions in a temporary Dagster instance and times each tick, in this process,
one after the other, the cursor carried from tick to tick as the daemon does:

  unlabeled_shards_sensor   the first tick (no cursor: READS_PER_TICK partitions read); the
                            later ticks until every partition was read once (the slowest);
                            nothing new; one new finished shard (a download run on the last
                            partition); one new part downloaded (580 shards, none labeled)
  coyo_parts_sensor         the first tick; nothing new; one new part in the source folder

Then, with every partition of every asset materialized in a Dagster instance (SQLite) grown to
each size: the default automation condition sensor's evaluation (first and next tick), and the
UI's partitions page of ``labeled_shards`` and ``coyo_labeled_300m`` (its GraphQL query, as the
page sends it, to ``dagster-webserver`` on loopback, the best of three). And the
``label_coverage`` check of one partition of 580 shards holding 10,000 rows each (it runs in each
partition's run: it does not grow with the partitions). The roll-up and the plan at 128
partitions are ``benchmarks/scale_stages.py``.

The targets, from issue 18: a tick under 10 s on S3 at full size (Dagster's default sensor
timeout is 60 s), and no listing of every partition per tick where a cursor can avoid it. The
S3 times here are loopback times; the estimate for S3 multiplies the counted requests by AWS's
published latency for small requests (an assumption: this machine reaches no S3)."""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from coyo_platform.common.shards import TODO_THREADS  # noqa: E402

warnings.filterwarnings("ignore", message=".* is currently in beta")  # Dagster's own calls

SHARDS = 580  # a COYO-700M part of ~5.8M rows in shards of 10,000
LABELER = "tf_efficientnetv2_xl-0123456789ab"
TICK_TARGET_S3 = 10.0  # seconds, at full size
SHARD_ROWS = 10_000
#: What one small S3 request takes, for the estimate from the counted requests: AWS's S3
#: performance guide gives roughly 100-200 ms for small objects' first byte (an assumption
#: here, not measured: this machine reaches no S3).
S3_REQUEST_S = (0.1, 0.2)


def shard_names(count: int) -> list[str]:
    return [f"{i:05d}" for i in range(count)]


def part_files(key: str, shards: int, labeled: int) -> dict[str, bytes]:
    """Relative path -> contents of a partition's files the sensors read or list: ``shards``
    finished downloaded shards (the download program's completion record with them), the first
    ``labeled`` of them labeled."""
    files: dict[str, bytes] = {complete(key): json.dumps({"shards": shards}).encode()}
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


def complete(key: str) -> str:
    return f"downloaded_shards/_complete/{key}.json"


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

    def remove(self, rel: str) -> None:
        os.remove(os.path.join(self.root, rel))

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
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
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
    """The layout in a bucket of the S3 server, listed as S3 lists.

    moto answers a listing by scanning every key of the bucket (and a listing's every page
    again), so on moto a listing's time grows with the bucket; S3's grows with what it returns.
    Here the bucket's listings are answered from a sorted index of its names instead (moto's
    own objects, in moto's order, its paging), so a tick's time at 128 partitions is not
    moto's full scans. Only this benchmark's buckets are indexed, and only this benchmark
    writes to them (straight into moto's store)."""

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
        self.names: list[str] = []
        listings = getattr(self.backend, "_coyo_listings", None)
        if listings is None:  # once per process: moto's backend is one object
            listings = self.backend._coyo_listings = {}
            moto_list = self.backend.list_objects

            def list_objects(bucket, prefix, delimiter, marker, max_keys):  # noqa: ANN001, ANN202
                indexed = listings.get(bucket.name)
                if indexed is None:
                    return moto_list(bucket, prefix, delimiter, marker, max_keys)
                return indexed.listed(bucket, prefix, delimiter, marker, max_keys)

            self.backend.list_objects = list_objects
            self.backend._coyo_moto_list = moto_list
        listings[name] = self

    def _key(self, rel: str, base: str | None = None) -> str:
        return f"{(base or self.root).removeprefix(f's3://{self.bucket}/')}/{rel}"

    def put(self, files: dict[str, bytes], base: str | None = None) -> None:
        for rel, data in files.items():  # straight into moto's store: no request to count
            self.backend.put_object(self.bucket, self._key(rel, base), data)
        self.names = sorted(self.backend.buckets[self.bucket].keys.keys())

    def remove(self, rel: str) -> None:
        self.backend.delete_object(self.bucket, self._key(rel))
        self.names.remove(self._key(rel))

    def listed(self, bucket, prefix, delimiter, marker, max_keys):  # noqa: ANN001, ANN201
        """moto's ``list_objects``, from the index: a prefix's keys by bisection, and each
        common prefix (``delimiter``) skipped over in one step."""
        prefix = prefix or ""
        names, keys, folders = self.names, [], []
        i = bisect.bisect_left(names, prefix)
        while i < len(names) and names[i].startswith(prefix):
            rest = names[i][len(prefix) :]
            if delimiter and delimiter in rest:
                folder = f"{prefix}{rest.split(delimiter)[0]}{delimiter}"
                folders.append(folder)
                i = bisect.bisect_left(names, folder + "\U0010ffff", i)
            else:
                keys.append(bucket.keys[names[i]])
                i += 1
        backend, truncated, next_marker = self.backend, False, None
        if marker:
            keys = backend._get_results_from_token(
                keys, backend._pagination_tokens.get(marker) or marker
            )
        if max_keys is not None:
            keys, truncated, next_marker = backend._truncate_result(keys, max_keys)
        return keys, folders, truncated, next_marker

    def check_listings(self, prefixes: list[str]) -> None:
        """The index lists as moto does (every key, folder, page), for these prefixes."""
        bucket = self.backend.buckets[self.bucket]
        moto_list = self.backend._coyo_moto_list
        for prefix in prefixes:
            for delimiter in (None, "/"):
                for max_keys in (None, 1000):
                    ours = self.listed(bucket, prefix, delimiter, None, max_keys)
                    theirs = moto_list(bucket, prefix, delimiter, None, max_keys)
                    assert ours == theirs, (prefix, delimiter, max_keys)

    def drop(self) -> None:
        """Empty the bucket from moto's memory (a full layout is 300,000 keys)."""
        self.backend.buckets.pop(self.bucket, None)
        self.backend._coyo_listings.pop(self.bucket, None)

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
    if isinstance(where, Bucket):
        down = "run/downloaded_shards/"
        where.check_listings(["", "run/", down, f"{down}part-00000/", f"{down}part-0000"])
    storage = StorageResource(root=where.root, endpoint_url=getattr(where, "endpoint", None))
    store = {"storage": storage}
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
        seconds, result, cursor = tick(unlabeled_shards_sensor, instance, None, storage=storage)
        assert requested(result) == 0, result
        record("unlabeled_shards_sensor", "first tick (no cursor)", seconds, result, before)
        # the ticks after it until every partition was read once (READS_PER_TICK a tick): the
        # slowest of them, the requests of them all
        before, ticks, slowest = where.requests(), 1, 0.0
        while "left for the next ticks" in getattr(result, "skip_message", ""):
            seconds, result, cursor = tick(unlabeled_shards_sensor, instance, cursor, **store)
            assert requested(result) == 0, result
            ticks, slowest = ticks + 1, max(slowest, seconds)
        if ticks > 1:
            record("unlabeled_shards_sensor", "later ticks to read all", slowest, result, before)
            rows[-1]["ticks"] = ticks
        before = where.requests()
        seconds, result, cursor = tick(unlabeled_shards_sensor, instance, cursor, storage=storage)
        assert requested(result) == 0, result
        record("unlabeled_shards_sensor", "nothing new", seconds, result, before)

        # a download run (retry_failed, say) on the last partition: it removes the partition's
        # completion record, then finishes one more shard, not labeled yet
        last = f"part-{parts - 1:05d}"
        where.remove(complete(last))
        where.put(
            {
                f"downloaded_shards/{last}/{shards:05d}{suffix}": b""
                for suffix in (".tar", ".parquet", "_stats.json")
            }
        )
        before = where.requests()
        seconds, result, _ = tick(unlabeled_shards_sensor, instance, cursor, storage=storage)
        assert requested(result) == 1, result
        record("unlabeled_shards_sensor", "one new shard", seconds, result, before)
        cursor = result.cursor

        new = f"part-{parts:05d}"
        where.put(part_files(new, shards, 0))  # a part downloaded, nothing labeled
        before = where.requests()
        seconds, result, _ = tick(unlabeled_shards_sensor, instance, cursor, storage=storage)
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


#: Every asset the UI shows, in the order a full run materializes them (the partitioned ones
#: once a partition, the roll-ups once over all).
FLOW = [
    ("coyo700m_metadata", True),
    ("downloaded_shards", True),
    ("labeled_shards", True),
    ("label_stats", True),
    ("label_stats_rollup", False),
    ("subset_plan", False),
    ("coyo_labeled_300m", True),
    ("subset_manifest", False),
    ("label_names", False),
]

#: What the UI's partitions page of an asset asks the webserver (its PartitionHealthQuery).
PARTITIONS_PAGE = """
query PartitionHealthQuery($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      id
      partitionKeysByDimension { name type partitionKeys }
      assetPartitionStatuses {
        ... on DefaultPartitionStatuses {
          materializedPartitions materializingPartitions failedPartitions
        }
      }
    }
  }
}
"""
PAGES = ("labeled_shards", "coyo_labeled_300m")


def materialize_all(instance, keys: list[str]) -> None:  # noqa: ANN001
    """Record every asset of ``keys``' partitions materialized, in the flow's order, as the
    event log holds them after a full run (runless events: what the UI and automation read)."""
    import dagster as dg

    for asset, partitioned in FLOW:
        for key in keys if partitioned else [None]:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key=asset, partition=key)
            )


class Webserver:
    """``dagster-webserver`` on loopback over an instance's folder and the platform's code."""

    def __init__(self, home: Path, root: str) -> None:
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = {**os.environ, "DAGSTER_HOME": str(home), "COYO_DATA_ROOT": root}
        binary = Path(sys.executable).with_name("dagster-webserver")
        self.process = subprocess.Popen(
            [str(binary), "-m", "coyo_platform.definitions", "-h", "127.0.0.1",
             "-p", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while True:
            try:
                self.query(PAGES[0])
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("dagster-webserver did not start") from None
                time.sleep(0.5)

    def query(self, asset: str) -> tuple[float, dict]:
        import urllib.request

        body = json.dumps(
            {"query": PARTITIONS_PAGE, "variables": {"assetKey": {"path": [asset]}}}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/graphql",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
        return time.perf_counter() - start, answer["data"]["assetNodeOrError"]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def measure_instance(work: Path, sizes: list[int]) -> list[dict]:
    """The default automation condition sensor's tick and the UI's partitions pages, with every
    partition of every asset materialized, as the instance grows to each of ``sizes``."""
    import dagster as dg

    from coyo_platform.definitions import defs
    from coyo_platform.partitions import coyo_parts

    home = work / "dagster_home"
    home.mkdir()
    rows: list[dict] = []
    instance = dg.DagsterInstance.local_temp(str(home))
    server = None
    try:
        have = 0
        for parts in sizes:
            keys = [f"part-{p:05d}" for p in range(have, parts)]
            instance.add_dynamic_partitions(coyo_parts.name, keys)
            materialize_all(instance, keys)
            have = parts
            cursor = None
            for case in ("first tick (no cursor)", "next tick"):
                start = time.perf_counter()
                result = dg.evaluate_automation_conditions(
                    defs=defs, instance=instance, cursor=cursor
                )
                seconds = time.perf_counter() - start
                cursor = result.cursor
                rows.append(
                    {"what": "automation condition sensor", "case": case, "parts": parts,
                     "seconds": seconds, "run_requests": result.total_requested}
                )  # fmt: skip
            server = server or Webserver(home, str(work / "root"))
            for asset in PAGES:
                times = []
                for _ in range(3):
                    seconds, node = server.query(asset)
                    times.append(seconds)
                done = node["assetPartitionStatuses"]["materializedPartitions"]
                assert len(done) == parts, (asset, len(done))
                rows.append(
                    {"what": "partitions page (GraphQL)", "case": asset, "parts": parts,
                     "seconds": min(times), "partitions_materialized": len(done)}
                )  # fmt: skip
    finally:
        if server is not None:
            server.close()
        instance.dispose()
    return rows


def coverage_files(key: str, shards: int, rows: int) -> dict[str, bytes]:
    """A finished, labeled partition whose parquets hold rows (what the check counts): each
    download parquet ``rows`` statuses, nine in ten a success; each label file one row a
    success."""
    import io

    import polars as pl

    def parquet(frame: pl.DataFrame) -> bytes:
        out = io.BytesIO()
        frame.write_parquet(out)
        return out.getvalue()

    ok = rows * 9 // 10
    statuses = parquet(
        pl.DataFrame({"status": ["success"] * ok + ["failed_to_download"] * (rows - ok)})
    )
    labels = parquet(pl.DataFrame({"id": list(range(ok))}))
    files = part_files(key, shards, shards)
    for name in shard_names(shards):
        files[f"downloaded_shards/{key}/{name}.parquet"] = statuses
        files[f"labeled_shards/{LABELER}/{key}/{name}.parquet"] = labels
    return files


def measure_coverage(where, shards: int, rows: int) -> dict:  # noqa: ANN001
    """The ``label_coverage`` check's read of one partition (it runs once a partition, in that
    partition's run: its cost does not depend on how many partitions there are)."""
    from coyo_platform.common.shards import label_coverage
    from coyo_platform.resources import StorageResource

    key = "part-00000"
    where.put(coverage_files(key, shards, rows))
    store = StorageResource(root=where.root, endpoint_url=getattr(where, "endpoint", None)).store()
    before = where.requests()
    start = time.perf_counter()
    got = label_coverage(store, key)
    seconds = time.perf_counter() - start
    assert got.complete and got.downloaded_images == shards * (rows * 9 // 10), got
    after = where.requests()
    made = sum(after.values()) - sum(before.values())
    return {"what": "label_coverage check", "store": where.kind, "shards": shards,
            "seconds": seconds, "requests": made}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="16,64,128", help="partition counts, comma-separated")
    parser.add_argument("--shards", type=int, default=SHARDS, help="finished shards per part")
    parser.add_argument("--stores", default="folder,s3", help="folder, s3 or both")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the tests)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--no-instance", action="store_true", help="skip the automation tick and the webserver"
    )
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
                    ticks = f"; {r['ticks']} ticks in all, the slowest" if "ticks" in r else ""
                    print(f"{r['store']:10s} {parts:4d} parts  {r['sensor']:24s} "
                          f"{r['case']:27s} {r['seconds']:7.2f} s  "
                          f"{r['requests']:6d} requests{kinds}{ticks}")  # fmt: skip
                if kind != "folder":
                    where.drop()
        instance = [] if args.no_instance else measure_instance(Path(work), sizes)
        for r in instance:
            extra = f"{r['run_requests']} runs requested" if "run_requests" in r else (
                f"{r['partitions_materialized']} partitions shown materialized")  # fmt: skip
            print(f"{r['what']:30s} {r['parts']:4d} parts  {r['case']:24s} "
                  f"{r['seconds']:7.2f} s  {extra}")  # fmt: skip
        coverage = []
        for n, kind in enumerate(stores):
            where = (
                Folder(Path(work) / f"coverage-{kind}")
                if kind == "folder"
                else Bucket(server, f"coyo-coverage-{n}")
            )
            coverage.append(measure_coverage(where, shards, 10 if args.quick else SHARD_ROWS))
            r = coverage[-1]
            print(f"{r['what']:30s} {r['store']:10s} one partition of {shards} shards "
                  f"{r['seconds']:7.2f} s  {r['requests']} requests")  # fmt: skip
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    growth(rows, instance, sizes)
    full = [r for r in rows if r["parts"] == max(sizes) and r["store"] != "folder"]
    for r in full:
        if r["sensor"] == "unlabeled_shards_sensor":
            # the tick's first listings one after the other, then its partitions 16 at once
            made = r["requests"] / (r.get("ticks", 2) - 1)  # a tick's, for the later ticks
            rounds = min(made, 3) + max(made - 3, 0) / TODO_THREADS
            low, high = (rounds * x for x in S3_REQUEST_S)
            print(f"target: {r['sensor']} '{r['case']}' on S3 at {max(sizes)} parts under "
                  f"{TICK_TARGET_S3:g} s: {r['seconds']:.1f} s on moto (its server in this "
                  f"process, on this machine's cores); {made:.0f} requests a tick: on S3 "
                  f"{low:.1f}-{high:.1f} s at {S3_REQUEST_S[0] * 1000:.0f}-"
                  f"{S3_REQUEST_S[1] * 1000:.0f} ms a request, {TODO_THREADS} at once "
                  f"({'met' if high < TICK_TARGET_S3 else 'missed'})")  # fmt: skip
    if args.json:
        figures = {"machine": cpu_model(), "rows": rows, "instance": instance,
                   "coverage": coverage}  # fmt: skip
        Path(args.json).write_text(json.dumps(figures, indent=1))


def growth(sensors: list[dict], instance: list[dict], sizes: list[int]) -> None:
    """Each figure at every size against the smallest size."""
    series: dict[tuple, dict[int, float]] = {}
    for r in sensors:
        series.setdefault((r["store"], r["sensor"], r["case"]), {})[r["parts"]] = r["seconds"]
    for r in instance:
        series.setdefault(("", r["what"], r["case"]), {})[r["parts"]] = r["seconds"]
    first = sizes[0]
    print(f"# growth: seconds at {', '.join(map(str, sizes))} partitions, then each / {first}")
    for (store, what, case), by in series.items():
        if first not in by or not by[first]:
            continue
        times = " ".join(f"{by.get(n, float('nan')):7.2f}" for n in sizes)
        ratios = " ".join(f"x{by.get(n, float('nan')) / by[first]:5.1f}" for n in sizes[1:])
        print(f"{store:10s} {what:30s} {case:27s} {times}   {ratios}")


if __name__ == "__main__":
    main()
