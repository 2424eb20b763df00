"""Label webdataset shards with a timm ImageNet-21k model: top 50 of the card's 21,841 classes.

The recipe is timm's (``create_model`` -> ``resolve_data_config`` -> ``create_transform`` ->
``eval()`` -> ``inference_mode``), with the whole image resized to the model's test size and no
crop (``crop_mode='squash'``, ``crop_pct=1.0``), as EfficientNetV2's own evaluation does. The
model's 21,843 outputs go through the activation (``sigmoid`` by default: the card's probabilities
sum past 1, so they are not softmax), are mapped to the 21,841 fall11 classes
(``core.labelspace``), and the top 50 are kept.

Shards stream through a ``DataLoader``: each loader process reads whole tars, decodes, hashes and
resizes; the main process batches them through the model and writes one parquet per shard, whole
or not at all. A shard whose parquet exists is skipped, so a rerun finishes only what is missing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import imagehash
import pyarrow as pa
import torch
from PIL import Image

from coyo_platform.core.labelspace import NUM_MODEL_OUTPUTS, goog_to_fall11
from coyo_platform.core.schema import TOP_K
from coyo_platform.core.storage import Storage

DEFAULT_MODEL = "tf_efficientnetv2_xl.in21k"
ACTIVATIONS = ("sigmoid", "softmax")

#: Named settings bundles; a preset fills only the settings left unset (None).
#:
#: ``coyo`` reproduces the card's pipeline: EfficientNetV2-XL trained on ImageNet-21k, evaluated as
#: google/automl's EfficientNetV2 eval does it: the whole image resized to 512x512 (no crop) with
#: *bilinear* interpolation (automl's eval preprocessing uses tf.image.resize's bilinear default;
#: timm's pretrained_cfg says bicubic, which is timm's own choice), then (x - 0.5) / 0.5, i.e.
#: automl's (x - 128) / 128. Activation ``sigmoid``: the card's example probabilities sum to 1.0276,
#: which softmax cannot give, and Google published these ImageNet-21k checkpoints as sigmoid-loss
#: checkpoints "for multi-class pseudo labeling".
#:
#: ``timm`` uses the model's own timm eval config (test size, interpolation, mean/std), still with
#: the whole image squashed (no crop), and sigmoid unless ``activation`` says softmax (timm's own
#: inference.py always applies softmax; pick that for softmax-trained checkpoints).
PRESETS: dict[str, dict[str, Any]] = {
    "coyo": {
        "model": DEFAULT_MODEL,
        "image_size": 512,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "activation": "sigmoid",
    },
    "timm": {"model": DEFAULT_MODEL, "activation": "sigmoid"},
}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

LABELED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("imagehash", pa.string()),
        pa.field("labels", pa.list_(pa.int32())),
        pa.field("label_probs", pa.list_(pa.float32())),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("error", pa.string()),
    ]
)


@dataclass
class LabelerSettings:
    """How to label. Settings left ``None`` come from the preset, then from the model's own
    timm eval config."""

    preset: str = "coyo"
    model: str | None = None
    checkpoint: str | None = None
    image_size: int | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    activation: str | None = None
    batch_size: int = 32
    num_workers: int = field(default_factory=lambda: max(1, min(8, (os.cpu_count() or 2) - 1)))
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def load_model(settings: LabelerSettings) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in eval mode and its data config (with the settings' overrides applied)."""
    import timm
    from timm.data import resolve_data_config

    if settings.checkpoint:
        try:
            model = timm.create_model(
                settings.model,
                pretrained=False,
                num_classes=NUM_MODEL_OUTPUTS,
                checkpoint_path=settings.checkpoint,
            )
        except RuntimeError as exc:
            raise ValueError(
                f"checkpoint {settings.checkpoint} does not fit {settings.model} with "
                f"{NUM_MODEL_OUTPUTS} outputs: {str(exc).splitlines()[0]}"
            ) from exc
    else:
        model = timm.create_model(settings.model, pretrained=True)
    if model.num_classes != NUM_MODEL_OUTPUTS:
        raise ValueError(
            f"model {settings.model} has {model.num_classes} outputs; the labeler needs "
            f"{NUM_MODEL_OUTPUTS} (ImageNet-21k in Google's ordering, e.g. {DEFAULT_MODEL})"
        )
    config = resolve_data_config(model=model, use_test_size=True)
    if settings.image_size:
        config["input_size"] = (3, settings.image_size, settings.image_size)
    if settings.interpolation:
        config["interpolation"] = settings.interpolation
    if settings.mean:
        config["mean"] = tuple(settings.mean)
    if settings.std:
        config["std"] = tuple(settings.std)
    config["crop_pct"], config["crop_mode"] = 1.0, "squash"
    return model.eval(), config


def build_transform(config: dict[str, Any]):
    """timm's eval transform for ``config``: whole image squashed to the input size, no crop."""
    from timm.data import create_transform

    return create_transform(**config, is_training=False)


