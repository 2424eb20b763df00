"""S3 faults on real traffic: s3fs, polars, boto3 and the label program talk to moto's S3 server
through a proxy that throttles (503 SlowDown, 429 ThrottlingException) or drops a write mid-body
(``faults.FaultProxy``). Throttling and a server stopped mid-upload are retried with backoff, by
the settings in ``common.storage``; a write that never completes leaves no object, so nothing
half-written can count as done; the label program's shards come out as they do without faults."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import subprocess
from pathlib import Path

import boto3
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import BotoCoreError

from coyo_platform.common import storage
from coyo_platform.common.storage import Storage
from coyo_platform_tests.conftest import label_cmd, label_parquets, photo_shards
from coyo_platform_tests.faults import FaultProxy

THROTTLES = {
    "503 SlowDown": (503, "SlowDown"),
    "429 ThrottlingException": (429, "ThrottlingException"),
}
TABLE = pa.table({"id": list(range(1000)), "key": [f"k{i:05d}" for i in range(1000)]})


@pytest.fixture
def proxy(s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch):
    """The proxy in front of moto; ``AWS_ENDPOINT_URL`` points every client (subprocesses too)
    at it, with the throwaway credentials ``s3_bucket`` set."""
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.fixture
def store(proxy: FaultProxy, s3_bucket: str) -> Storage:
    return Storage(f"s3://{s3_bucket}/coyo", endpoint_url=proxy.url)


class Bucket:
    """What is really in the bucket: boto3 straight to moto, past the proxy."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.client, self.name = boto3.client("s3", endpoint_url=endpoint), name

    def objects(self, prefix: str) -> dict[str, bytes]:
        listed = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix).get("Contents", [])
        get = self.client.get_object
        return {o["Key"]: get(Bucket=self.name, Key=o["Key"])["Body"].read() for o in listed}

    def uploads_in_progress(self) -> list:
        return self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])


@pytest.fixture
def bucket(s3_endpoint: str, s3_bucket: str) -> Bucket:
    return Bucket(s3_endpoint, s3_bucket)


def _key(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[1]


def _botocore_attempt(proxy: FaultProxy, method: str) -> str:
    """botocore's numbering of the request of ``method`` that got through after the last fault."""
    requests = proxy.matching(method)
    last_fault = max(i for i, r in enumerate(requests) if r.outcome != "passed")
    passed = next(r for r in requests[last_fault + 1 :] if r.outcome == "passed")
    return passed.headers["amz-sdk-request"]


@pytest.mark.parametrize("throttle", THROTTLES)
def test_throttled_writes_are_retried_by_the_configured_policy(throttle, proxy, store, bucket):
    status, code = THROTTLES[throttle]
    data = os.urandom(200_000)
    proxy.throttle(2, methods=["PUT"], status=status, code=code)
    store.write_bytes(store.url("a.bin"), data)
    assert (proxy.count("PUT", "throttled"), proxy.count("PUT", "passed")) == (2, 1)
    # botocore itself retried (its 3rd attempt) under the configured budget
    assert _botocore_attempt(proxy, "PUT") == f"attempt=3; max={storage.S3_MAX_ATTEMPTS}"

    proxy.throttle(2, methods=["PUT"], status=status, code=code)
    store.write_parquet(store.url("t.parquet"), TABLE)
    assert (proxy.count("PUT", "throttled"), proxy.count("PUT", "passed")) == (4, 2)

    written = bucket.objects(_key(store.root))
    assert written[_key(store.url("a.bin"))] == data
    assert pq.read_table(io.BytesIO(written[_key(store.url("t.parquet"))])).equals(TABLE)
    assert len(written) == 2


def test_write_cut_mid_body_is_sent_again_whole(proxy, store, bucket):
    data = os.urandom(1 << 20)  # 1 MiB: the proxy drops the connection after 512 KiB
    proxy.cut_writes(2)
    store.write_bytes(store.url("a.bin"), data)
    assert (proxy.count("PUT", "cut"), proxy.count("PUT", "passed")) == (2, 1)
    assert bucket.objects(_key(store.root)) == {_key(store.url("a.bin")): data}
    assert bucket.uploads_in_progress() == []


@pytest.mark.parametrize("fault", ["cut", "throttle"])
def test_write_failing_past_the_retry_budget_raises_and_leaves_no_object(
    fault, proxy, s3_bucket, bucket, monkeypatch
):
    """A fault that outlasts every retry: the write raises, and a reader sees no object at a new
    key and the old object, untouched, at an existing one. The budget is small here (2 botocore
    attempts, 2 s3fs rounds) to keep the backoff short; the test checks it is the one spent."""
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "S3FS_RETRIES", 2)
    store = Storage(f"s3://{s3_bucket}/coyo", endpoint_url=proxy.url)
    old, new = os.urandom(300_000), os.urandom(300_000)
    store.write_bytes(store.url("old.bin"), old)
    budget = storage.S3_MAX_ATTEMPTS * storage.S3FS_RETRIES

    for name in ("new.bin", "old.bin"):
        proxy.pass_through()
        before = len(proxy.requests)
        if fault == "cut":
            proxy.cut_writes(math.inf)
            # ConnectionClosedError, or EndpointConnectionError when the reset lands mid-send
            with pytest.raises(BotoCoreError) as raised:
                store.write_bytes(store.url(name), new)
            assert _key(store.url(name)) in str(raised.value)  # names the URL that failed
        else:
            proxy.throttle(math.inf, methods=["PUT"])
            with pytest.raises(OSError, match="reduce your request rate") as raised:
                store.write_bytes(store.url(name), new)
            assert raised.value.errno == errno.EBUSY
        tried = [r for r in proxy.requests[before:] if r.method == "PUT"]
        assert all(r.outcome != "passed" for r in tried)
        # every attempt of the budget was made; aiohttp may resend a write once on its own when a
        # reused connection drops, so a cut can cost up to two requests per attempt
        assert budget <= len(tried) <= (2 * budget if fault == "cut" else budget)

    proxy.pass_through()
    assert bucket.objects(_key(store.root)) == {_key(store.url("old.bin")): old}
    assert bucket.uploads_in_progress() == []
    assert not store.exists(store.url("new.bin"))
    assert store.glob(store.url("*")) == [store.url("old.bin")]


