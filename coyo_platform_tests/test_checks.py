"""A blocking check that fails keeps the subset from being built on bad labels."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl

from coyo_platform.assets.coyo_labeled_300m import card_schema, coyo_labeled_300m
from coyo_platform.assets.label_stats import label_stats
from coyo_platform.assets.labeled_shards import label_coverage, labeled_shards
from coyo_platform.resources import LocalCompute, StorageResource
from coyo_platform_tests.conftest import fast_run_config, write_tar

PART = "part-00000"


def test_labels_missing_for_downloaded_images_block_stats_and_subset(site, tmp_path: Path):
    """img2dataset's records say two images were downloaded, the tar holds one (lost on the way):
    the labels cover one, the coverage check fails, and neither stats nor subset is built."""
    shards = tmp_path / "data" / "downloaded_shards" / PART
    shards.mkdir(parents=True)
    photo = next(iter(sorted(site.images.glob("*.jpg")))).read_bytes()
    write_tar(shards / "00000.tar", [("000000000", photo, {"id": 1})])
    pl.DataFrame(
        {"key": ["000000000", "000000001"], "status": ["success", "success"]}
    ).write_parquet(shards / "00000.parquet")
    (shards / "00000_stats.json").write_text("{}")

    resources = {"storage": StorageResource(root=str(tmp_path / "data")), "compute": LocalCompute()}
    config = fast_run_config(site.checkpoint)["ops"]["labeled_shards"]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", [PART])
        result = dg.materialize(
            [labeled_shards, label_stats, coyo_labeled_300m, label_coverage, card_schema],
            selection=[labeled_shards, label_stats, coyo_labeled_300m],
            partition_key=PART,
            instance=instance,
            resources=resources,
            run_config={"ops": {"labeled_shards": config}},
            raise_on_error=False,
        )
    [coverage] = [
        e for e in result.get_asset_check_evaluations() if e.check_name == "label_coverage"
    ]
    assert not coverage.passed
    figures = {k: v.value for k, v in coverage.metadata.items()}
    assert (figures["downloaded_images"], figures["label_rows"]) == (2, 1)
    assert result.asset_materializations_for_node("labeled_shards")
    assert not result.asset_materializations_for_node("label_stats")
    assert not result.asset_materializations_for_node("coyo_labeled_300m")
    assert not (tmp_path / "data" / "coyo_labeled_300m").exists()
