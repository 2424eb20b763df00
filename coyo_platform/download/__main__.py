"""Download one COYO-700M part into webdataset shards with img2dataset (COYO's recipe).

Usage::

    python -m coyo_platform.download --metadata data/coyo700m_metadata/part-00000.parquet \
        --output data/downloaded_shards/part-00000 [--image-size 512] [--processes-count 16] ...

Every setting of ``download/settings.py`` is a flag (``--help`` lists them). Reruns resume:
shards with a ``_stats.json`` are kept, when the folder's ``_fingerprint.json`` (source part,
settings that change the bytes) matches this run's; otherwise it stops and says how to start over.
URLs to non-public addresses are refused
(``--allow-networks 10.0.0.0/8,127.0.0.1`` lets some through: tests, private mirrors).
Started by the ``downloaded_shards`` asset through Dagster Pipes (then it reports its counts to
Dagster), or by hand from a shell (then it prints them as JSON).
Imports no ``dagster``: only ``dagster_pipes``, img2dataset, polars, PIL/imagehash and fsspec.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import-time update check goes online

from coyo_platform.common import settings as declared  # noqa: E402
from coyo_platform.common.reporting import open_reporter  # noqa: E402
from coyo_platform.common.storage import Storage  # noqa: E402
from coyo_platform.download import fingerprint  # noqa: E402
from coyo_platform.download.run import download_partition, without_torch  # noqa: E402
from coyo_platform.download.settings import DownloadSettings  # noqa: E402

INPUTS = {
    "--metadata": "the part's parquet (COYO-700M schema)",
    "--output": "folder or s3:// prefix for the shards",
}


without_torch()  # this process never needs it (nor do its pool processes)


def parser() -> argparse.ArgumentParser:
    return declared.program_parser("python -m coyo_platform.download", DownloadSettings, INPUTS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with open_reporter() as report:  # bad settings are reported through Pipes too
        settings = declared.from_arguments(DownloadSettings, args)
        report.log.info(f"downloading {args.metadata} -> {args.output}")
        out = Storage(args.output)
        settings, taken = fingerprint.for_retry(out, out.root, settings)
        if taken:  # a recovery rewrites shards as they were made
            kept = ", ".join(f"{k}={v[1]!r} (not {v[0]!r})" for k, v in sorted(taken.items()))
            report.log.info(f"retry_failed: the partition's own settings are kept: {kept}")
        done = {"shards": 0, "rows": 0, "ok": 0}

        def on_shard(shard_id: int, counts: dict[str, int]) -> None:
            if "retried" in counts:  # retry_failed, a finished shard
                report.log.info(
                    f"shard {shard_id:05d}: {counts['recovered']} of {counts['retried']} rows "
                    f"fetched again are images now, {counts['final']} failed for good"
                    + (f"; rewritten (revision {counts['revision']})" if counts["revision"] else "")
                )
                return
            done["shards"] += 1
            done["rows"] += sum(counts.values())
            done["ok"] += counts.get("success", 0)
            report.log.info(
                f"shard {shard_id:05d}: {counts.get('success', 0)}/{sum(counts.values())} images; "
                f"this run {done['shards']} shards, {done['ok']:,}/{done['rows']:,} images"
            )

        s = download_partition(args.metadata, args.output, settings, on_shard)
        report.log.info(
            f"{s.succeeded}/{s.attempted} images in {s.shards} shards "
            f"({s.shards_this_run} this run, {s.images_per_second:.1f} img/s); "
            f"{s.by_status.get('blocked', 0)} blocked; drift rate {s.drift_rate:.2%}; "
            f"{s.transient} transient failures"
            + (f" ({s.recovered} of {s.retried} recovered this run)" if s.retried else "")
        )
        report.report(
            s.metadata(settings.drift_distance, settings.drop_drifted, settings.image_size),
            data_version=fingerprint.data_version(out, out.root),
        )


if __name__ == "__main__":
    main()
