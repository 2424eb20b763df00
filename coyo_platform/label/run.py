"""Label a partition's downloaded shards: top 50 of the card's 21,841 ImageNet-21k classes.

Exact: the ``coyo`` preset computes google/automl's EfficientNetV2 eval (the whole image in
float32, resized on the device as TF2's ``tf.image.resize`` does, bilinear without antialias, then
``(x - 128) / 128``); the ``timm`` preset is timm's recipe (``create_model`` ->
``resolve_data_config`` -> ``create_transform`` -> ``eval()`` -> ``inference_mode``), with the
whole image resized to the model's test size and no crop (``crop_mode='squash'``,
``crop_pct=1.0``). The
model's 21,843 outputs go through the activation (``sigmoid`` by default: the card's probabilities
sum past 1, so they are not softmax), are mapped to the 21,841 fall11 classes
(``common/labelspace.py``), and the top 50 are kept.

Fast: shards stream through a ``DataLoader`` whose processes read whole tars, decode, hash and
(timm) resize (``samples.py``), handing over uint8 tensors in pinned memory; the model step
(``model.py``) copies, normalizes and runs them on the device, and a batch's top 50 are collected
only after the next batch has been queued, so the device never waits for Python. Finished shards
are written by a writer thread (``writer.py``). Memory holds only the shards in flight.

Resumable: one parquet per shard, written whole or not at all; a shard whose parquet exists in
this labeler's set (``labeler.py``: same weights, preprocessing, activation, precision, versions)
is skipped, so a killed run, rerun, finishes only what is missing, and writes the same bytes as an
uninterrupted run: batches never span shards and are padded to one size. Another labeler writes a
set of its own and never touches this one. A broken image is a row with its
``error``; an unreadable tar writes nothing and is named in the run's failure.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from coyo_platform.common import layout, provenance, shards
from coyo_platform.common.reporting import json_value, path, table
from coyo_platform.common.storage import Storage
from coyo_platform.common.tables import counts
from coyo_platform.label import labeler
from coyo_platform.label.model import Launched, ModelStep
from coyo_platform.label.samples import ShardSamples, batches
from coyo_platform.label.settings import LabelSettings
from coyo_platform.label.writer import ShardWriter


def failure_reason(error: str) -> str:
    """``decode: OSError: image file is truncated`` -> ``decode: OSError``."""
    return ": ".join(error.split(": ")[:2])


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
    labeler: str = ""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    folder: str = ""
    downloads: str | None = None  # the identity of the downloads labeled
    written: list[str] = field(default_factory=list)  # the shards written this run
    shards_relabeled: int = 0  # of them, shards that gained images (retry_failed)
    batch_size: int = 0  # as run
    calibration: str = ""  # what precision=auto and the batch size measured, and why

    @property
    def images_per_second(self) -> float:
        """Throughput after the first batch, so model load and compile do not count."""
        if self.steady_seconds > 0 and self.steady_images > 0:
            return self.steady_images / self.steady_seconds
        return self.labeled / self.seconds if self.seconds > 0 else 0.0

    def data_version(self) -> str:
        """What downstream depends on: the labeler, the downloads and the shards labeled."""
        store = Storage(self.folder)
        labeled = sorted(shards.labeled(store, self.folder))
        parts: list = [self.labeler, self.downloads, labeled]
        revised = shards.revisions(store, self.folder)
        return provenance.digest(parts + [revised] if revised else parts)

    def metadata(self, settings: LabelSettings) -> dict[str, Any]:
        """The materialization's metadata (Pipes' raw form)."""
        device = settings.resolved_device()
        return {
            "labeler": self.labeler,
            "weights_sha256": self.fingerprint.get("weights_sha256", ""),
            "labeler_fingerprint": json_value(self.fingerprint),
            "images_labeled": self.labeled,
            "images_failed": self.failed,
            "failed_by_reason": table(counts(dict(self.failed_by_reason), "reason", "images")),
            "shards_labeled": self.shards_done,
            "shards_skipped": self.shards_skipped,
            "shards_relabeled": self.shards_relabeled,
            "images_per_second": round(self.images_per_second, 2),
            "seconds": round(self.seconds, 2),
            "warmup_seconds": round(self.warmup_seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_gpu_memory_mb": round(self.peak_device_memory_mb or 0, 1),
            "preset": settings.preset,
            "model": settings.model,
            "checkpoint": settings.checkpoint or "hub pretrained",
            "activation": settings.activation,
            "image_size": settings.image_size or "model's test size",
            "interpolation": settings.interpolation or "model's",
            "device": str(device),
            "precision": self.fingerprint.get("precision", ""),
            "batch_size": self.batch_size or settings.resolved_batch_size(device),
            "calibration": self.calibration or "none: precision and batch size as set",
            "compiled": settings.compile,
            "decode_on_device": settings.decode_on_device,
            "path": path(self.folder),
        }


@dataclass
class Todo:
    """What a label run does: the ``tars`` to label, of them those ``relabel``ed (labeled
    before ``retry_failed`` added images: only the new images are labeled), how many are
    labeled already, and the revision of each revised shard it reads (``revisions``)."""

    tars: list[str]
    skipped: int
    relabel: set[str] = field(default_factory=set)
    revisions: dict[str, int] = field(default_factory=dict)


def shards_to_label(source: Storage, out: Storage, log: logging.Logger, tars: list[str]) -> Todo:
    """Of ``tars`` (under ``source``), those that are finished (img2dataset's ``_stats.json``,
    when the folder has any) and have no parquet under ``out``, or one made at an older
    revision of the shard (``_stats.json``'s, read before the tar, so a shard rewritten while
    it is read is labeled again next time)."""
    finished = shards.finished(source, source.root)
    if finished:  # img2dataset's folder: a shard is whole once its _stats.json is written
        whole = set(finished)
        waiting = [t for t in tars if layout.shard_name(t) not in whole]
        if waiting:
            log.info(f"{len(waiting)} shards still being written (no _stats.json): left for later")
        tars = [t for t in tars if layout.shard_name(t) in whole]
    revised = shards.revisions_read_first(source, source.root, finished)
    labeled_at = shards.revisions(out, out.root)
    done = shards.labeled(out, out.root)
    relabel = {n for n in done if revised.get(n, 0) > labeled_at.get(n, 0)}
    todo = [t for t in tars if layout.shard_name(t) not in done or layout.shard_name(t) in relabel]
    if relabel:
        log.info(f"{len(relabel)} shards gained images (retry_failed): labeling those images")
    # a run killed while writing a shard's parquet left its temporary file (local disk only)
    targets = [layout.shard_file(out.root, layout.shard_name(t), ".parquet") for t in todo]
    stale = sum(out.remove_stale_temp(url) for url in targets)
    if stale:
        log.info(f"removed {stale} temporary file(s) left by a killed run")
    return Todo(todo, len(tars) - len(todo), relabel, revised)


class Labeling:
    """One run's bookkeeping: records of each shard until its end marker, the summary, the
    writer, and progress lines."""

    def __init__(self, summary: LabelSummary, writer: ShardWriter, log: logging.Logger) -> None:
        self.summary, self.writer, self.log = summary, writer, log
        self.pending: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.began = time.monotonic()
        self.steady_from: tuple[float, int] | None = None

    def finish(self, records: list[dict[str, Any]], values: list, labels: list) -> None:
        """A batch's records with their labels (in record order, for the images that had one)."""
        images = iter(range(len(values)))
        for record in records:
            if record.get("end"):
                self._end_of_shard(record)
                continue
            if record["error"] is None:
                i = next(images)
                record["labels"], record["label_probs"] = labels[i], values[i]
                self.summary.labeled += 1
            else:
                self.summary.failed += 1
                self.summary.failed_by_reason[failure_reason(record["error"])] += 1
            self.pending[record["shard"]].append(record)
        if self.steady_from is None:
            self.steady_from = (time.monotonic(), self.summary.labeled)
            self.summary.warmup_seconds = self.steady_from[0] - self.began
        self.report(self.writer.written())

    def _end_of_shard(self, marker: dict[str, Any]) -> None:
        rows = self.pending.pop(marker["shard"], [])
        if marker.get("error"):
            self.summary.unreadable_shards[marker["shard"]] = marker["error"]
            self.log.error(
                f"shard {marker['shard']}: tar unreadable, nothing written: {marker['error']}"
            )
        else:
            self.writer.submit(marker["shard"], rows, keep=marker.get("keys"))

    def report(self, written: list[tuple[str, int]]) -> None:
        for shard, rows in written:
            self.summary.shards_done += 1
            self.summary.written.append(shard)
            rate = self.summary.labeled / max(time.monotonic() - self.began, 1e-9)
            self.log.info(
                f"shard {shard}: {rows} samples written ({self.summary.shards_done} shards, "
                f"{self.summary.labeled:,} images labeled, {rate:.1f} img/s overall)"
            )


