import dagster as dg

from coyo_platform.assets import (
    GROUP,
    ONE_PARTITION_PER_RUN,
    TRANSIENT_RETRIES,
    bad_input,
    code_version,
    config_for,
    settings_or_fail,
)
from coyo_platform.assets.downloaded_shards import downloaded_shards
from coyo_platform.common import layout, shards
from coyo_platform.common.settings import to_arguments
from coyo_platform.label.settings import LabelSettings
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import ComputeResource, StorageResource

LabelConfig = config_for(LabelSettings, "LabelConfig")


@dg.asset(
    partitions_def=coyo_parts,
    deps=[downloaded_shards],
    group_name=GROUP,
    kinds={"pytorch"},
    pool="gpu",  # one labeling run per GPU (limit: infra/dagster.yaml, `concurrency set`)
    retry_policy=TRANSIENT_RETRIES,
    backfill_policy=ONE_PARTITION_PER_RUN,
    code_version=code_version("labeled_shards", LabelSettings),
)
def labeled_shards(
    context: dg.AssetExecutionContext,
    config: LabelConfig,
    storage: StorageResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """Top-50 ImageNet-21k labels (card's 21,841 classes) for every downloaded image, with the
    downloader's pHash as its ``imagehash``, in the label set of this labeler
    (``labeled_shards/<labeler id>/<part>/``), which then becomes the partition's current one;
    another labeler's labels are never reused or overwritten."""
    # the label program's own checks (a model name timm knows, the preset, sizes...), here, before
    # any program or GPU task starts: a typo fails the step at once, and is not retried
    settings_or_fail(config, "labeled_shards")
    store, key = storage.store(), context.partition_key
    folder = layout.shards(store, key)
    if not shards.tars(store, folder):
        raise bad_input(f"no downloaded shards in {folder}: download first")
    args = ["--shards", folder, "--output", layout.label_sets(store), "--part", key]
    return compute.run_program(
        context, "label", args + to_arguments(config.model_dump()), env=store.env()
    )


@dg.asset_check(asset=labeled_shards, partitions_def=coyo_parts, blocking=True)
def label_coverage(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """Every downloaded image has its label row (or its failure), every finished shard its
    labels. Blocking: label stats and the subset are not built on incomplete labels."""
    store = storage.store()
    found = shards.label_coverage(store, context.partition_key)
    return dg.AssetCheckResult(
        passed=found.complete,
        metadata={
            "labeler": shards.current_labeler(store, context.partition_key) or "none",
            "downloaded_images": found.downloaded_images,
            "label_rows": found.label_rows,
            "unlabeled_shards": len(found.unlabeled_shards),
            "first_unlabeled": ", ".join(found.unlabeled_shards[:10]) or "none",
        },
    )
