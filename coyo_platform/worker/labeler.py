"""Label webdataset shards with a timm ImageNet-21k model: top 50 of the card's 21,841 classes.

Exact: the recipe is timm's (``create_model`` -> ``resolve_data_config`` -> ``create_transform``
-> ``eval()`` -> ``inference_mode``), with the whole image resized to the model's test size and no
crop (``crop_mode='squash'``, ``crop_pct=1.0``), as EfficientNetV2's own evaluation does. The
model's 21,843 outputs go through the activation (``sigmoid`` by default: the card's probabilities
sum past 1, so they are not softmax), are mapped to the 21,841 fall11 classes
(``core.labelspace``), and the top 50 are kept.

Fast: shards stream through a ``DataLoader`` whose processes read whole tars, decode, hash (pHash)
and resize, handing over uint8 tensors (a quarter of float32's bytes) in pinned memory. The main
process copies them to the device without blocking, normalizes there (as timm's prefetcher does),
runs the model in bf16 autocast and channels_last, and only collects a batch's top 50 after the
next batch has been queued, so the device never waits for Python. A writer thread turns finished
shards into parquet and writes them (local disk or S3) while labeling goes on. Memory holds only
the shards in flight, never a partition.

Resumable: one parquet per shard, written whole or not at all; a shard whose parquet exists is
skipped, so a killed worker, rerun, finishes only what is missing. A broken image is a row with its
``error``; an unreadable tar writes nothing and is named in the run's failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import re
import resource
import tarfile
import threading
import time
import uuid
import warnings
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
from coyo_platform.core.progress import finished_in
from coyo_platform.core.schema import TOP_K
from coyo_platform.core.storage import Storage

DEFAULT_MODEL = "tf_efficientnetv2_xl.in21k"
ACTIVATIONS = ("sigmoid", "softmax")
PRECISIONS = ("auto", "bf16", "fp32")
#: Batch sizes used when ``batch_size`` is not set. CUDA: 128, an estimate not yet measured on a
#: GPU: EfficientNetV2-XL at 512 in inference frees activations layer by layer, and its largest
#: layer output is 4.2M values per image (8 MB in bf16; counted with forward hooks on the CPU), so
#: with a few alive at once 128 images need a few GB, plus about 1 GB of weights: it fits 16 GB
#: cards and leaves an H100 room. ``benchmarks/labeler.py --gpu`` reports the measured peak.
#: CPU: 32; larger batches buy nothing there.
DEFAULT_BATCH = {"cuda": 128, "cpu": 32}
CHECKPOINT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "coyo_platform", "checkpoints")

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

#: How labeled shards are written: read back whole by label stats and the subset, so for read
#: speed: lz4 and no dictionary pages (500k synthetic rows on the 2-core dev machine: polars read
#: them in 0.88 s against 1.75 s for zstd with dictionaries, for 12% more bytes). The subset, the
#: product, stays zstd.
LABELED_FILE_OPTIONS = {"compression": "lz4", "use_dictionary": False}

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


def _default_workers() -> int:
    return max(1, min(32, (os.cpu_count() or 2) - 1))


@dataclass
class LabelerSettings:
    """How to label. Settings left ``None`` come from the preset, then from the model's own
    timm eval config."""

    preset: str = "coyo"
    model: str | None = None
    checkpoint: str | None = None
    """Weights: a local path, or any fsspec URL (``s3://``, ``hf://``, ``https://``), fetched
    once into ``checkpoint_cache``. ``None``: the model's pretrained weights from the hub."""
    image_size: int | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    activation: str | None = None
    precision: str = "auto"
    """``auto``: bf16 autocast on CUDA and on CPUs with native bf16, else fp32."""
    batch_size: int | None = None
    num_workers: int = field(default_factory=_default_workers)
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False
    """``torch.compile`` the model (minutes of warm-up; partial batches are padded so that one
    graph serves the whole run)."""
    decode_on_device: bool = False
    """Decode JPEGs and resize on the model's device with torchvision (nvJPEG on CUDA). The pHash
    is still computed on the CPU from a full decode, so ``imagehash`` does not change; this only
    takes the resize off the loader processes."""
    checkpoint_cache: str = CHECKPOINT_CACHE

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if (self.batch_size is not None and self.batch_size < 1) or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        check_model_name(self.model)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_batch_size(self, device: torch.device) -> int:
        return self.batch_size or DEFAULT_BATCH.get(device.type, DEFAULT_BATCH["cpu"])

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 for autocast, or None for plain fp32."""
        if self.precision == "fp32":
            return None
        if self.precision == "bf16":
            return torch.bfloat16
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        if device.type == "cpu":
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        return None


def local_checkpoint(url: str, cache_dir: str = CHECKPOINT_CACHE) -> str:
    """A local file holding the weights at ``url``: a path is used as it is; ``s3://``, ``hf://``,
    ``https://`` ... are copied once into ``cache_dir`` (keyed by URL and ETag/size, written
    atomically), so every later run and every loader process reads the local copy."""
    if "://" not in url or url.startswith("file://"):
        local = url.removeprefix("file://")
        if not os.path.isfile(local):
            raise FileNotFoundError(f"checkpoint {url}: no such file")
        return local
    fs, remote = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(remote)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {url}: no such object") from None
    version = info.get("ETag") or info.get("etag") or info.get("size")
    tag = hashlib.sha256(f"{url}\n{version}".encode()).hexdigest()[:16]
    dest = os.path.join(cache_dir, tag, os.path.basename(remote.rstrip("/")))
    if not os.path.isfile(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
        try:
            fs.get_file(remote, tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def load_model(settings: LabelerSettings) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in eval mode and its data config (with the settings' overrides applied).

    A checkpoint is read as plain weights only (:func:`read_weights`: no pickled code runs) and
    must have the labeler's 21,843 outputs; either problem is a ``ValueError`` naming the file.
    """
    import timm
    from timm.data import resolve_data_config

    check_model_name(settings.model)
    if settings.checkpoint:
        checkpoint = local_checkpoint(settings.checkpoint, settings.checkpoint_cache)
        state_dict = read_weights(checkpoint, settings.checkpoint)
        model = timm.create_model(settings.model, pretrained=False, num_classes=NUM_MODEL_OUTPUTS)
        found = _classifier_outputs(model, state_dict)
        fit = (
            f"checkpoint {settings.checkpoint} does not fit {settings.model} "
            f"with {NUM_MODEL_OUTPUTS} outputs"
        )
        if found is not None and found[1] != NUM_MODEL_OUTPUTS:
            raise ValueError(
                f"{fit}: its classifier ({found[0]}) has {found[1]:,} outputs; the labeler needs "
                f"{NUM_MODEL_OUTPUTS:,} (ImageNet-21k in Google's ordering, e.g. {DEFAULT_MODEL})"
            )
        try:
            model.load_state_dict(state_dict)  # strict, as timm's checkpoint_path loading is
        except RuntimeError as exc:
            raise ValueError(f"{fit}: {_first_lines(exc)}") from exc
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