def _run_batches(model: ModelStep, loader, labeling: Labeling) -> None:
    """Each batch is launched before the previous one is collected (the device stays busy)."""
    in_flight: tuple[list[dict[str, Any]], Launched | None] | None = None

    def collect(records: list[dict[str, Any]], launched: Launched | None) -> None:
        values, labels = model.collect(launched) if launched is not None else ([], [])
        labeling.finish(records, values, labels)

    with torch.inference_mode():
        for records, inputs in loader:
            launched = model.launch(inputs) if len(inputs) else None
            if in_flight is not None:
                collect(*in_flight)
            in_flight = (records, launched)
        if in_flight is not None:
            collect(*in_flight)


def _label_set(
    labels_root: Storage, labeled: str, fingerprint: dict[str, Any], part: str, settings
) -> Storage:
    """The label set's record (written once: its id is its fingerprint's digest), with the
    settings that made it (the sensor labels new shards of a partition with its current set's
    settings), and the partition's folder in it."""
    record = layout.labeler_record(labels_root.root, labeled)
    if not labels_root.exists(record):
        given = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
        labels_root.write_json(record, {"labeler": labeled, **fingerprint, "settings": given})
    return Storage(layout.labels_in(labels_root.root, part, labeled))


def _check_downloads(source: Storage, out: Storage, part: str) -> str | None:
    """The downloads' fingerprint digest, recorded with the labels on first use; labels made
    from other downloads (a part downloaded again from another source) are not reused."""
    downloads = source.read_json_if_exists(layout.download_record(source.root))
    made_from = provenance.identity(downloads) if downloads else None
    record = f"{out.root}/{DOWNLOADS_RECORD}"
    recorded = out.read_json_if_exists(record)
    if recorded is None:
        if made_from is not None or not shards.labeled(out, out.root):
            out.write_json(record, {"downloads": made_from})
        return made_from
    provenance.check(
        recorded, {"downloads": made_from}, f"the labels in {out.root}",
        provenance.start_over_command(out.root.rsplit("/", 3)[0], part, layout.LABELS),
    )  # fmt: skip
    return made_from


