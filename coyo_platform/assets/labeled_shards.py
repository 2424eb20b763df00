import dagster as dg

from coyo_platform.assets import GROUP, ONE_PARTITION_PER_RUN, TRANSIENT_RETRIES
from coyo_platform.assets.downloaded_shards import downloaded_shards
from coyo_platform.core.progress import label_coverage as coverage
from coyo_platform.core.storage import DOWNLOADS, LABELS
from coyo_platform.partitions import coyo_parts
from coyo_platform.resources import ComputeResource, StorageResource, program_args


class LabelConfig(dg.Config):
    """Labeler settings (see coyo_platform/worker). ``None`` means the model's own default."""

    preset: str = "coyo"
    """``coyo``: the card's EfficientNetV2-XL pipeline; ``timm``: the model's own eval config."""
    model: str | None = None
    checkpoint: str | None = None
    """Weights: a path, or s3:// / hf:// / https:// (fetched once and cached on the worker);
    without it the model's pretrained weights come from the Hugging Face hub."""
    activation: str | None = None
    image_size: int | None = None
    interpolation: str | None = None
    precision: str = "auto"
    """``auto``: bf16 autocast on CUDA and on CPUs with native bf16, else fp32."""
    batch_size: int | None = None
    """Default 128 on CUDA, 32 on the CPU."""
    num_workers: int | None = None
    device: str = "auto"
    compile: bool = False
    """``torch.compile`` the model: faster once warm, minutes to compile."""
    decode_on_device: bool = False
    """Decode JPEGs on the GPU with nvJPEG (torchvision); pHash still on the CPU."""


def check_label_config(config: LabelConfig) -> None:
    """The worker's own checks of these settings (a model name timm knows, the preset, the
    activation, sizes...), run here before any program or GPU task starts: a typo fails the step
    at once, and is not retried."""
    from coyo_platform.worker.labeler import LabelerSettings  # torch and timm: only when run

    try:
        LabelerSettings(**{k: v for k, v in config.model_dump().items() if v is not None})
    except ValueError as err:
        raise dg.Failure(
            description=f"labeled_shards: bad labeler settings: {err}", allow_retries=False
        ) from err


@dg.asset(
    partitions_def=coyo_parts,
    deps=[downloaded_shards],
    group_name=GROUP,
    kinds={"pytorch"},
    pool="gpu",  # one labeling run per GPU (limit: infra/dagster.yaml, `concurrency set`)
    retry_policy=TRANSIENT_RETRIES,
    backfill_policy=ONE_PARTITION_PER_RUN,
)
def labeled_shards(
    context: dg.AssetExecutionContext,
    config: LabelConfig,
    storage: StorageResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """Top-50 ImageNet-21k labels (card's 21,841 classes) and pHash for every downloaded image."""
    check_label_config(config)
    store, key = storage.store(), context.partition_key
    if not store.glob(store.url(DOWNLOADS, key, "*.tar")):
        raise dg.Failure(
            description=f"no downloaded shards in {store.url(DOWNLOADS, key)}: download first",
            allow_retries=False,
        )
    args = ["--shards", store.url(DOWNLOADS, key), "--output", store.url(LABELS, key)]
    return compute.run_program(
        context, "coyo_platform.worker", args + program_args(config), env=store.env()
    )


@dg.asset_check(asset=labeled_shards, partitions_def=coyo_parts, blocking=True)
def label_coverage(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    """Every downloaded image has its label row (or its failure), every finished shard its
    labels. Blocking: label stats and the subset are not built on incomplete labels."""
    found = coverage(storage.store(), context.partition_key)
    missing = found["unlabeled_shards"]
    return dg.AssetCheckResult(
        passed=not missing and found["label_rows"] == found["downloaded_images"],
        metadata={
            "downloaded_images": found["downloaded_images"],
            "label_rows": found["label_rows"],
            "unlabeled_shards": len(missing),
            "first_unlabeled": ", ".join(missing[:10]) or "none",
        },
    )
