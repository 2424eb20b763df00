"""The download stage's settings: the one place each is written (the program's flags and the
``downloaded_shards`` launchpad config derive from it). The defaults are COYO's img2dataset recipe
at 512 px, plus the safety limits of the README's "The hostile web" and "Security". Imports no
``dagster``."""

from __future__ import annotations

import os
from dataclasses import dataclass

from coyo_platform.common.settings import check_choices, setting
from coyo_platform.download import fetch

#: PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``): about 9,459 x 9,459.
MAX_PIXELS = 89_478_485

_AT_LEAST_ONE = (
    "image_size",
    "number_sample_per_shard",
    "thread_count",
    "timeout",
    "max_bytes",
    "max_pixels",
)


@dataclass(frozen=True)
class DownloadSettings:
    """Download settings: COYO's recipe at 512 px by default, plus the safety limits (the
    README's "The hostile web" and "Security")."""

    image_size: int = setting(
        512, "side the images are resized to (keep_ratio: the shorter side; COYO: 512)"
    )
    resize_mode: str = setting(
        "keep_ratio",
        "img2dataset's resize mode",
        ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"),
    )
    resize_only_if_bigger: bool = setting(True, "never upscale")
    skip_reencode: bool = setting(True, "keep the original bytes when no resize is needed")
    min_image_size: int = setting(200, "smaller images fail with failed_to_resize")
    max_aspect_ratio: float = setting(3.0, "wider (or taller) images fail with failed_to_resize")
    retries: int = setting(
        1,
        "tries again after a transient failure (timeout, 5xx, reset); a timeout not at once on a "
        "host whose last 2 fetches in this process timed out, until it answers again",
    )
    timeout: int = setting(10, "seconds for each connect and each read")
    number_sample_per_shard: int = setting(
        10_000, "rows per shard; a folder keeps the size it was started with"
    )
    processes_count: int | None = setting(None, "download processes (default: one per core)")
    thread_count: int = setting(64, "fetch threads per process")
    allow_networks: tuple[str, ...] = setting(
        (),
        "non-public networks downloads may reach (tests, a private mirror), e.g. 10.20.0.0/16; "
        "none: public addresses only",
    )
    max_seconds: float = setting(30.0, "seconds for a whole fetch, redirects and body included")
    max_bytes: int = setting(20 * 1024 * 1024, "bytes at most per image, announced or streamed")
    max_pixels: int = setting(MAX_PIXELS, "pixels at most, read from the header (bombs)")
    drift_distance: int = setting(
        12, "pHash bits (of 64) above which an image counts as changed since the crawl"
    )
    drop_drifted: bool = setting(False, "drop images farther than drift_distance (status drifted)")
    max_transient_share: float = setting(
        0.5,
        "a shard whose rows failed transiently (timeouts, 5xx, resets, DNS) above this share, or "
        "whose names all failed to resolve, is an outage: not committed, tried again later",
    )
    shard_retries: int = setting(
        2, "tries again for a shard that failed or met an outage, after outage_backoff, doubling"
    )
    outage_backoff: float = setting(30.0, "seconds before a shard is tried again (then doubled)")
    dedup_crawl_phash: bool = setting(
        True,
        "download one row per crawl image_phash across the registered parts (the smallest id), "
        "as the card's makers did; the others are never fetched or labeled",
    )
    keep_original: bool = setting(
        False,
        "store each image's original bytes as fetched (the card's model saw the crawled image) "
        "instead of img2dataset's resized copy; the checks and filters still apply",
    )
    retry_failed: bool = setting(
        False,
        "also fetch again the rows of finished shards that failed transiently; a shard that "
        "gains images is rewritten whole, its images kept byte for byte",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.processes_count is not None and self.processes_count < 1:
            raise ValueError(f"processes_count must be >= 1, got {self.processes_count}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.max_pixels > 2 * MAX_PIXELS:
            raise ValueError(
                f"max_pixels must be <= {2 * MAX_PIXELS:,} (PIL refuses larger images itself), "
                f"got {self.max_pixels:,}"
            )
        if not 0 < self.max_transient_share <= 1:
            raise ValueError(
                f"max_transient_share must be in (0, 1], got {self.max_transient_share}"
            )
        if self.shard_retries < 0 or self.outage_backoff < 0:
            raise ValueError("shard_retries and outage_backoff must be >= 0")
        if not 0 <= self.drift_distance <= 64:
            raise ValueError(f"drift_distance must be in [0, 64] (bits), got {self.drift_distance}")
        fetch.parse_networks(self.allow_networks)

    @property
    def processes(self) -> int:
        return self.processes_count or os.cpu_count() or 1

    def fetcher(self) -> fetch.Fetcher:
        return fetch.Fetcher(
            guard=fetch.Guard(fetch.parse_networks(self.allow_networks)),
            timeout=self.timeout,
            max_seconds=self.max_seconds,
            max_bytes=self.max_bytes,
        )
