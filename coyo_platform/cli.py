"""``coyo-platform``: run the pipeline for some parts from a shell, or the offline demo.

    coyo-platform run --source URL --parts part-00000 [part-00001 ...] [--model NAME]
                      [--checkpoint PATH] [--threshold T | --target-rows N | --target-fraction F]
                      [--dedup] [--class-cap N] [--limit N]
    coyo-platform demo

``run`` registers the parts as ``coyo_parts`` partitions in the Dagster instance at
``$DAGSTER_HOME`` (default ``./.dagster``, SQLite) and materializes every asset, one run per step,
printing a line per step: metadata, downloads, labels and stats for each part, then the stats
roll-up and the sampling plan over all parts, then each part's subset, then the manifest;
``dagster dev`` then shows the materializations.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# What the progress line of each step shows from its materialization metadata.
_SUMMARY_KEYS = {
    "coyo700m_metadata": ("rows",),
    "downloaded_shards": ("succeeded", "failed", "images_per_second"),
    "labeled_shards": ("images_labeled", "images_failed", "images_per_second", "device"),
    "label_stats": ("images_labeled",),
    "coyo_labeled_300m": ("rows", "share_kept"),
    "label_stats_rollup": ("partitions", "images_labeled"),
    "subset_plan": ("threshold", "rows", "duplicates_dropped"),
    "subset_manifest": ("partitions", "rows"),
}


def _prepare_instance() -> Any:
    home = Path(os.environ.get("DAGSTER_HOME") or ".dagster").absolute()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    config = home / "dagster.yaml"
    if not config.exists():  # SQLite storage is the default; no telemetry from an offline box
        config.write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    import dagster as dg

    return dg.DagsterInstance.get()


def _materialize(asset, instance, resources, part: str | None, config: dict, log_level: str) -> str:
    import dagster as dg

    from coyo_platform.definitions import CHECKS

    name = asset.key.to_user_string()
    checks = [c for c in CHECKS if asset.key in {spec.asset_key for spec in c.check_specs}]
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    if config:
        run_config["ops"] = {name: {"config": config}}
    start = time.monotonic()
    result = dg.materialize(
        [asset, *checks],
        partition_key=part,
        instance=instance,
        resources=resources,
        run_config=run_config,
        raise_on_error=False,
    )
    took = time.monotonic() - start
    if not result.success:
        failures = [e.step_failure_data.error for e in result.all_events if e.is_step_failure]
        message = failures[0].message.strip() if failures and failures[0] else "unknown error"
        cause = failures[0].cause if failures and failures[0] else None
        while cause is not None:
            message += f"\n  caused by: {cause.message.strip()}"
            cause = cause.cause
        raise SystemExit(
            f"[{part or 'all'}] {name} FAILED after {took:.1f}s (run {result.run_id}):\n{message}"
        )
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    for check in failed:
        figures = ", ".join(f"{k}={v.value}" for k, v in check.metadata.items())
        print(
            f"[{part or 'all'}] check {check.check_name} FAILED ({check.severity.value}): {figures}"
        )
    materialized = result.asset_materializations_for_node(name)
    if not materialized:
        print(f"[{part or 'all'}] {name:<20} unchanged in {took:6.1f}s", flush=True)
        return ""
    metadata = materialized[-1].metadata
    shown = ", ".join(
        f"{k}={metadata[k].value}" for k in _SUMMARY_KEYS.get(name, ()) if k in metadata
    )
    print(f"[{part or 'all'}] {name:<20} ok in {took:6.1f}s  {shown}", flush=True)
    return str(metadata["path"].value) if "path" in metadata else ""


def run(
    source: str,
    parts: list[str],
    data_root: str | None = None,
    model: str | None = None,
    checkpoint: str | None = None,
    preset: str | None = None,
    sampling: dict | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    allow_networks: list[str] | None = None,
    drop_drifted: bool = False,
    verbose: bool = False,
) -> list[str]:
    """Materialize the whole graph for ``parts``; returns the subset files' paths."""
    from coyo_platform.assets.label_stats import label_stats_rollup
    from coyo_platform.assets.subset_manifest import subset_manifest
    from coyo_platform.assets.subset_plan import subset_plan
    from coyo_platform.core.plan import Sampling
    from coyo_platform.definitions import PIPELINE, local_resources

    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    try:
        Sampling(**sampling)
    except ValueError as err:
        raise SystemExit(f"bad sampling setting: {err}") from err
    download: dict[str, Any] = {"image_size": image_size} if image_size else {}
    if allow_networks:
        download["allow_networks"] = allow_networks
    if drop_drifted:
        download["drop_drifted"] = True
    try:
        from coyo_platform.core.download import DownloadSettings

        DownloadSettings(**{**download, "allow_networks": ",".join(allow_networks or [])})
    except ValueError as err:
        raise SystemExit(f"bad download setting: {err}") from err
    if model:
        from coyo_platform.worker.labeler import check_model_name

        try:
            check_model_name(model)
        except ValueError as err:
            raise SystemExit(f"--model: {err}") from err
    if limit is not None and limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {limit}")
    if checkpoint and "://" not in checkpoint:
        if not Path(checkpoint).is_file():
            raise SystemExit(f"--checkpoint {checkpoint}: no such file")
        checkpoint = str(Path(checkpoint).absolute())
    instance = _prepare_instance()
    resources = local_resources(source=source, data_root=data_root)
    new = [p for p in parts if not instance.has_dynamic_partition("coyo_parts", p)]
    instance.add_dynamic_partitions("coyo_parts", new)
    print(f"instance {os.environ['DAGSTER_HOME']}; data root {resources['storage'].store().root}")
    print(f"parts: {', '.join(parts)} ({len(new)} new partitions)")
    chosen = (("model", model), ("checkpoint", checkpoint), ("preset", preset))
    label: dict[str, Any] = {k: v for k, v in chosen if v}
    configs = {
        "coyo700m_metadata": {"limit": limit} if limit else {},
        "downloaded_shards": download,
        "labeled_shards": label,
        "label_stats": {},
    }
    level = "INFO" if verbose else "WARNING"
    *per_part, subset = PIPELINE
    for part in parts:
        for asset in per_part:
            _materialize(asset, instance, resources, part, configs[asset.key.path[-1]], level)
    _materialize(label_stats_rollup, instance, resources, None, {}, level)
    _materialize(subset_plan, instance, resources, None, sampling, level)
    outputs = [_materialize(subset, instance, resources, part, {}, level) for part in parts]
    _materialize(subset_manifest, instance, resources, None, {}, level)
    print("COYO-Labeled-300M subset written to:")
    for path in outputs:
        print(f"  {path}")
    return outputs


