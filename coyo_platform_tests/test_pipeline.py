"""The whole graph for one partition: a real HTTP server on loopback, img2dataset, the label
program as a real subprocess through Dagster Pipes, stats and the subset in the card's exact
schema. Both tests read the session's one pipeline run (``conftest.pipeline_run``)."""

from __future__ import annotations

import json

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from coyo_platform.assets.label_stats_rollup import label_stats_rollup
from coyo_platform.common.formats import CARD_SCHEMA
from coyo_platform.common.labelspace import NUM_CLASSES
from coyo_platform.common.shards import label_files
from coyo_platform.common.storage import Storage
from coyo_platform.definitions import PIPELINE
from coyo_platform.sample.rules import DEFAULT_THRESHOLD
from coyo_platform_tests.conftest import (
    PART,
    ROWS,
    SHARD_SIZE,
    PipelineRun,
    expected_outcomes,
    fast_run_config,
)

EXPECTED_REASONS = {
    "http 404": "download: http 404",
    "connection refused": "download: connection refused",
    "not an image": "not an image",
    "truncated": "not an image",
    "image too small": "resize: image too small",
    "aspect ratio too large": "resize: aspect ratio too large",
}


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [mat] = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}


def _hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def test_one_partition_end_to_end(pipeline_run: PipelineRun, site):
    result, root = pipeline_run.result, pipeline_run.root
    assert result.success
    part = pl.read_parquet(next(pipeline_run.source.glob("part-00000-*.parquet")))
    outcomes = expected_outcomes(part, site.items)
    photos = outcomes.pop("photo")

    # downloads: every row attempted, failures counted by reason
    download = _metadata(result, "downloaded_shards")
    assert download["attempted"] == ROWS
    assert download["succeeded"] == photos
    expected_failures: dict[str, int] = {}
    for kind, n in outcomes.items():
        reason = EXPECTED_REASONS[kind]
        expected_failures[reason] = expected_failures.get(reason, 0) + n
    assert download["failures"] == expected_failures
    assert download["shards"] == -(-ROWS // SHARD_SIZE)
    # nothing blocked (the image server is allow-listed); every photo is the one the crawl saw
    assert download["blocked"] == 0
    assert download["drifted"] == 0 and download["drift_rate"] == 0.0
    assert download["phash_compared"] >= photos
    assert download["bytes_written"] > 0
    # and the record that tells the labeling sensor the partition is downloaded in full
    complete = root / "downloaded_shards" / "_complete" / f"{PART}.json"
    assert json.loads(complete.read_text()) == {"shards": download["shards"], "revisions": {}}

    # labels: every downloaded image labeled, nothing failed
    labels = _metadata(result, "labeled_shards")
    assert labels["images_labeled"] == photos
    assert labels["images_failed"] == 0
    assert labels["device"] == "cpu"

    # the subset: exactly the card's schema, ids from the part, no duplicates
    subset_path = root / "coyo_labeled_300m" / f"{PART}.parquet"
    table = pq.read_table(subset_path)
    assert table.schema.equals(CARD_SCHEMA, check_metadata=False)
    assert [f.name for f in table.schema] == [
        "id", "url", "imagehash", "labels", "label_probs", "width", "height"
    ]  # fmt: skip
    subset = pl.from_arrow(table)
    assert subset.height > 0
    assert subset["id"].is_unique().all()
    joined = subset.join(part, on="id", how="left", suffix="_src")
    assert joined["url_src"].null_count() == 0, "every id must be one of the part's ids"
    assert (joined["url"] == joined["url_src"]).all(), "url joined on id, not on row position"
    # width/height: the downloaded image's original size, which the demo part also records
    assert (joined["width"] == joined["width_src"]).all()
    assert (joined["height"] == joined["height_src"]).all()
    # imagehash: the pHash of the downloaded image, close to the crawl's pHash of the same file
    distances = [
        _hamming(a, b) for a, b in zip(joined["imagehash"], joined["image_phash"], strict=True)
    ]
    assert all(len(h) == 16 for h in subset["imagehash"])
    assert max(distances) <= 10, distances
    # one pHash per image: the subset's imagehash is the downloader's pHash of the original
    downloaded = pl.read_parquet(sorted((root / "downloaded_shards" / PART).glob("*.parquet")))
    hashes = subset.join(downloaded.select("id", "phash"), on="id", how="left")
    assert hashes["phash"].null_count() == 0
    assert (hashes["imagehash"] == hashes["phash"]).all()

    for labels_row, probs_row in zip(subset["labels"], subset["label_probs"], strict=True):
        assert len(labels_row) == 50 and len(probs_row) == 50
        assert all(0 <= i < NUM_CLASSES for i in labels_row)
        assert len(set(labels_row)) == 50
        assert list(probs_row) == sorted(probs_row, reverse=True)
        assert probs_row[0] >= DEFAULT_THRESHOLD

    # the subset is exactly the labeled rows that clear the threshold
    labeled = pl.read_parquet(label_files(Storage(str(root)), PART))
    clear = labeled.filter(pl.col("label_probs").list.first() >= DEFAULT_THRESHOLD)
    assert sorted(subset["id"]) == sorted(clear["id"])
    assert _metadata(result, "coyo_labeled_300m")["rows"] == subset.height

    # label stats: the card's five thresholds over every labeled image
    stats = _metadata(result, "label_stats")
    assert stats["images_labeled"] == photos
    rows = [r.data["threshold"] for r in stats["threshold_table"].records]
    for t in ("0.05", "0.10", "0.15", "0.20", "0.25"):
        assert t in rows
    assert "top-1 images" in [c.name for c in stats["top1_classes"].schema.columns]

    # the checks a user looks at first all pass, with their figures
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert {name: e.passed for name, e in checks.items()} == {
        "download_success_rate": True, "label_coverage": True, "card_schema": True
    }  # fmt: skip
    coverage = {k: v.value for k, v in checks["label_coverage"].metadata.items()}
    assert coverage["downloaded_images"] == coverage["label_rows"] == photos


def test_rerun_resumes_and_rollup_sums_partitions(pipeline_run: PipelineRun, site):
    resources, instance = pipeline_run.resources, pipeline_run.instance
    first = _metadata(pipeline_run.result, "downloaded_shards")
    again = dg.materialize(
        PIPELINE[1:3],
        partition_key=PART,
        instance=instance,
        resources=resources,
        run_config=fast_run_config(site.checkpoint),
    )
    download = _metadata(again, "downloaded_shards")
    assert download["shards_this_run"] == 0, "done shards must not be downloaded again"
    assert download["succeeded"] == first["succeeded"]
    labels = _metadata(again, "labeled_shards")
    assert labels["shards_labeled"] == 0
    assert labels["shards_skipped"] == first["shards"]

    rollup = dg.materialize([label_stats_rollup], instance=instance, resources=resources)
    meta = _metadata(rollup, "label_stats_rollup")
    assert meta["partitions"] == 1
    assert meta["images_labeled"] == first["succeeded"]