#: Model names that name a source rather than a timm architecture; they are checked when loaded.
MODEL_SOURCES = ("hf-hub:", "hf_hub:", "local-dir:")


def check_model_name(name: str | None) -> str:
    """``name`` if timm knows it (the architecture, and the pretrained tag when one is given);
    else a ``ValueError`` naming it and the closest names timm has. Cheap: no model is built."""
    import difflib

    import timm

    if not name:
        raise ValueError("no model given: set a timm model name such as " + DEFAULT_MODEL)
    if name.startswith(MODEL_SOURCES):
        return name
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}: timm {timm.__version__} has no {arch!r}{hint}")
    if tag:
        tagged = timm.list_models(arch, pretrained=True)
        if name not in tagged:
            known = ", ".join(tagged) or "none"
            raise ValueError(
                f"unknown model {name!r}: no pretrained tag {tag!r}; {arch} has: {known}"
            )
    return name


def read_weights(path: str, shown: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in a local checkpoint file, read without running any pickled code:
    ``.safetensors``, or a torch file that ``torch.load(weights_only=True)`` accepts (plain
    tensors and containers). timm's ``load_state_dict`` reads it (and takes a training
    checkpoint's EMA, ``state_dict`` or ``model`` entry). ``shown`` names the file in errors.

    Raises:
        ValueError: the file needs pickled code (an object, a function) to load, and is refused;
            or it is not weights at all.
    """
    from timm.models import load_state_dict

    shown = shown or path
    try:
        return load_state_dict(path, weights_only=True)  # explicit: never a full unpickle
    except Exception as exc:
        unsafe = _unsafe_globals(exc)
        if unsafe:
            raise ValueError(
                f"checkpoint {shown}: refused: loading it needs pickled code "
                f"({', '.join(unsafe)}), which is never run; save the weights as safetensors or "
                "as a plain state_dict (torch.save(model.state_dict(), path))"
            ) from exc
        raise ValueError(
            f"checkpoint {shown}: cannot be read as weights (safetensors, or a plain state_dict "
            f"that torch.load(weights_only=True) accepts; nothing else is unpickled): "
            f"{_first_lines(exc)}"
        ) from exc


def _unsafe_globals(exc: BaseException | None) -> list[str]:
    """The globals a ``weights_only`` load refused, as torch names them in its error chain
    (``Unsupported global: GLOBAL io.open ...``, ``... unsupported GLOBAL posix.system whose
    module posix is blocked``)."""
    found: set[str] = set()
    while exc is not None:
        found.update(re.findall(r"\bGLOBAL ([\w.]+\w)", str(exc)))
        exc = exc.__cause__ or exc.__context__
    return sorted(found)


def _first_lines(exc: BaseException, limit: int = 300) -> str:
    """The innermost error in short: torch's ``Unsupported ...`` or ``size mismatch`` line, else
    its first two lines (``Error(s) in loading state_dict ...: Missing key(s) ...``)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if "Unsupported" in line or "size mismatch" in line]
    text = telling[0] if telling else " ".join(lines[:2]) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _classifier_outputs(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> tuple[str, int] | None:
    """(key, outputs) of the checkpoint's classifier, the layer timm names for the model."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    for name in (names,) if isinstance(names, str) else names:
        for key in (f"{name}.weight", f"{name}.bias"):
            value = state_dict.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return key, int(value.shape[0])
    return None


def build_transform(config: dict[str, Any]):
    """timm's eval transform for ``config`` in its prefetcher form: the whole image squashed to
    the input size (no crop), as a uint8 CHW tensor; normalization happens on the device."""
    from timm.data import create_transform

    return create_transform(**config, is_training=False, use_prefetcher=True)


def _iter_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a webdataset tar, streamed in order."""
    current, members = None, {}
    # through Storage: S3 reads get its retry settings (throttling, dropped connections)
    fs = Storage(url.rsplit("/", 1)[0]).fs
    with fs.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
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


def _decode(
    shard: str, key: str, members: dict[str, bytes], transform, jpeg_on_device: bool
) -> dict[str, Any]:
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
        id=meta.get("id"), width=meta.get("original_width"), height=meta.get("original_height")
    )
    data = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if record["id"] is None:
        record["error"] = "sample has no id in its json"
    elif data is None:
        record["error"] = "sample has no image"
    else:
        try:
            with Image.open(io.BytesIO(data)) as img:
                is_jpeg = img.format == "JPEG"
                rgb = img.convert("RGB")
            record["imagehash"] = str(imagehash.phash(rgb))
            if jpeg_on_device and is_jpeg:
                record["input"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                record["input"] = transform(rgb)
        except Exception as exc:  # any decoder failure is a per-image result, not a crash
            record["error"] = f"decode: {type(exc).__name__}: {str(exc)[:120]}"
    return record


class ShardSamples(torch.utils.data.IterableDataset):
    """Decoded samples of whole shards; each loader process takes every n-th shard. After a
    shard's last sample comes an end marker, so the consumer knows the shard is complete; a tar
    that cannot be read to its end gives an end marker with the error instead."""

    def __init__(self, shards: list[str], config: dict[str, Any], jpeg_on_device: bool) -> None:
        self.shards = shards
        self.config = config
        self.jpeg_on_device = jpeg_on_device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        transform = build_transform(self.config)
        for url in mine:
            shard = shard_name(url)
            try:
                for key, members in _iter_tar_samples(url):
                    yield _decode(shard, key, members, transform, self.jpeg_on_device)
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield {"shard": shard, "end": True, "error": f"{type(exc).__name__}: {exc}"}
                continue
            yield {"shard": shard, "end": True}


def _collate(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """Records without their pixels, and the model inputs in record order: one uint8 NCHW tensor
    (stacked here, in the loader process, so that it is pinned as one block), or a list mixing
    uint8 CHW tensors and raw JPEG bytes to decode on the device."""
    inputs = [r.pop("input") for r in records if r.get("input") is not None]
    if inputs and all(t.dim() == 3 for t in inputs):
        return records, torch.stack(inputs)
    return records, inputs


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
    unreadable_shards: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    """Wall time from the first batch in to the last shard written."""
    warmup_seconds: float = 0.0
    """Model load (and fetch), loader start and, with ``compile``, compilation: until the first
    batch's labels are out."""
    steady_images: int = 0
    steady_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    """Peak resident memory of the labeling process (loader processes not included)."""
    peak_device_memory_mb: float | None = None

    @property
    def images_per_second(self) -> float:
        """Throughput after the first batch, so model load and compile do not count."""
        if self.steady_seconds > 0 and self.steady_images > 0:
            return self.steady_images / self.steady_seconds
        return self.labeled / self.seconds if self.seconds > 0 else 0.0


def _shard_table(rows: list[dict[str, Any]]) -> pa.Table:
    rows.sort(key=lambda r: r["key"])
    return pa.Table.from_pylist(
        [{name: r.get(name) for name in LABELED_SCHEMA.names} for r in rows], schema=LABELED_SCHEMA
    )


class ShardWriter:
    """Builds and writes finished shards' parquet on a background thread, so the model never
    waits for parquet encoding or an S3 upload. ``close`` waits for every write and raises the
    first write error, if any."""

    def __init__(self, out: Storage, depth: int = 16) -> None:
        self._out = out
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.written: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            shard, rows = item
            if self._error is not None:
                continue
            try:
                self._out.write_parquet(
                    self._out.url(shard + ".parquet"), _shard_table(rows), **LABELED_FILE_OPTIONS
                )
                self.written.put((shard, len(rows)))
            except BaseException as exc:  # handed to the main thread
                self._error = exc

    def submit(self, shard: str, rows: list[dict[str, Any]]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((shard, rows))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class ModelStep:
    """The model on its device, fed uint8 batches; ``launch`` queues a batch and returns at once
    (on CUDA), ``collect`` waits for that batch's top 50."""

    def __init__(self, settings: LabelerSettings, device: torch.device) -> None:
        model, self.config = load_model(settings)
        self.device = device
        self.dtype = settings.autocast_dtype(device)
        self.batch_size = settings.resolved_batch_size(device)
        self.memory_format = torch.channels_last if settings.channels_last else None
        model = model.to(device)
        if self.memory_format:
            model = model.to(memory_format=self.memory_format)
        self.compiled = settings.compile
        self.model = torch.compile(model, dynamic=False) if settings.compile else model
        self.index = torch.as_tensor(goog_to_fall11(), device=device)
        self.activation = settings.activation
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor([255 * m for m in self.config["mean"]], device=device).view(shape)
        self.std = torch.tensor([255 * s for s in self.config["std"]], device=device).view(shape)
        self.size = self.config["input_size"][1:]
        self.copy_stream = None
        if device.type == "cuda":
            torch.cuda.set_device(device)  # current streams and events below are this device's
            torch.backends.cudnn.benchmark = True  # one input size for the whole run
            self.copy_stream = torch.cuda.Stream(device)
        self._transform = None

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        """Host to device on a side stream (CUDA), so the copy overlaps the previous batch."""
        if self.copy_stream is None:
            return x.to(self.device, non_blocking=True)
        with torch.cuda.stream(self.copy_stream):
            y = x.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copy_stream)
        y.record_stream(compute)
        return y

    def _decode_jpegs(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        """RGB uint8 CHW tensors on the device. nvJPEG decodes on its own stream, which does not
        wait for ours, into memory our queued kernels may still use: so the compute stream is
        drained first. A batch nvJPEG rejects is decoded image by image, and an image it rejects
        goes through the CPU path (PIL and timm's transform), which accepted it already."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated
            try:
                return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                pass
            out = []
            for data in jpegs:
                try:
                    out.extend(decode_jpeg([data], mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    if self._transform is None:
                        self._transform = build_transform(self.config)
                    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                        out.append(self._transform(img.convert("RGB")).to(self.device))
            return out

    def _on_device(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """uint8 NCHW on the device; JPEG bytes are decoded and resized there."""
        if isinstance(inputs, torch.Tensor):
            return self._copy(inputs)
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2.functional import resize

        jpegs = [i for i, t in enumerate(inputs) if t.dim() == 1]
        decoded = self._decode_jpegs([inputs[i] for i in jpegs])
        mode = InterpolationMode(self.config["interpolation"])
        out = [self._copy(t) if t.dim() == 3 else t for t in inputs]
        for i, img in zip(jpegs, decoded, strict=True):
            if tuple(img.shape[1:]) != tuple(self.size):
                img = resize(img, list(self.size), interpolation=mode, antialias=True)
            out[i] = img
        return torch.stack(out)

    def launch(
        self, inputs: torch.Tensor | list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        n = len(inputs)
        x = self._on_device(inputs)
        if self.compiled and n < self.batch_size:  # one static shape: pad the last batch
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        x = x.float().sub_(self.mean).div_(self.std)
        if self.memory_format:
            x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(x)[:n]
        logits = logits.float()
        probs = logits.sigmoid() if self.activation == "sigmoid" else logits.softmax(-1)
        values, labels = probs.index_select(1, self.index).topk(TOP_K, dim=1)
        labels = labels.int()
        if self.device.type != "cuda":
            return values, labels, None
        host_values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host_labels = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=True)
        host_values.copy_(values, non_blocking=True)
        host_labels.copy_(labels, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return host_values, host_labels, done

    @staticmethod
    def collect(launched: tuple[torch.Tensor, torch.Tensor, Any]) -> tuple[list, list]:
        values, labels, done = launched
        if done is not None:
            done.synchronize()
        return values.tolist(), labels.tolist()


def label_shards(
    shards_dir: str,
    output_dir: str,
    settings: LabelerSettings,
    log: logging.Logger | None = None,
) -> LabelSummary:
    """Label every ``*.tar`` under ``shards_dir`` that has no parquet under ``output_dir`` yet."""
    log = log or logging.getLogger(__name__)
    began = time.monotonic()
    source, out = Storage(shards_dir), Storage(output_dir)
    all_shards = source.glob(f"{source.root}/*.tar")
    if not all_shards:
        raise FileNotFoundError(f"no shards (*.tar) under {source.root}: download them first")
    finished = set(finished_in(source, source.root))
    if finished:  # img2dataset's folder: a shard is whole once its _stats.json is written
        unfinished = [s for s in all_shards if shard_name(s) not in finished]
        if unfinished:
            log.info(
                f"{len(unfinished)} shards still being written (no _stats.json): left for later"
            )
        all_shards = [s for s in all_shards if shard_name(s) in finished]
    todo = [s for s in all_shards if not out.exists(out.url(shard_name(s) + ".parquet"))]
    # a worker killed while writing a shard's parquet left its temporary file (local disk only)
    stale = sum(out.remove_stale_temp(out.url(shard_name(s) + ".parquet")) for s in todo)
    if stale:
        log.info(f"removed {stale} temporary file(s) left by a killed run")
    summary = LabelSummary(shards_skipped=len(all_shards) - len(todo))
    log.info(f"{len(all_shards)} shards, {summary.shards_skipped} already labeled")
    if not todo:
        return summary

    device = settings.resolved_device()
    model = ModelStep(settings, device)
    precision = "bf16 autocast" if model.dtype else "fp32"
    log.info(
        f"model {settings.model} on {device} ({precision}, batch {model.batch_size}, "
        f"{min(settings.num_workers, len(todo))} loader processes, input {model.config})"
    )
    loader = torch.utils.data.DataLoader(
        ShardSamples(todo, model.config, settings.decode_on_device),
        batch_size=model.batch_size,
        num_workers=min(settings.num_workers, len(todo)),
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    writer = ShardWriter(out)
    pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
    steady_from: tuple[float, int] | None = None

    def finish(records: list[dict[str, Any]], launched) -> None:
        nonlocal steady_from
        values, labels = model.collect(launched) if launched is not None else ([], [])
        images = iter(range(len(values)))
        for record in records:
            if record.get("end"):
                rows = pending.pop(record["shard"], [])
                if record.get("error"):
                    summary.unreadable_shards[record["shard"]] = record["error"]
                    log.error(
                        f"shard {record['shard']}: tar unreadable, nothing written: "
                        f"{record['error']}"
                    )
                else:
                    writer.submit(record["shard"], rows)
                continue
            if record["error"] is None:
                i = next(images)
                record["labels"], record["label_probs"] = labels[i], values[i]
                summary.labeled += 1
            else:
                summary.failed += 1
                summary.failed_by_reason[failure_reason(record["error"])] += 1
            pending[record["shard"]].append(record)
        if steady_from is None:
            steady_from = (time.monotonic(), summary.labeled)
            summary.warmup_seconds = steady_from[0] - began

    start = time.monotonic()
    in_flight = None
    try:
        with torch.inference_mode():
            for records, inputs in loader:
                launched = model.launch(inputs) if len(inputs) else None
                if in_flight is not None:
                    finish(*in_flight)
                in_flight = (records, launched)
                _log_written(writer, summary, log, began)
            if in_flight is not None:
                finish(*in_flight)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()  # keep the shards already finished
        raise
    writer.close()
    _log_written(writer, summary, log, began)
    end = time.monotonic()
    summary.seconds = end - start
    if steady_from is not None:
        summary.steady_seconds = end - steady_from[0]
        summary.steady_images = summary.labeled - steady_from[1]
    summary.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        summary.peak_device_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return summary


def _log_written(writer: ShardWriter, summary: LabelSummary, log: logging.Logger, began: float):
    while True:
        try:
            shard, rows = writer.written.get_nowait()
        except queue.Empty:
            return
        summary.shards_done += 1
        rate = summary.labeled / max(time.monotonic() - began, 1e-9)
        log.info(
            f"shard {shard}: {rows} samples written ({summary.shards_done} shards, "
            f"{summary.labeled:,} images labeled, {rate:.1f} img/s overall)"
        )
