"""The whole graph for a partition with the storage root on S3 (a real S3 API on loopback, moto's
server), reached through ``AWS_ENDPOINT_URL`` or through the storage resource's own setting, gives
the same outputs as on a local folder."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import boto3
import dagster as dg
import pytest

from coyo_platform.assets.label_stats_rollup import label_stats_rollup
from coyo_platform.common.shards import label_files
from coyo_platform.common.storage import Storage
from coyo_platform.definitions import PIPELINE, local_resources
from coyo_platform.resources import StorageResource
from coyo_platform_tests.conftest import PART, PipelineRun, fast_run_config


def _run(site, source: Path, resources: dict) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [PART])
        result = dg.materialize(
            PIPELINE,
            partition_key=PART,
            instance=instance,
            resources=resources,
            run_config=fast_run_config(site.checkpoint),
        )
        assert result.success
        assert dg.materialize([label_stats_rollup], instance=instance, resources=resources).success
        return result


def _outputs(store: Storage) -> dict:
    """What a consumer reads back: the subset, the labels (minus run-specific keys), the stats."""
    subset = store.scan_parquet(store.url("coyo_labeled_300m", f"{PART}.parquet")).collect()
    labels = store.scan_parquet(label_files(store, PART))
    return {
        "subset": subset.sort("id"),
        "labels": labels.collect().drop("key").sort("id"),
        "stats": store.read_json(store.url("label_stats", f"{PART}.json")),
        "rollup": store.read_json(store.url("label_stats", "_all_partitions.json")),
        "shards": sorted(
            Path(p).name for p in store.glob(store.url("downloaded_shards", PART, "*"))
        ),
    }


@pytest.fixture(scope="module")
def folder_outputs(pipeline_run: PipelineRun) -> dict:
    """The same parts (same rows, same image server) run on a local folder: the session's run."""
    return _outputs(pipeline_run.resources["storage"].store())


@pytest.mark.parametrize("endpoint", ["AWS_ENDPOINT_URL", "endpoint_url setting"])
def test_pipeline_on_s3_matches_the_folder_run(
    endpoint, site, source, s3_bucket, s3_endpoint, folder_outputs, monkeypatch
):
    root = f"s3://{s3_bucket}/coyo"
    resources = local_resources(source=str(source), data_root=root)
    if endpoint == "endpoint_url setting":
        monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the resource knows where S3 is
        resources["storage"] = StorageResource(root=root, endpoint_url=s3_endpoint)
    result = _run(site, source, resources)

    on_s3 = _outputs(resources["storage"].store())
    for name in ("subset", "labels"):
        assert on_s3[name].equals(folder_outputs[name]), name
    assert on_s3["stats"] == folder_outputs["stats"]
    assert on_s3["rollup"] == folder_outputs["rollup"]
    assert on_s3["shards"] == folder_outputs["shards"]

    # and it all really is in the bucket: no local fallback folder was written
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert f"coyo/coyo_labeled_300m/{PART}.parquet" in keys
    assert f"coyo/coyo700m_metadata/{PART}.parquet" in keys
    assert any(k.startswith("coyo/labeled_shards/") and f"/{PART}/" in k for k in keys)
    assert not any(".tmp-" in k for k in keys)
    assert not Path("s3:").exists(), "something wrote an s3:// URL as a local path"

    # on S3 the stats chart shows inline in the UI: a presigned address that serves the PNG
    [stats] = result.asset_materializations_for_node("label_stats")
    link = stats.metadata["chart_image"].value.split("](", 1)[1].rstrip(")")
    assert link.startswith(s3_endpoint) or link.startswith("https://")
    assert urllib.request.urlopen(link).read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_s_listing_matches_fsspec_glob_on_s3_and_on_disk(s3_bucket: str, tmp_path: Path):
    """``Storage.glob`` lists a folder once where the wildcards are in the last part; it finds
    what fsspec's own glob finds (files, a subfolder, names with dots), on S3 and on a disk, and
    nothing in a folder that is not there."""
    import fsspec

    names = ["00000.tar", "00000.parquet", "00000_stats.json", "00001.tar", "_fingerprint.json"]
    names += ["_crawl_dedup/dropped.parquet", "00001.tar.tmp-ab12"]
    stores = [Storage(f"s3://{s3_bucket}/run"), Storage(str(tmp_path / "run"))]
    for store in stores:
        for name in names:
            store.write_bytes(store.url("downloaded_shards", "part-00000", name), b"x")
        folder = store.url("downloaded_shards", "part-00000")
        fs = fsspec.core.url_to_fs(store.root)[0]
        protocol = "" if store.is_local else "s3://"
        for pattern in ("*_stats.json", "*.tar", "*", "_*", "0000?.parquet", "*.tmp-*"):
            got = store.glob(f"{folder}/{pattern}")
            expected = sorted(protocol + p for p in fs.glob(f"{folder}/{pattern}"))
            assert got == expected, pattern
            assert got and all(p.startswith(f"{folder}/") for p in got), pattern
        assert store.glob(store.url("downloaded_shards", "part-00009", "*.tar")) == []
        assert store.glob(f"{folder}/00000.tar/*") == []  # a file is not a folder
        assert store.read_json_if_exists(store.url("nothing.json")) is None
        store.write_json(store.url("a.json"), {"b": 1})
        assert store.read_json(store.url("a.json")) == {"b": 1}
