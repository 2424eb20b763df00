"""Download one COYO-700M part into webdataset shards with img2dataset (COYO's recipe).

Usage::

    python -m coyo_platform.downloader --metadata data/coyo700m_metadata/part-00000.parquet \
        --output data/downloaded_shards/part-00000 [--image-size 512] [--processes 16]

Reruns resume: shards with a ``_stats.json`` are kept. URLs to non-public addresses are refused
(``--allow-networks 10.0.0.0/8,127.0.0.1`` lets some through: tests, private mirrors).
Started by the ``downloaded_shards`` asset through Dagster Pipes (then it reports its counts to
Dagster), or by hand from a shell.
Imports no ``dagster``: only ``dagster_pipes``, img2dataset, polars, PIL/imagehash and fsspec.
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
    with open_reporter() as report:  # bad settings are reported through Pipes too
        settings = DownloadSettings(
            **{f.name: getattr(args, f.name) for f in fields(DownloadSettings)}
        )
        storage = Storage(args.output)
        report.log.info(f"downloading {args.metadata} -> {storage.root}")
        done = {"shards": 0, "rows": 0, "ok": 0}

        def on_shard(shard_id: int, counts: dict[str, int]) -> None:
            done["shards"] += 1
            done["rows"] += sum(counts.values())
            done["ok"] += counts.get("success", 0)
            report.log.info(
                f"shard {shard_id:05d}: {counts.get('success', 0)}/{sum(counts.values())} images; "
                f"this run {done['shards']} shards, {done['ok']:,}/{done['rows']:,} images"
            )

        s = download_partition(storage, args.metadata, storage.root, settings, on_shard)
        failed = s.attempted - s.succeeded
        report.log.info(
            f"{s.succeeded}/{s.attempted} images in {s.shards} shards "
            f"({s.shards_this_run} this run, {s.images_per_second:.1f} img/s); "
            f"{s.by_status.get('blocked', 0)} blocked; drift rate {s.drift_rate:.2%}"
        )
        reasons = "\n".join(f"| {r} | {n:,} |" for r, n in s.failed_by_reason.items())
        statuses = "\n".join(f"| {k} | {n:,} |" for k, n in s.by_status.items())
        report.report(
            {
                "attempted": s.attempted,
                "succeeded": s.succeeded,
                "failed": failed,
                "success_rate": round(s.succeeded / s.attempted, 4) if s.attempted else 0.0,
                "blocked": s.by_status.get("blocked", 0),
                "statuses": md("| status | rows |\n|---|---:|\n" + statuses),
                "by_status": {"raw_value": s.by_status, "type": "json"},
                "failed_by_reason": md("| reason | rows |\n|---|---:|\n" + reasons),
                "failures": {"raw_value": s.failed_by_reason, "type": "json"},
                "phash_compared": s.compared,
                "drifted": s.drifted,
                "drift_rate": round(s.drift_rate, 4),
                "drift_distance": settings.drift_distance,
                "drifted_dropped": settings.drop_drifted,
                "shards": s.shards,
                "shards_this_run": s.shards_this_run,
                "images_per_second": round(s.images_per_second, 2),
                "seconds": round(s.seconds, 2),
                "bytes_written": s.bytes_written,
                "path": path(storage.root),
                "image_size": settings.image_size,
            }
            | (
                {"mean_phash_distance": round(s.mean_distance, 2)}
                if s.mean_distance is not None
                else {}
            )
        )


if __name__ == "__main__":
    main()
