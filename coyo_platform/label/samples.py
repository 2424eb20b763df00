"""Downloaded shards as batches for the model: whole tars read in loader processes, each image
decoded and handed over as a uint8 tensor (its own pixels for automl's resize on the device, or
timm's eval transform in prefetcher form), batched within its shard. The image's pHash is not
computed here: ``imagehash`` is the downloader's pHash of the original image, from the sample's
json (one pHash per image, the same in the download parquet, the labels and the subset).
A sample that cannot be used is a record with its ``error``; a tar that cannot be read ends its
shard with the error instead. Imports no ``dagster``."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from coyo_platform.common import layout
from coyo_platform.common.storage import Storage
from coyo_platform.common.tars import image_member, iter_tar_samples


def build_transform(config: dict[str, Any]):
    """What the loader hands over for ``config``: with ``resize="automl"``, the image's own
    pixels as a uint8 CHW tensor (the device resizes it, in float32, as automl's eval does);
    else timm's eval transform in its prefetcher form, the whole image squashed to the input
    size (no crop). Normalization happens on the device either way."""
    if config.get("resize") == "automl":
        return original_pixels
    from timm.data import create_transform

    timm_config = {k: v for k, v in config.items() if k != "resize"}
    return create_transform(**timm_config, is_training=False, use_prefetcher=True)


def original_pixels(rgb: Image.Image) -> torch.Tensor:
    """An RGB image as a uint8 CHW tensor, at its own size."""
    import numpy as np

    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def jpeg_pixels(data: bytes) -> torch.Tensor:
    """An RGB or greyscale JPEG as a uint8 RGB CHW tensor, at its own size: torchvision's
    libjpeg-turbo decode, the same pixels as PIL's ``convert("RGB")`` (identical on the 300
    benchmark photos and a greyscale JPEG; a test checks it), without PIL's image or the CHW
    copy (``make bench``'s (d): benchmarks/RESULTS.md)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)


def decode(
    shard: str, key: str, members: dict[str, bytes], transform, jpeg_on_device: bool
) -> dict[str, Any]:
    """One sample's record: ``id``, original ``width``/``height``, ``imagehash`` (the
    downloader's pHash of the original, from the sample's json) and the model
    ``input`` (a uint8 CHW tensor, or the JPEG's bytes to decode on the device), or its
    ``error``."""
    record: dict[str, Any] = {
        "shard": shard,
        "key": key,
        "id": None,
        "width": None,
        "height": None,
        "imagehash": None,
        "input": None,
        "error": None,
    }
    try:
        meta = json.loads(members.get("json", b"{}"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        record["error"] = f"sample json: {type(exc).__name__}: {str(exc)[:120]}"
        return record
    record.update(
        id=meta.get("id"),
        width=meta.get("original_width"),
        height=meta.get("original_height"),
        imagehash=meta.get("phash"),
    )
    found = image_member(members)
    data = None if found is None else found[1]
    if record["id"] is None:
        record["error"] = "sample has no id in its json"
    elif data is None:
        record["error"] = "sample has no image"
    else:
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only, so far
                is_jpeg, mode = img.format == "JPEG", img.mode
                turbo = transform is original_pixels and is_jpeg and mode in ("RGB", "L")
                # a JPEG for the device is still decoded here once: a broken one is this
                # image's error, not a failure of the device's batch
                rgb = None if turbo and not jpeg_on_device else img.convert("RGB")
            if jpeg_on_device and is_jpeg:
                record["input"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            elif rgb is None:
                record["input"] = jpeg_pixels(data)
            else:
                record["input"] = transform(rgb)
        except Exception as exc:  # any decoder failure is a per-image result, not a crash
            record["error"] = f"decode: {type(exc).__name__}: {str(exc)[:120]}"
    return record


class ShardSamples(torch.utils.data.IterableDataset):
    """Batches of decoded samples of whole shards, ``(records, inputs)`` as :func:`collate`
    gives them; each loader process takes every n-th shard. A batch never spans two shards: a
    shard's images go in batches of ``batch_size`` and its last, shorter batch ends with an end
    marker record, so the consumer knows the shard is complete, and a resumed run batches every
    shard exactly as an uninterrupted one (the results' bits depend on the batch on some CPUs). A
    tar that cannot be read to its end gives an end marker with the error instead. Of a shard in
    ``existing`` (labeled before ``retry_failed`` added images to it), only the samples without
    a row in its labels are decoded and given, and its end marker lists every key in the tar."""

    def __init__(
        self,
        shards: list[str],
        config: dict[str, Any],
        jpeg_on_device: bool,
        batch_size: int,
        existing: dict[str, str] | None = None,
    ) -> None:
        self.shards = shards
        self.config = config
        self.jpeg_on_device = jpeg_on_device
        self.batch_size = batch_size
        self.existing = existing or {}  # shard -> its labels so far: only other samples are read

    def __iter__(self) -> Iterator[tuple[list[dict[str, Any]], Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        transform = build_transform(self.config)
        for url in mine:
            shard = layout.shard_name(url)
            records: list[dict[str, Any]] = []
            images = 0
            try:
                known = labeled_keys(self.existing[shard]) if shard in self.existing else set()
                in_tar: list[str] = []
                for key, members in iter_tar_samples(url):
                    in_tar.append(key)
                    if key in known:
                        continue
                    record = decode(shard, key, members, transform, self.jpeg_on_device)
                    records.append(record)
                    images += record["input"] is not None
                    if images == self.batch_size:
                        yield collate(records)
                        records, images = [], 0
            except (tarfile.TarError, OSError, EOFError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                yield collate([*records, {"shard": shard, "end": True, "error": error}])
                continue
            end: dict[str, Any] = {"shard": shard, "end": True}
            if shard in self.existing:  # the labels kept are those of samples still in the tar
                end["keys"] = in_tar
            yield collate([*records, end])


def labeled_keys(url: str) -> set[str]:
    """The sample keys a labeled shard has rows for."""
    import pyarrow.parquet as pq

    with Storage(url.rsplit("/", 1)[0]).fs.open(url, "rb") as fh:
        return set(pq.read_table(fh, columns=["key"]).column("key").to_pylist())


def collate(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """Records without their pixels, and the model inputs in record order: one uint8 NCHW tensor
    (stacked here, in the loader process, so that it is pinned as one block), or a list of
    uint8 CHW tensors of their own sizes (``resize="automl"``) and raw JPEG bytes to decode on
    the device."""
    inputs = [r.pop("input") for r in records if r.get("input") is not None]
    if inputs and all(t.dim() == 3 and t.shape == inputs[0].shape for t in inputs):
        return records, torch.stack(inputs)
    return records, inputs


def batches(item: tuple[list[dict[str, Any]], Any]) -> tuple[list[dict[str, Any]], Any]:
    """The ``DataLoader``'s ``collate_fn``: the dataset yields whole batches already."""
    return item