def _iter_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a webdataset tar, streamed in order."""
    current, members = None, {}
    with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = os.path.basename(info.name).partition(".")
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[ext.lower()] = tar.extractfile(info).read()
    if current is not None:
        yield current, members


def _decode(shard: str, key: str, members: dict[str, bytes], transform) -> dict[str, Any]:
    meta = json.loads(members["json"]) if "json" in members else {}
    record: dict[str, Any] = {
        "shard": shard,
        "key": key,
        "id": meta.get("id"),
        "width": meta.get("original_width"),
        "height": meta.get("original_height"),
        "imagehash": None,
        "tensor": None,
        "error": None,
    }
    data = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if record["id"] is None:
        record["error"] = "sample has no id in its json"
    elif data is None:
        record["error"] = "sample has no image"
    else:
        try:
            with Image.open(io.BytesIO(data)) as img:
                rgb = img.convert("RGB")
            record["imagehash"] = str(imagehash.phash(rgb))
            record["tensor"] = transform(rgb)
        except Exception as exc:  # any decoder failure is a per-image result, not a crash
            record["error"] = f"decode: {type(exc).__name__}: {str(exc)[:120]}"
    return record


class ShardSamples(torch.utils.data.IterableDataset):
    """Decoded samples of whole shards; each loader process takes every n-th shard. After a
    shard's last sample comes an end marker, so the consumer knows the shard is complete."""

    def __init__(self, shards: list[str], config: dict[str, Any]) -> None:
        self.shards = shards
        self.config = config

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        transform = build_transform(self.config)
        for url in mine:
            shard = shard_name(url)
            for key, members in _iter_tar_samples(url):
                yield _decode(shard, key, members, transform)
            yield {"shard": shard, "end": True}


def _collate(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    tensors = [r.pop("tensor") for r in records if r.get("tensor") is not None]
    return records, (torch.stack(tensors) if tensors else None)


def failure_reason(error: str) -> str:
    """``decode: OSError: image file is truncated`` -> ``decode: OSError``."""
    return ": ".join(error.split(": ")[:2])


def shard_name(url: str) -> str:
    return os.path.basename(url).rsplit(".", 1)[0]


@dataclass
class LabelSummary:
    labeled: int = 0
    failed: int = 0
    failed_by_reason: Counter = field(default_factory=Counter)
    shards_done: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.labeled / self.seconds if self.seconds > 0 else 0.0


def _shard_table(rows: list[dict[str, Any]]) -> pa.Table:
    rows.sort(key=lambda r: r["key"])
    return pa.Table.from_pylist(
        [{name: r.get(name) for name in LABELED_SCHEMA.names} for r in rows], schema=LABELED_SCHEMA
    )


def label_shards(
    shards_dir: str,
    output_dir: str,
    settings: LabelerSettings,
    log: logging.Logger | None = None,
) -> LabelSummary:
    """Label every ``*.tar`` under ``shards_dir`` that has no parquet under ``output_dir`` yet."""
    log = log or logging.getLogger(__name__)
    source, out = Storage(shards_dir), Storage(output_dir)
    all_shards = source.glob(f"{source.root}/*.tar")
    todo = [s for s in all_shards if not out.exists(out.url(shard_name(s) + ".parquet"))]
    summary = LabelSummary(shards_skipped=len(all_shards) - len(todo))
    log.info(f"{len(all_shards)} shards, {summary.shards_skipped} already labeled")
    if not todo:
        return summary

    device = settings.resolved_device()
    model, config = load_model(settings)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    index = torch.as_tensor(goog_to_fall11(), device=device)
    activation = torch.sigmoid if settings.activation == "sigmoid" else lambda x: x.softmax(-1)
    loader = torch.utils.data.DataLoader(
        ShardSamples(todo, config),
        batch_size=settings.batch_size,
        num_workers=min(settings.num_workers, len(todo)),
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
    start = time.monotonic()
    with torch.inference_mode():
        for records, batch in loader:
            if batch is not None:
                batch = batch.to(device, non_blocking=True)
                if device.type == "cuda":
                    batch = batch.to(memory_format=torch.channels_last)
                with torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
                ):
                    logits = model(batch)
                probs = activation(logits.float()).index_select(1, index)
                values, labels = probs.topk(TOP_K, dim=1)
                values, labels = values.cpu().tolist(), labels.cpu().int().tolist()
            images = iter(range(len(records)))
            for record in records:
                if record.get("end"):
                    rows = pending.pop(record["shard"], [])
                    out.write_parquet(out.url(record["shard"] + ".parquet"), _shard_table(rows))
                    summary.shards_done += 1
                    log.info(f"shard {record['shard']}: {len(rows)} samples labeled")
                    continue
                if record["error"] is None:
                    i = next(images)
                    record["labels"], record["label_probs"] = labels[i], values[i]
                    summary.labeled += 1
                else:
                    summary.failed += 1
                    summary.failed_by_reason[failure_reason(record["error"])] += 1
                pending[record["shard"]].append(record)
    summary.seconds = time.monotonic() - start
    return summary