def demo(workdir: Path, parts: int = 2, rows: int = 150) -> list[str]:
    """The offline demo: a loopback image server, two small parts, a random-weight model."""
    from coyo_platform import demo as fixtures

    images, source = workdir / "images", workdir / "source"
    items = fixtures.write_images(images)
    checkpoint = fixtures.make_random_model(workdir / "random_test_efficientnet.pth", images)
    print(
        "DEMO: the labeling model is timm's tiny test_efficientnet with RANDOM weights, made "
        "offline.\n      Its labels are meaningless; the demo shows the pipeline, not a labeler."
    )
    with fixtures.serve_folder(images) as base_url:
        keys = fixtures.write_parts(source, images, items, base_url, parts, rows)
        print(f"image server {base_url}; {parts} parts of {rows} rows in {source}")
        return run(
            source=str(source),
            parts=keys,
            model=fixtures.DEMO_MODEL,
            checkpoint=str(checkpoint),
            preset="timm",  # the tiny model's own eval size, not EfficientNetV2-XL's 512
            allow_networks=["127.0.0.1/32"],  # the demo's image server; public-only by default
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="coyo-platform", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="materialize every asset for some COYO-700M parts")
    r.add_argument("--source", default=os.environ.get("COYO_SOURCE"), help="folder, s3:// or hf://")
    r.add_argument("--parts", nargs="+", required=True, metavar="PART", help="e.g. part-00000")
    r.add_argument(
        "--data-root", default=None, help="storage root (default $COYO_DATA_ROOT or ./data)"
    )
    r.add_argument("--model", default=None, help="timm model (default tf_efficientnetv2_xl.in21k)")
    r.add_argument("--checkpoint", default=None, help="weights file (default: hub pretrained)")
    r.add_argument("--preset", choices=("coyo", "timm"), default=None, help="labeler preset (coyo)")
    pick = r.add_mutually_exclusive_group()
    pick.add_argument("--threshold", type=float, help="top-1 cut (default 0.30)")
    pick.add_argument("--target-rows", type=int, help="threshold closest to N rows")
    pick.add_argument("--target-fraction", type=float, help="threshold closest to F of images")
    r.add_argument("--dedup", action="store_true", help="one image per pHash across all parts")
    r.add_argument("--class-cap", type=int, default=None, help="at most N images per class")
    r.add_argument("--limit", type=int, default=None, help="only the first N rows of each part")
    r.add_argument("--image-size", type=int, default=None, help="download size (default 512)")
    r.add_argument(
        "--allow-network",
        action="append",
        metavar="CIDR",
        help="a non-public network downloads may reach (a private mirror); repeatable",
    )
    r.add_argument(
        "--drop-drifted", action="store_true", help="drop images whose pHash left the crawl's"
    )
    r.add_argument("-v", "--verbose", action="store_true", help="show Dagster's INFO logs")
    d = sub.add_parser("demo", help="offline demo: local image server, two small parts")
    d.add_argument("--workdir", default=None, help="where fixtures go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.command == "run":
        from coyo_platform.core.sources import HUB_SOURCE

        run(
            source=args.source or HUB_SOURCE,
            parts=args.parts,
            data_root=args.data_root,
            model=args.model,
            checkpoint=args.checkpoint,
            preset=args.preset,
            sampling={
                "threshold": args.threshold,
                "target_rows": args.target_rows,
                "target_fraction": args.target_fraction,
                "dedup": args.dedup or None,
                "class_cap": args.class_cap,
            },
            limit=args.limit,
            image_size=args.image_size,
            allow_networks=args.allow_network,
            drop_drifted=args.drop_drifted,
            verbose=args.verbose,
        )
    else:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="coyo-demo-"))
        demo(workdir)


if __name__ == "__main__":
    sys.exit(main())
