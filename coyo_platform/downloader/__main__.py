"""Download one COYO-700M part into webdataset shards with img2dataset (COYO's recipe).

Usage::

    python -m coyo_platform.downloader --metadata data/coyo700m_metadata/part-00000.parquet \
        --output data/downloaded_shards/part-00000 [--image-size 512] [--processes 16]

Reruns resume: shards with a ``_stats.json`` are kept. Started by the ``downloaded_shards`` asset
through Dagster Pipes (then it reports its counts to Dagster), or by hand from a shell.
Imports no ``dagster``: only ``dagster_pipes``, img2dataset, polars and fsspec.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import-time update check goes online

from coyo_platform.core.download import DownloadSettings, download_partition  # noqa: E402
from coyo_platform.core.reporting import md, open_reporter, path  # noqa: E402
from coyo_platform.core.storage import Storage  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m coyo_platform.downloader")
    parser.add_argument("--metadata", required=True, help="the part's parquet (COYO-700M schema)")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for the shards")
    defaults = DownloadSettings()
    for f in fields(DownloadSettings):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            kind = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"type": type(value)}
        parser.add_argument(flag, dest=f.name, default=value, help=f"default {value}", **kind)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = DownloadSettings(**{f.name: getattr(args, f.name) for f in fields(DownloadSettings)})
    storage = Storage(args.output)
    with open_reporter() as report:
        report.log.info(f"downloading {args.metadata} -> {storage.root}")
        s = download_partition(storage, args.metadata, storage.root, settings)
        failed = s.attempted - s.succeeded
        report.log.info(
            f"{s.succeeded}/{s.attempted} images in {s.shards} shards "
            f"({s.shards_this_run} this run, {s.images_per_second:.1f} img/s)"
        )
        reasons = "\n".join(f"| {r} | {n:,} |" for r, n in s.failed_by_reason.items())
        report.report(
            {
                "attempted": s.attempted,
                "succeeded": s.succeeded,
                "failed": failed,
                "success_rate": round(s.succeeded / s.attempted, 4) if s.attempted else 0.0,
                "failed_by_reason": md("| reason | rows |\n|---|---:|\n" + reasons),
                "failures": {"raw_value": s.failed_by_reason, "type": "json"},
                "shards": s.shards,
                "shards_this_run": s.shards_this_run,
                "images_per_second": round(s.images_per_second, 2),
                "seconds": round(s.seconds, 2),
                "bytes_written": s.bytes_written,
                "path": path(storage.root),
                "image_size": settings.image_size,
            }
        )


if __name__ == "__main__":
    main()
