"""Download one partition's images with img2dataset, and summarize what it wrote.

The defaults are COYO's own recipe (kakaobrain/coyo-dataset; FACTS.md section 2) at 512 px, the
size used for the labeled subset. ``id`` and ``image_phash`` ride along with every sample
(``save_additional_columns``) so labels join back on COYO's id. Reruns resume: img2dataset's
incremental mode skips every shard that already has its ``NNNNN_stats.json``.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import polars as pl

from coyo_platform.core.storage import Storage


@dataclass
class DownloadSettings:
    """img2dataset settings; the defaults reproduce COYO's recipe with 512 px images."""

    image_size: int = 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    skip_reencode: bool = True
    min_image_size: int = 200
    max_aspect_ratio: float = 3.0
    retries: int = 1
    timeout: int = 10
    number_sample_per_shard: int = 10_000
    processes_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    thread_count: int = 64

    def __post_init__(self) -> None:
        for name in ("image_size", "number_sample_per_shard", "processes_count", "thread_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DownloadSummary:
    attempted: int
    succeeded: int
    failed_by_reason: dict[str, int]
    shards: int
    shards_this_run: int
    succeeded_this_run: int
    seconds: float
    bytes_written: int

    @property
    def images_per_second(self) -> float:
        return self.succeeded_this_run / self.seconds if self.seconds > 0 else 0.0


# img2dataset records the exception text; group those texts into reasons a person can act on.
_REASONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"HTTP Error (\d{3})"), r"http \1"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"Connection refused"), "connection refused"),
    (
        re.compile(r"Connection reset|Remote end closed|RemoteDisconnected", re.I),
        "connection reset",
    ),
    (re.compile(r"Name or service not known|nodename nor servname|getaddrinfo", re.I), "dns"),
    (re.compile(r"CERTIFICATE|SSL", re.I), "tls"),
    (re.compile(r"Image decoding error"), "not an image"),
    (re.compile(r"X-Robots-Tag"), "disallowed by X-Robots-Tag"),
    (re.compile(r"unknown url type|no host given", re.I), "bad url"),
]


def failure_reason(status: str, message: str | None) -> str:
    """A short, stable reason for a failed row, e.g. ``download: http 404`` or
    ``resize: image too small``."""
    stage = "download" if status == "failed_to_download" else "resize"
    text = message or "unknown"
    for pattern, reason in _REASONS:
        hit = pattern.search(text)
        if hit:
            return f"{stage}: {hit.expand(reason)}"
    # unknown text: drop numbers and addresses so identical failures group together
    text = re.sub(r"0x[0-9a-f]+|\d+", "N", text.lower())
    return f"{stage}: {text[:80]}"


def expected_shards(rows: int, settings: DownloadSettings) -> int:
    return math.ceil(rows / settings.number_sample_per_shard)


def done_shards(storage: Storage, output: str) -> set[str]:
    return set(storage.glob(f"{output}/*_stats.json"))


def run_img2dataset(metadata_url: str, output: str, settings: DownloadSettings) -> None:
    """Download the images of the part at ``metadata_url`` into webdataset shards at ``output``."""
    import img2dataset  # heavy import (opencv, albumentations): only where it is used

    img2dataset.download(
        url_list=metadata_url,
        input_format="parquet",
        url_col="url",
        caption_col="text",
        save_additional_columns=["id", "image_phash"],
        output_format="webdataset",
        output_folder=output,
        image_size=settings.image_size,
        resize_mode=settings.resize_mode,
        resize_only_if_bigger=settings.resize_only_if_bigger,
        skip_reencode=settings.skip_reencode,
        min_image_size=settings.min_image_size,
        max_aspect_ratio=settings.max_aspect_ratio,
        retries=settings.retries,
        timeout=settings.timeout,
        number_sample_per_shard=settings.number_sample_per_shard,
        processes_count=settings.processes_count,
        thread_count=settings.thread_count,
        incremental_mode="incremental",
        enable_wandb=False,
    )


def summarize(storage: Storage, output: str, before: set[str], seconds: float) -> DownloadSummary:
    """Count what the shard parquets under ``output`` say.

    ``before`` is the set of shards done before this run, to tell this run's speed.
    """
    shard_files = storage.glob(f"{output}/*.parquet")
    after = done_shards(storage, output)
    new_ids = {os.path.basename(p).split("_")[0] for p in after - before}
    failed: Counter[str] = Counter()
    attempted = succeeded = succeeded_new = 0
    for path in shard_files:
        with storage.fs.open(path, "rb") as fh:
            rows = pl.read_parquet(fh, columns=["status", "error_message"])
        attempted += rows.height
        ok = int((rows["status"] == "success").sum())
        succeeded += ok
        if os.path.basename(path).split(".")[0] in new_ids:
            succeeded_new += ok
        bad = rows.filter(pl.col("status") != "success").group_by("status", "error_message").len()
        for status, message, n in bad.iter_rows():
            failed[failure_reason(status, message)] += n
    return DownloadSummary(
        attempted=attempted,
        succeeded=succeeded,
        failed_by_reason=dict(failed.most_common()),
        shards=len(after),
        shards_this_run=len(new_ids),
        succeeded_this_run=succeeded_new,
        seconds=seconds,
        bytes_written=sum(storage.size(p) for p in storage.glob(f"{output}/*.tar")),
    )


def download_partition(
    storage: Storage, metadata_url: str, output: str, settings: DownloadSettings
) -> DownloadSummary:
    """Download (or resume) a partition; raise if img2dataset left shards unfinished."""
    rows = pl.scan_parquet(metadata_url).select(pl.len()).collect().item()
    before = done_shards(storage, output)
    start = time.monotonic()
    if len(before) < expected_shards(rows, settings):
        run_img2dataset(metadata_url, output, settings)
    summary = summarize(storage, output, before, time.monotonic() - start)
    missing = expected_shards(rows, settings) - summary.shards
    if missing > 0:
        raise RuntimeError(
            f"img2dataset finished {summary.shards} of {expected_shards(rows, settings)} shards "
            f"in {output}; {missing} failed. Rerun to resume: done shards are kept."
        )
    return summary