#: Beside a partition's labels: the digest of the downloads' fingerprint they were made from.
DOWNLOADS_RECORD = "_downloads.json"


def label_shards(
    shards_dir: str,
    labels_root: str,
    settings: LabelSettings,
    log: logging.Logger | None = None,
    part: str | None = None,
) -> LabelSummary:
    """Label every finished ``*.tar`` under ``shards_dir`` that has no parquet in this
    labeler's set yet, ``<labels_root>/<labeler id>/<part>/`` (``part``: the shards folder's
    name); then make that set the partition's current one
    (``<labels_root>/_current/<part>.json``)."""
    log = log or logging.getLogger(__name__)
    began = time.monotonic()
    source, root = Storage(shards_dir), Storage(labels_root)
    part = part or source.root.rstrip("/").rsplit("/", 1)[-1]
    tars = shards.tars(source, source.root)
    if not tars:
        raise provenance.MissingInput(f"no shards (*.tar) under {source.root}: download them first")
    device = settings.resolved_device()
    try:
        model = ModelStep(
            settings, device, lambda labeled: root.exists(layout.labeler_record(root.root, labeled))
        )
    except provenance.BadInput:
        raise
    except ValueError as err:  # a checkpoint that is not weights, or not for this model
        raise provenance.BadInput(str(err)) from err
    fingerprint = model.fingerprint(settings)
    labeled = labeler.labeler_id(fingerprint)
    out = _label_set(root, labeled, fingerprint, part, settings)
    downloads = _check_downloads(source, out, part)
    todo = shards_to_label(source, out, log, tars)
    total = len(todo.tars) + todo.skipped
    summary = LabelSummary(shards_skipped=todo.skipped, labeler=labeled, fingerprint=fingerprint)
    summary.folder, summary.downloads = out.root, downloads
    summary.batch_size = model.batch_size
    if model.calibration is not None:
        cal = model.calibration
        summary.calibration = f"{cal.why} ({'cached' if cal.cached else 'measured'}: {cal.machine})"
        log.info(f"calibration: {summary.calibration}")
    log.info(f"labeler {labeled}: {total} shards, {todo.skipped} already labeled")
    if todo.tars:
        summary.shards_relabeled = len(todo.relabel)
        _label(todo, out, settings, model, summary, log, began)
        _record_revisions(out, todo, summary.written)
    if not summary.unreadable_shards:
        shards.set_current_labels(root, part, {"labeler": labeled, "shards": total})
    return summary


def _record_revisions(out: Storage, todo: Todo, written: list[str]) -> None:
    """The label folder's ``_revisions.json``: the revision each shard written was labeled at
    (a run killed before this line only labels those shards again, finding nothing new)."""
    labeled_at = shards.revisions(out, out.root)
    now = {**labeled_at, **{s: todo.revisions[s] for s in written if s in todo.revisions}}
    if now != labeled_at:
        out.write_json(layout.revisions(out.root), dict(sorted(now.items())))


def _label(todo: Todo, out, settings, model, summary, log, began) -> None:
    device = model.device
    workers = min(settings.workers, len(todo.tars))
    existing = {s: layout.shard_file(out.root, s, ".parquet") for s in todo.relabel}
    log.info(
        f"model {settings.model} on {device} ({model.precision}, batch {model.batch_size}, "
        f"{workers} loader processes, input {model.config})"
    )
    loader = torch.utils.data.DataLoader(
        ShardSamples(
            todo.tars, model.config, settings.decode_on_device, model.batch_size, existing
        ),
        batch_size=None,
        num_workers=workers,
        collate_fn=batches,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    labeling = Labeling(summary, ShardWriter(out, merge=set(existing)), log)
    labeling.began = began
    start = time.monotonic()
    try:
        _run_batches(model, loader, labeling)
    except BaseException:
        with contextlib.suppress(Exception):
            labeling.writer.close()  # keep the shards already finished
        raise
    labeling.report(labeling.writer.close())
    end = time.monotonic()
    summary.seconds = end - start
    if labeling.steady_from is not None:
        summary.steady_seconds = end - labeling.steady_from[0]
        summary.steady_images = summary.labeled - labeling.steady_from[1]
    summary.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        summary.peak_device_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