@pytest.mark.parametrize("throttle", THROTTLES)
def test_throttled_reads_listings_and_scans_are_retried(throttle, proxy, store):
    status, code = THROTTLES[throttle]
    value = {"shards": 3, "ids": [1, 2, 3]}
    store.write_json(store.url("stats", "a.json"), value)
    store.write_parquet(store.url("stats", "t.parquet"), TABLE)
    # a HEAD's error has no body, so no code: 429 alone is not a throttling reply botocore knows
    methods = ["GET", "HEAD"] if status == 503 else ["GET"]

    proxy.throttle(2, methods=methods, status=status, code=code)
    assert store.read_json(store.url("stats", "a.json")) == value
    assert proxy.count(outcome="throttled") == 2

    proxy.throttle(2, methods=["GET"], status=status, code=code)
    listed = store.glob(store.url("stats", "*"))
    assert listed == [store.url("stats", "a.json"), store.url("stats", "t.parquet")]
    assert proxy.count(outcome="throttled") == 4
    assert _botocore_attempt(proxy, "GET") == f"attempt=3; max={storage.S3_MAX_ATTEMPTS}"

    proxy.throttle(2, methods=["GET", "HEAD"], status=status, code=code)  # polars' own client
    scanned = store.scan_parquet(store.url("stats", "t.parquet")).collect()
    assert scanned.equals(pl.from_arrow(TABLE))
    assert proxy.count(outcome="throttled") == 6


def test_stale_temp_files_of_killed_local_writes_are_removed(tmp_path: Path, s3_bucket):
    store = Storage(str(tmp_path / "root"))
    url = store.url("labeled_shards", "part-00000", "00001.parquet")
    store.write_bytes(url, b"whole")
    folder = Path(url).parent
    for name in ("00001.parquet.tmp-0a1b", "00002.parquet.tmp-9f8e"):  # what a SIGKILL leaves
        (folder / name).write_bytes(b"half")

    assert store.remove_stale_temp(url) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["00001.parquet", "00002.parquet.tmp-9f8e"]
    assert store.remove_stale_temp(store.url("labeled_shards", "*", "*")) == 1
    assert [p.name for p in folder.iterdir()] == ["00001.parquet"]
    assert Path(url).read_bytes() == b"whole"
    assert store.remove_stale_temp(url) == 0
    # on S3 a write leaves no temporary object to clean
    assert Storage(f"s3://{s3_bucket}/coyo").remove_stale_temp(f"s3://{s3_bucket}/coyo/x") == 0


def test_failed_local_write_leaves_no_temp_file(tmp_path: Path, monkeypatch):
    store = Storage(str(tmp_path))
    store.write_bytes(store.url("a.bin"), b"old")

    def no_rename(src, dst):
        raise OSError(errno.EIO, "disk gone")

    monkeypatch.setattr(storage.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        store.write_bytes(store.url("a.bin"), b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    assert (tmp_path / "a.bin").read_bytes() == b"old"


# -- the label program, end to end --------------------------------------------------------------

SHARDS, PER_SHARD = 2, 4


def test_label_program_through_throttling_and_a_cut_write_labels_as_without_faults(
    site, tmp_path: Path, proxy, s3_bucket, s3_endpoint, bucket
):
    shards = photo_shards(site, tmp_path / "shards", SHARDS, PER_SHARD)

    def label(out) -> list[str]:
        return label_cmd(shards, out, site.checkpoint, "--num-workers", "0")

    clean = tmp_path / "clean"  # the same program, no S3, no faults
    subprocess.run(label(clean), capture_output=True, check=True)

    out = f"s3://{s3_bucket}/coyo/labeled_shards"
    proxy.throttle(1, methods=["HEAD", "GET"])  # its "already labeled?" checks
    proxy.throttle(2, methods=["PUT"])  # then a shard's upload: throttled twice,
    proxy.cut_writes(1)  # then cut mid-body
    done = subprocess.run(label(out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["shards_labeled"] == SHARDS
    assert proxy.count(outcome="throttled") == 3 and proxy.count("PUT", "cut") == 1
    # the shards, and three small records: the labeler's, the downloads', the current set
    assert proxy.count("PUT", "passed") == SHARDS + 3

    written = {  # only whole shards, each once, nothing else
        k: v for k, v in bucket.objects(_key(out)).items() if not k.endswith(".json")
    }
    assert sorted(Path(k).name for k in written) == [f"{s:05d}.parquet" for s in range(SHARDS)]
    on_s3 = pl.concat([pl.read_parquet(io.BytesIO(b)) for b in written.values()]).sort("id")
    expected = pl.read_parquet(label_parquets(clean)).sort("id")
    assert on_s3.equals(expected)
    assert on_s3["id"].to_list() == sorted(
        s * 100 + i for s in range(SHARDS) for i in range(PER_SHARD)
    )
    assert on_s3["error"].null_count() == on_s3.height
