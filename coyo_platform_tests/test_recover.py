"""``retry_failed``: the transient failures of finished shards fetched again, on loopback, with
the real download and label programs. A server answers some URLs 503 for a while (under the
outage share, so the shard is committed with them failed), then recovers; the retry fetches
those rows only, rewrites their shard with its images kept byte for byte, and the label program
labels the new images only. Every count a user cares about: nothing fetched twice, nothing lost,
every id once."""

from __future__ import annotations

import http.server
import io
import json
import subprocess
import tarfile
import threading
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from coyo_platform import demo
from coyo_platform.common import layout, shards
from coyo_platform.common.storage import Storage
from coyo_platform_tests.conftest import download_cmd, label_cmd

HOST = "127.0.0.2"
KEY = "part-00000"
#: Shard 0: three images, two URLs that answer 503 until the server recovers, one 404. Shard 1:
#: six images, nothing to recover.
ROWS = ["ok0", "flaky0", "ok1", "flaky1", "gone0", "ok2"] + [f"ok{i}" for i in range(3, 9)]


class Server:
    """``/ok*`` always an image, ``/flaky*`` 503 while ``down``, ``/gone*`` 404; counts each
    path's answers, by outcome."""

    def __init__(self, photo: bytes) -> None:
        self.down = True
        self.hits: Counter = Counter()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                name = self.path.strip("/").removesuffix(".jpg")
                if name.startswith("gone") or (name.startswith("flaky") and outer.down):
                    outer.hits[name, "failed"] += 1
                    self.send_error(404 if name.startswith("gone") else 503)
                    return
                outer.hits[name, "image"] += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(photo)))
                self.end_headers()
                self.wfile.write(photo)

            def log_message(self, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def images(self, name: str) -> int:
        return self.hits[name, "image"]


@pytest.fixture
def server(site):
    photo = (site.images / "astronaut.jpg").read_bytes()
    running = Server(photo)
    yield running
    running.http.shutdown()
    running.http.server_close()


def _part(tmp: Path, base: str) -> Path:
    frame = demo.make_part(tmp, [demo.Item("x.jpg", "photo")], "http://unused", len(ROWS), 10**12)
    frame = frame.with_columns(
        pl.Series("url", [f"{base}/{name}.jpg" for name in ROWS]),
        pl.Series("image_phash", [None] * len(ROWS), dtype=pl.String),
    )
    path = tmp / "part.parquet"
    frame.write_parquet(path)
    return path


def _download(part: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = download_cmd(
        part, out, "--number-sample-per-shard", "6", "--retries", "0", "--timeout", "2",
        "--thread-count", "4", "--allow-networks", f"{HOST}/32", *extra,
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _report(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout[done.stdout.index("{") :])


def _label(site, out: Path, labels: Path) -> dict:
    cmd = label_cmd(out, labels, site.checkpoint, "--num-workers", "1", "--batch-size", "4")
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def _tar_ids(folder: Path) -> list[int]:
    ids = []
    for tar in sorted(folder.glob("*.tar")):
        ids += [json.loads(v)["id"] for k, v in _members(tar).items() if k.endswith(".json")]
    return ids


def test_retry_failed_recovers_only_transient_failures_and_labels_only_the_new_images(
    site, server: Server, tmp_path: Path
):
    root = tmp_path / "data"
    out, labels = root / layout.DOWNLOADS / KEY, root / layout.LABELS
    part = _part(tmp_path, server.url)
    ids = pl.read_parquet(part)["id"].to_list()

    first = _report(_download(part, out))
    assert (first["succeeded"], first["transient_failures"]) == (9, 2)
    rows = pl.read_parquet(out / "00000.parquet")
    flaky = rows.filter(pl.col("transient"))["url"].str.extract(r"/(\w+)\.jpg")
    assert sorted(flaky) == ["flaky0", "flaky1"]
    shard0, shard1 = _members(out / "00000.tar"), (out / "00001.tar").read_bytes()
    untouched = {p.name: p.stat().st_mtime_ns for p in out.glob("00001*")}
    labeled = _label(site, out, labels)
    assert labeled["images_labeled"] == 9
    [folder] = [p for p in labels.glob(f"*/{KEY}")]
    labels0 = pl.read_parquet(folder / "00000.parquet")
    labels1 = (folder / "00001.parquet").read_bytes()

    server.down = False
    retry = _download(part, out, "--retry-failed")
    report = _report(retry)
    assert (report["retried"], report["recovered"], report["shards_revised"]) == (2, 2, 1)
    assert (report["succeeded"], report["transient_failures"]) == (11, 0)
    assert "shard 00000: 2 of 2 rows fetched again are images now" in retry.stderr

    # nothing fetched twice: every image once, the 404s never again, the 503s once more
    for name in ROWS:
        assert server.images(name) == (0 if name.startswith("gone") else 1), name
    assert server.hits["gone0", "failed"] == 1
    assert server.hits["flaky0", "failed"] == server.hits["flaky1", "failed"] == 1
    # nothing lost, every id once: in the parquets (every row) and the tars (every image)
    rows = pl.concat([pl.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
    assert sorted(rows["id"]) == sorted(ids)
    assert sorted(_tar_ids(out)) == sorted(rows.filter(pl.col("status") == "success")["id"])
    assert rows.filter(pl.col("url").str.contains("gone"))["status"].to_list() == [
        "failed_to_download"
    ]
    # the shard's images kept byte for byte, in order, the new ones after them
    now = _members(out / "00000.tar")
    assert list(now)[: len(shard0)] == list(shard0)
    assert {k: now[k] for k in shard0} == shard0
    assert len(now) == len(shard0) + 2 * 3  # image, caption and json for each new image
    assert (out / "00001.tar").read_bytes() == shard1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("00001*")} == untouched
    stats = json.loads((out / "00000_stats.json").read_text())
    assert (stats["revision"], stats["successes"], stats["count"]) == (1, 5, 6)
    assert json.loads((out / layout.REVISIONS).read_text()) == {"00000": 1}

    # what the sensor sees: shard 00000's labels lack its new images
    store = Storage(str(root))
    assert shards.unlabeled(store, KEY) == ["00000"]
    assert shards.labeling_todo(store, KEY).missing == ["00000"]

    relabeled = _label(site, out, labels)
    assert (relabeled["images_labeled"], relabeled["shards_relabeled"]) == (2, 1)
    after = pl.read_parquet(folder / "00000.parquet")
    images0 = pl.read_parquet(out / "00000.parquet").filter(pl.col("status") == "success")
    assert sorted(after["id"]) == sorted(images0["id"])
    assert after.height == after["id"].n_unique() == 5
    old = after.filter(pl.col("key").is_in(labels0["key"].to_list()))
    assert old.sort("key").equals(labels0.sort("key"))  # the labels it had, kept as they were
    assert (folder / "00001.parquet").read_bytes() == labels1
    assert json.loads((folder / layout.REVISIONS).read_text()) == {"00000": 1}
    assert shards.unlabeled(store, KEY) == []
    assert shards.label_coverage(store, KEY).complete

    # a second retry and a second label run find nothing to do
    hits = dict(server.hits)
    again = _report(_download(part, out, "--retry-failed"))
    assert (again["retried"], again["recovered"]) == (0, 0)
    assert dict(server.hits) == hits
    assert _label(site, out, labels)["images_labeled"] == 0


def test_a_rewrite_cut_short_after_its_tar_is_finished_by_the_next_retry(
    site, server: Server, tmp_path: Path
):
    """A retry killed after its tar moved into place, before its parquet: the tar has the new
    images' members, the parquet still says they failed, the rewrite marker is left. A label run
    then labels what the tar holds. The next retry, with the sites still down, rewrites the
    shard anyway: the members the parquet does not know are gone, and the next label run drops
    their labels. With the sites back, the rows are recovered; every key once throughout."""
    root = tmp_path / "data"
    out, labels = root / layout.DOWNLOADS / KEY, root / layout.LABELS
    part = _part(tmp_path, server.url)
    _download(part, out)
    rows = pl.read_parquet(out / "00000.parquet")
    [key, *_] = rows.filter(pl.col("transient"))["key"].to_list()
    tar = out / "00000.tar"
    with tarfile.open(tar, "a") as t:  # what the killed retry had moved into place
        for ext, data in (("jpg", b"\xff\xd8stale"), ("json", b'{"id": -1}')):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    (out / f"00000{layout.REWRITE}").write_text('{"revision": 1}')
    _label(site, out, labels)
    [folder] = list(labels.glob(f"*/{KEY}"))
    assert key in pl.read_parquet(folder / "00000.parquet")["key"].to_list()

    still_down = _report(_download(part, out, "--retry-failed"))
    assert (still_down["recovered"], still_down["shards_revised"]) == (0, 1)
    assert key not in {m.split(".")[0] for m in _members(tar)}  # dropped: the parquet's word
    assert not (out / f"00000{layout.REWRITE}").exists()
    assert json.loads((out / "00000_stats.json").read_text())["revision"] == 2
    _label(site, out, labels)
    labeled = pl.read_parquet(folder / "00000.parquet")
    assert key not in labeled["key"].to_list()  # no label for an image no longer in the tar
    assert sorted(labeled["key"]) == sorted({m.split(".")[0] for m in _members(tar)})

    server.down = False
    _download(part, out, "--retry-failed")
    names = list(_members(tar))
    assert len(names) == len(set(names))
    assert _members(tar)[f"{key}.jpg"] != b"\xff\xd8stale"
    images = pl.concat([pl.read_parquet(p) for p in out.glob("*.parquet")]).filter(
        pl.col("status") == "success"
    )
    assert sorted(_tar_ids(out)) == sorted(images["id"].to_list())
    _label(site, out, labels)
    assert shards.label_coverage(Storage(str(root)), KEY).complete


def test_a_rewrite_cut_short_after_its_parquet_is_labeled_and_finished(
    site, server: Server, tmp_path: Path
):
    """A retry killed after its tar and parquet moved, before its ``_stats.json`` and before the
    partition's record: the labeler still sees the new revision (the parquet's, read before the
    tar) and labels the new images; the next download run counts the shard's ``_stats.json``
    again from its parquet and records the revision."""
    root = tmp_path / "data"
    out, labels = root / layout.DOWNLOADS / KEY, root / layout.LABELS
    part = _part(tmp_path, server.url)
    _download(part, out)
    _label(site, out, labels)
    old_stats = (out / "00000_stats.json").read_bytes()
    server.down = False
    _download(part, out, "--retry-failed")
    (out / "00000_stats.json").write_bytes(old_stats)  # as if the last move never happened
    (out / layout.REVISIONS).unlink()
    (out / f"00000{layout.REWRITE}").write_text('{"revision": 1}')
    store = Storage(str(root))
    assert shards.revisions_read_first(store, str(out), ["00000", "00001"]) == {"00000": 1}

    relabeled = _label(site, out, labels)
    assert (relabeled["images_labeled"], relabeled["shards_relabeled"]) == (2, 1)
    plain = _report(_download(part, out))
    assert plain["succeeded"] == 11
    stats = json.loads((out / "00000_stats.json").read_text())
    assert (stats["revision"], stats["successes"]) == (1, 5)
    assert json.loads((out / layout.REVISIONS).read_text()) == {"00000": 1}
    assert not (out / f"00000{layout.REWRITE}").exists()
    assert shards.label_coverage(store, KEY).complete


def test_the_sensor_asks_again_for_a_shard_revised_twice(tmp_path: Path):
    """The labeling run key names each missing shard's revision: the same shard revised a second
    time is a new request, not a repeat the sensor would drop."""
    store = Storage(str(tmp_path))
    folder = Path(layout.shards(store, KEY))
    folder.mkdir(parents=True)
    (folder / "00000_stats.json").write_text("{}")
    keys = []
    for revision in (1, 2):
        (folder / layout.REVISIONS).write_text(json.dumps({"00000": revision}))
        todo = shards.labeling_todo(store, KEY)
        assert todo.missing == ["00000"]
        keys.append(todo.run_key)
    assert keys[0] != keys[1]


def test_the_ui_job_recovers_with_the_partitions_own_settings_and_the_sensor_labels_the_rest(
    site, server: Server, tmp_path: Path
):
    """Through Dagster, as from the UI: the part downloaded with 6 rows a shard; the
    ``coyo_retry_failed`` job, launched with its own config (retry_failed, and the default
    10,000 rows a shard), recovers with the partition's recorded settings instead of refusing
    them; the download's data version changes, and the labeling sensor asks for the one shard
    whose labels lack images, with the partition's label settings, though its cursor had the
    partition as finished."""
    import dagster as dg

    from coyo_platform.assets.coyo700m_metadata import coyo700m_metadata
    from coyo_platform.assets.downloaded_shards import downloaded_shards
    from coyo_platform.assets.labeled_shards import labeled_shards
    from coyo_platform.definitions import coyo_retry_failed, local_resources
    from coyo_platform.resources import StorageResource
    from coyo_platform.sensors import unlabeled_shards_sensor
    from coyo_platform_tests.conftest import fast_run_config

    source, root = tmp_path / "source", tmp_path / "data"
    source.mkdir()
    _part(tmp_path, server.url).rename(source / f"{KEY}.parquet")
    resources = local_resources(source=str(source), data_root=str(root))
    network = {"processes_count": 1, "thread_count": 4, "retries": 0, "timeout": 2,
               "allow_networks": [f"{HOST}/32"]}  # fmt: skip
    config = fast_run_config(site.checkpoint)
    config["ops"]["downloaded_shards"]["config"] = {**network, "number_sample_per_shard": 6}
    assets = [coyo700m_metadata, downloaded_shards, labeled_shards]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [KEY])
        first = dg.materialize(
            assets, partition_key=KEY, instance=instance, resources=resources, run_config=config
        )
        [made] = first.asset_materializations_for_node("downloaded_shards")
        assert made.metadata["transient_failures"].value == 2
        storage = StorageResource(root=str(root))
        tick = dg.build_sensor_context(instance=instance, resources={"storage": storage})
        assert isinstance(unlabeled_shards_sensor(tick), dg.SkipReason)
        assert KEY in json.loads(tick.cursor)["settled"]  # finished: skipped from now on

        server.down = False
        job = dg.Definitions(assets=assets, jobs=[coyo_retry_failed], resources=resources)
        retry_job = job.resolve_job_def("coyo_retry_failed")
        ui_config = coyo_retry_failed.config  # what the launchpad shows
        assert ui_config["ops"]["downloaded_shards"]["config"] == {"retry_failed": True}
        ui_config = {"ops": {"downloaded_shards": {"config": {"retry_failed": True, **network}}}}
        retry = retry_job.execute_in_process(
            partition_key=KEY, instance=instance, run_config=ui_config
        )
        [done] = retry.asset_materializations_for_node("downloaded_shards")
        assert (done.metadata["recovered"].value, done.metadata["succeeded"].value) == (2, 11)
        assert done.tags["dagster/data_version"] != made.tags["dagster/data_version"]

        tick = dg.build_sensor_context(
            instance=instance, resources={"storage": storage}, cursor=tick.cursor
        )
        ticked = unlabeled_shards_sensor(tick)
        [request] = ticked.run_requests
        assert request.partition_key == KEY
        assert request.tags["coyo/unlabeled_shards"] == "1"
        label_config = request.run_config["ops"]["labeled_shards"]["config"]
        assert label_config["checkpoint"] == str(site.checkpoint)
        relabel = dg.materialize(
            [labeled_shards], partition_key=KEY, instance=instance, resources=resources,
            run_config=request.run_config,
        )  # fmt: skip
        [labeled] = relabel.asset_materializations_for_node("labeled_shards")
        assert labeled.metadata["images_labeled"].value == 2
        assert labeled.metadata["shards_relabeled"].value == 1
