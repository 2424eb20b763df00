"""``coyo-platform``: run the pipeline for some parts from a shell, or the offline demo.

    coyo-platform run --source URL --parts part-00000 [part-00001 ...] [--model NAME]
                      [--checkpoint PATH] [--threshold T | --target-rows N | --target-fraction F]
                      [--dedup] [--class-cap N] [--limit N] [--wds [--shard-bytes B]] ...
    coyo-platform clear --parts part-00000 --from downloaded_shards [--data-root DIR]
    coyo-platform compare [--baseline LABELER --candidate LABELER] [--parts ...]
    coyo-platform export --to URL [--wds-to URL] [--data-root DIR] [--endpoint-url URL]
                         [--allow-incomplete]
    coyo-platform demo
    coyo-platform estimate [--parts 128] [--gpus N] [--download-nodes M] [--price-gpu USD]
                           [--price-cpu USD] [--cores-per-node C] [--rows-per-part R]
                           [--results DIR]

``run`` registers the parts as ``coyo_parts`` partitions in the Dagster instance at
``$DAGSTER_HOME`` (default ``./.dagster``, SQLite) and materializes every asset downstream of the
source metadata, one run per step, in the asset graph's order, printing a line per step:
metadata, downloads, labels and stats for each part, then the stats roll-up and the sampling plan
over all parts, then each part's subset, then the manifest; ``dagster dev`` then shows the
materializations. Each flag is a setting of one stage (its help, type and checks are the stage's
own, ``download/settings.py`` and the like); every setting is checked before any work starts. A
step that fails prints one line (the step, why, what to do; the traceback too with ``-v``) and the
run stops with exit status 1.

``compare`` materializes ``label_agreement``: two label sets (labeler ids) side by side.

``clear`` deletes some parts' output of one stage and of every stage after it, so that the next
``run`` makes them again: what a mismatch error (another source part, other download settings)
tells you to run.

``estimate`` prints what a full run costs and how long it takes, as markdown (README's cost
table): from the benchmarks' JSON kept in ``--results`` where they were measured, published
figures where not, saying which (``estimate.py`` names the files and the assumptions).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from coyo_platform.common import layout
from coyo_platform.common.shards import STAGES
from coyo_platform.download.settings import DownloadSettings
from coyo_platform.ingest.metadata import IngestSettings
from coyo_platform.label.settings import LabelSettings
from coyo_platform.sample.rules import Sampling
from coyo_platform.sample.wds import WdsSettings

#: The run's flags: (asset, its stage's settings, the settings offered as flags).
FLAGS = (
    ("coyo700m_metadata", IngestSettings, ("limit",)),
    (
        "downloaded_shards",
        DownloadSettings,
        (
            "image_size",
            "allow_networks",
            "drop_drifted",
            "shard_retries",
            "outage_backoff",
            "retry_failed",
            "dedup_crawl_phash",
            "keep_original",
        ),
    ),
    ("labeled_shards", LabelSettings, ("model", "checkpoint", "preset", "precision")),
    (
        "subset_plan",
        Sampling,
        ("threshold", "target_rows", "target_fraction", "dedup", "class_cap"),
    ),
    ("coyo_labeled_300m_wds", WdsSettings, ("shard_bytes",)),
)

# What the progress line of each step shows from its materialization metadata.
_SUMMARY_KEYS = {
    "coyo700m_metadata": ("rows",),
    "downloaded_shards": (
        "succeeded",
        "failed",
        "crawl_duplicates_dropped",
        "transient_failures",
        "recovered",
        "images_per_second",
    ),
    "labeled_shards": ("labeler", "images_labeled", "images_failed", "images_per_second", "device"),
    "label_stats": ("images_labeled",),
    "coyo_labeled_300m": ("rows", "share_kept"),
    "label_stats_rollup": ("partitions", "images_labeled"),
    "subset_plan": ("threshold", "rows", "duplicates_dropped"),
    "subset_manifest": ("partitions", "rows"),
    "coyo_labeled_300m_wds": ("samples", "shards", "shards_written", "bytes"),
    "wds_manifest": ("partitions", "samples", "shards"),
    "label_agreement": (
        "baseline",
        "candidate",
        "images_compared",
        "top1_agreement",
        "top5_overlap",
        "top1_prob_mean_abs_diff",
    ),
}


#: The demo's working folder's name (a temp folder): how a later demo knows an earlier one's.
DEMO_PREFIX = "coyo-demo-"
DEMO_MARKER = ".coyo-demo"  # in a demo's folder given with --workdir


def steps(wds: bool = True) -> list[tuple[bool, list]]:
    """The assets a run materializes, in the asset graph's order (level by level), grouped into
    runs of partitioned assets (done part by part) and unpartitioned ones (done once); the
    webdataset shards and their manifest among them (``wds``: :func:`run` decides per part)."""
    import dagster as dg

    from coyo_platform.definitions import COMPARISONS, PIPELINE, ROLLUPS, TRAINING, defs

    graph = defs.resolve_asset_graph()
    by_key = {a.key: a for a in [*PIPELINE, *ROLLUPS, *TRAINING]}  # without resources bound
    left_out = dg.AssetSelection.assets(*COMPARISONS, *([] if wds else TRAINING))
    wanted = (dg.AssetSelection.assets(*PIPELINE).downstream() - left_out).resolve(graph)
    order = [
        key
        for level in graph.toposorted_asset_keys_by_level
        for key in sorted(level, key=lambda k: k.to_user_string())
        if key in wanted
    ]
    groups: list[tuple[bool, list]] = []
    for key in order:
        asset = by_key[key]
        partitioned = asset.partitions_def is not None
        if groups and groups[-1][0] == partitioned:
            groups[-1][1].append(asset)
        else:
            groups.append((partitioned, [asset]))
    return groups


def check_settings(configs: dict[str, dict[str, Any]]) -> None:
    """Every step's settings, checked by its stage before any work: a clear exit otherwise."""
    from coyo_platform.assets import config_class_of

    for _, assets in steps():
        for asset in assets:
            config_class = config_class_of(asset)
            if config_class is None:
                continue
            name = asset.key.to_user_string()
            try:
                config_class(**configs.get(name, {})).to_settings()
            except ValueError as err:  # pydantic's ValidationError is one too
                raise SystemExit(f"{name}: bad setting: {err}") from err


def _prepare_instance() -> Any:
    home = Path(os.environ.get("DAGSTER_HOME") or ".dagster").absolute()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    config = home / "dagster.yaml"
    if not config.exists():  # SQLite storage is the default; no telemetry from an offline box
        config.write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    import dagster as dg

    return dg.DagsterInstance.get()


def _failure_text(result, verbose: bool) -> str:
    """The step's failure in one line (a ``dg.Failure``'s description, else the error's
    innermost cause), or with ``verbose`` the whole chain with its tracebacks."""
    failures = [e.step_failure_data for e in result.all_events if e.is_step_failure]
    data = failures[0] if failures else None
    error = data.error if data else None
    if error is None:
        return "unknown error (rerun with -v)"
    if verbose:
        return error.to_string()
    description = data.user_failure_data.description if data.user_failure_data else None
    while error.cause is not None and not description:
        error = error.cause
    text = description or error.message.strip()
    return " ".join(text.split()) + ("" if description else " (rerun with -v for the traceback)")


def _materialize(
    asset, instance, resources, part: str | None, config: dict, verbose: bool = False
) -> str:
    import dagster as dg

    from coyo_platform.definitions import CHECKS

    name, where = asset.key.to_user_string(), f"[{part or 'all'}]"
    checks = [c for c in CHECKS if asset.key in {spec.asset_key for spec in c.check_specs}]
    level = "INFO" if verbose else "CRITICAL"  # failures are printed below, one line each
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": level}}}}
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
        raise SystemExit(
            f"{where} {name} FAILED after {took:.1f}s: {_failure_text(result, verbose)}"
        )
    blocking = []
    for check in (e for e in result.get_asset_check_evaluations() if not e.passed):
        figures = ", ".join(f"{k}={v.value}" for k, v in check.metadata.items())
        print(f"{where} check {check.check_name} FAILED ({check.severity.value}): {figures}")
        if check.severity.value == "ERROR":  # a blocking check: nothing is built on it
            blocking.append(check.check_name)
    if blocking:
        raise SystemExit(f"{where} {name}: blocking check {', '.join(blocking)} failed; stopped")
    materialized = result.asset_materializations_for_node(name)
    if not materialized:
        print(f"{where} {name:<20} unchanged in {took:6.1f}s", flush=True)
        return ""
    metadata = materialized[-1].metadata
    shown = ", ".join(
        f"{k}={metadata[k].value}" for k in _SUMMARY_KEYS.get(name, ()) if k in metadata
    )
    print(f"{where} {name:<20} ok in {took:6.1f}s  {shown}", flush=True)
    return str(metadata["path"].value) if "path" in metadata else ""


def _stale_subsets(resources: dict[str, Any]) -> list[str]:
    """Partitions whose subset was written under another plan than the current one (a plan over
    all partitions changed when this run's parts joined it: dedup, caps, a target size)."""
    from coyo_platform.common import layout
    from coyo_platform.sample.plan import current_plan
    from coyo_platform.sample.subset import PLAN_DIGEST_KEY

    store = resources["storage"].store()
    digest = current_plan(store).digest
    return [
        key
        for key, url in sorted(layout.subset_files(store).items())
        if store.parquet_metadata(url)[1].get(PLAN_DIGEST_KEY) != digest
    ]


def run(
    source: str,
    parts: list[str],
    configs: dict[str, dict[str, Any]] | None = None,
    data_root: str | None = None,
    verbose: bool = False,
    wds: bool = False,
) -> list[str]:
    """Materialize the graph for ``parts`` with each asset's ``configs`` (settings by name);
    returns the subset files' paths. The webdataset shards are written for every part with
    ``wds``, and kept current without it where they exist already (as automation does)."""
    from coyo_platform.definitions import local_resources

    configs = {name: dict(values) for name, values in (configs or {}).items()}
    check_settings(configs)
    instance = _prepare_instance()
    resources = local_resources(source=source, data_root=data_root)
    new = [p for p in parts if not instance.has_dynamic_partition("coyo_parts", p)]
    instance.add_dynamic_partitions("coyo_parts", new)
    print(f"instance {os.environ['DAGSTER_HOME']}; data root {resources['storage'].store().root}")
    print(f"parts: {', '.join(parts)} ({len(new)} new partitions)")
    store = resources["storage"].store()
    outputs: list[str] = []
    shards, any_shards = "", False
    stale: list[str] = []  # other parts whose subsets (and the steps after them) are rewritten
    for partitioned, assets in steps():
        if partitioned and any(a.key.to_user_string() == "coyo_labeled_300m" for a in assets):
            stale = [k for k in _stale_subsets(resources) if k not in parts]
            if stale:
                print(f"subsets written under another plan, rewritten too: {', '.join(stale)}")
        for part in parts + stale if partitioned else [None]:
            for asset in assets:
                name = asset.key.to_user_string()
                asked = wds and (part is None or part in parts)  # not for the stale parts
                shards_here = _has_shards(store, part) or (part is None and any_shards)
                if name in TRAINING and not (asked or shards_here):
                    continue
                config = configs.get(name, {})
                path = _materialize(asset, instance, resources, part, config, verbose)
                if name == "coyo_labeled_300m":
                    outputs.append(path)
                elif name == "coyo_labeled_300m_wds":
                    any_shards = True
                elif name == "wds_manifest":
                    shards = path
    print("COYO-Labeled-300M subset written to:")
    for path in outputs:
        print(f"  {path}")
    card = layout.card(store)
    if outputs and store.exists(card):
        print(f"its dataset card (how to load it, what made it): {card}")
    if shards:
        print(f"its webdataset shards: {store.url(layout.WDS)} (manifest {shards})")
    return outputs


#: The assets that write the webdataset shards: run with ``--wds``, or where shards exist.
TRAINING = ("coyo_labeled_300m_wds", "wds_manifest")


def _has_shards(store: Any, part: str | None) -> bool:
    """Shards were written for ``part`` (for all parts: the manifest was)."""
    url = layout.wds_progress(store, part) if part else layout.wds_manifest(store)
    return store.exists(url)


def demo(workdir: Path, parts: int = 2, rows: int = 150) -> list[str]:
    """The offline demo: a loopback image server, two small parts, a random-weight model."""
    from coyo_platform import demo as fixtures

    images, source = workdir / "images", workdir / "source"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text("a coyo-platform demo's folder\n")
    items = fixtures.write_images(images)
    checkpoint = fixtures.make_random_model(workdir / "random_test_efficientnet.pth", images)
    print(
        "DEMO: the labeling model is timm's tiny test_efficientnet with RANDOM weights, made "
        "offline.\n      Its labels are meaningless; the demo shows the pipeline, not a labeler."
    )
    with fixtures.serve_folder(images) as base_url:
        keys = fixtures.write_parts(source, images, items, base_url, parts, rows)
        print(f"image server {base_url}; {parts} parts of {rows} rows in {source}")
        _clear_earlier_demo(keys)
        configs = fixtures.demo_configs(checkpoint)
        return run(source=str(source), parts=keys, configs=configs, wds=True)


def _clear_earlier_demo(keys: list[str]) -> None:
    """A demo run again: its parts point at a new image server (another port, other URLs), so
    the downloads an earlier demo left would be refused as another source's; clear them (only
    the partitions an earlier demo's source folder made, nothing else)."""
    from coyo_platform.common.shards import clear_partition
    from coyo_platform.definitions import local_resources

    store = local_resources()["storage"].store()
    for key in keys:
        made = store.read_json_if_exists(layout.download_record(layout.shards(store, key)))
        where = str((made or {}).get("source_location", ""))
        marked = any((p / DEMO_MARKER).exists() for p in Path(where).parents[:2])
        if where and (DEMO_PREFIX in where or marked):
            clear_partition(store, key, "downloaded_shards")
            print(f"[{key}] an earlier demo's output (source {where}): cleared, to run anew")


def _parser() -> argparse.ArgumentParser:
    from coyo_platform.common import settings as declared

    parser = argparse.ArgumentParser(prog="coyo-platform", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="materialize every asset for some COYO-700M parts")
    r.add_argument("--source", default=os.environ.get("COYO_SOURCE"), help="folder, s3:// or hf://")
    r.add_argument("--parts", nargs="+", required=True, metavar="PART", help="e.g. part-00000")
    r.add_argument(
        "--data-root", default=None, help="storage root (default $COYO_DATA_ROOT or ./data)"
    )
    for asset, settings, names in FLAGS:
        group = r.add_argument_group(f"settings of {asset}")
        declared.add_arguments(group, settings, names, unset=True)
    r.add_argument(
        "--wds",
        action="store_true",
        help="write webdataset shards of the kept images too (kept current without the flag "
        "for the parts that have them)",
    )
    r.add_argument("-v", "--verbose", action="store_true", help="show Dagster's INFO logs")
    c = sub.add_parser("clear", help="delete parts' output of a stage and of the stages after it")
    c.add_argument("--parts", nargs="+", required=True, metavar="PART")
    c.add_argument("--from", dest="stage", required=True, choices=STAGES)
    c.add_argument(
        "--data-root", default=None, help="storage root (default $COYO_DATA_ROOT or ./data)"
    )
    a = sub.add_parser("compare", help="two label sets side by side (label_agreement)")
    a.add_argument("--baseline", default=None, help="labeler id of the labels in use")
    a.add_argument("--candidate", default=None, help="labeler id of the new labels")
    a.add_argument("--parts", nargs="+", default=None, metavar="PART")
    a.add_argument(
        "--data-root", default=None, help="storage root (default $COYO_DATA_ROOT or ./data)"
    )
    a.add_argument("-v", "--verbose", action="store_true", help="show Dagster's INFO logs")
    x = sub.add_parser("export", help="copy the subset and its card to a folder, s3:// or hf://")
    x.add_argument("--to", required=True, metavar="URL", help="any fsspec URL")
    x.add_argument(
        "--data-root", default=None, help="storage root (default $COYO_DATA_ROOT or ./data)"
    )
    x.add_argument(
        "--wds-to",
        default=None,
        metavar="URL",
        help="copy the webdataset shards too, to this URL (not inside --to)",
    )
    x.add_argument("--endpoint-url", default=None, help="an S3-compatible destination's endpoint")
    x.add_argument(
        "--allow-incomplete", action="store_true", help="export a subset its manifest finds lacking"
    )
    d = sub.add_parser("demo", help="offline demo: local image server, two small parts")
    d.add_argument("--workdir", default=None, help="where fixtures go (default: a temp dir)")
    _estimate_parser(sub)
    return parser


def _count(text: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def _amount(text: str, allow_zero: bool = False) -> float:
    """An argparse type: a finite number above 0 (or at least 0 with ``allow_zero``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(
            f"must be {'0 or more' if allow_zero else 'above 0'}, got {text}"
        )
    return value


def _price(text: str) -> float:
    return _amount(text, allow_zero=True)


def _estimate_parser(sub: Any) -> None:
    from coyo_platform import estimate as est

    e = sub.add_parser("estimate", help="what a full run costs and how long it takes (markdown)")
    e.add_argument(
        "--parts", type=_count, default=est.CARD_PARTS, metavar="N", help="partitions (default 128)"
    )
    e.add_argument(
        "--rows-per-part",
        type=_amount,
        default=est.ROWS_PER_PART,
        metavar="ROWS",
        help="rows a part (default: the card's 747M / 128)",
    )
    e.add_argument(
        "--gpus",
        type=_count,
        default=est.GPUS,
        metavar="N",
        help=f"GPUs labeling (default {est.GPUS})",
    )
    e.add_argument(
        "--download-nodes",
        type=_count,
        default=est.DOWNLOAD_NODES,
        metavar="M",
        help=f"download nodes (default {est.DOWNLOAD_NODES})",
    )
    e.add_argument(
        "--cores-per-node",
        type=_count,
        default=est.CORES_PER_NODE,
        metavar="C",
        help=f"a download node's cores (default {est.CORES_PER_NODE})",
    )
    e.add_argument(
        "--price-gpu",
        type=_price,
        default=None,
        metavar="USD",
        help=f"USD a GPU-hour (default {est.PRICE_GPU:.2f}: an H100 on demand, assumed)",
    )
    e.add_argument(
        "--price-cpu",
        type=_price,
        default=None,
        metavar="USD",
        help=f"USD a download node-hour (default {est.PRICE_CPU:.2f}: a c7i.4xlarge, assumed)",
    )
    e.add_argument(
        "--results",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"the benchmarks' kept JSON (default {est.DEFAULT_RESULTS}; missing: none)",
    )


def estimate(args: argparse.Namespace) -> str:
    """``coyo-platform estimate``: the estimate's markdown; a clear exit for a folder that is not
    there (when named) or a kept JSON it cannot use."""
    from coyo_platform import estimate as est

    if args.results is not None and not args.results.is_dir():
        raise SystemExit(f"estimate: --results {args.results}: no such folder")
    try:
        figures = est.estimate(
            args.parts,
            gpus=args.gpus,
            download_nodes=args.download_nodes,
            price_gpu=args.price_gpu,
            price_cpu=args.price_cpu,
            cores_per_node=args.cores_per_node,
            rows_per_part=args.rows_per_part,
            results=args.results or est.DEFAULT_RESULTS,
        )
    except est.EstimateError as err:
        raise SystemExit(f"estimate: {err}") from err
    return est.render(figures)


def configs_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The settings the flags give, by asset (flags not given are left to the stage's defaults)."""
    configs: dict[str, dict[str, Any]] = {}
    for asset, _, names in FLAGS:
        given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
        configs[asset] = {n: list(v) if isinstance(v, tuple) else v for n, v in given.items()}
    checkpoint = configs["labeled_shards"].get("checkpoint")
    if checkpoint and "://" not in checkpoint:  # recorded in the runs: re-executed from anywhere
        configs["labeled_shards"]["checkpoint"] = str(Path(checkpoint).absolute())
    return configs


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "run":
        from coyo_platform.ingest.sources import HUB_SOURCE

        run(
            source=args.source or HUB_SOURCE,
            parts=args.parts,
            configs=configs_from(args),
            data_root=args.data_root,
            verbose=args.verbose,
            wds=args.wds,
        )
    elif args.command == "compare":
        compare(args.baseline, args.candidate, args.parts, args.data_root, args.verbose)
    elif args.command == "clear":
        clear(args.parts, args.stage, args.data_root)
    elif args.command == "estimate":
        print(estimate(args), end="")
    elif args.command == "export":
        export(args.to, args.data_root, args.endpoint_url, args.allow_incomplete, args.wds_to)
    else:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix=DEMO_PREFIX))
        demo(workdir)


def compare(
    baseline: str | None,
    candidate: str | None,
    parts: list[str] | None = None,
    data_root: str | None = None,
    verbose: bool = False,
) -> str:
    """Materialize ``label_agreement`` for two label sets; prints its figures, returns its JSON."""
    from coyo_platform.definitions import label_agreement, local_resources

    config = {"baseline": baseline, "candidate": candidate, "partitions": parts}
    instance = _prepare_instance()
    resources = local_resources(data_root=data_root)
    return _materialize(label_agreement, instance, resources, None, config, verbose)


def export(
    to: str,
    data_root: str | None = None,
    endpoint_url: str | None = None,
    allow_incomplete: bool = False,
    wds_to: str | None = None,
) -> None:
    """Copy the subset, its card and manifest to ``to``, and the webdataset shards to ``wds_to``,
    verified there (``sample/export.py``)."""
    from coyo_platform.common.storage import Storage
    from coyo_platform.definitions import local_resources
    from coyo_platform.sample.export import ExportRefused, export_subset, export_wds

    if wds_to is not None:
        subset, shards = Storage(to).root, Storage(wds_to).root
        if subset == shards or f"{shards}/".startswith(f"{subset}/"):
            raise SystemExit(
                f"coyo-platform export: --wds-to {wds_to} is --to {to} or inside it: a parquet "
                "loader given that folder would read the shards too; give the shards a URL of "
                "their own"
            )
        if f"{subset}/".startswith(f"{shards}/"):
            raise SystemExit(
                f"coyo-platform export: --to {to} is inside --wds-to {wds_to}: give each a URL "
                "of its own"
            )
    store = local_resources(data_root=data_root)["storage"].store()
    try:
        done = [("rows", export_subset(store, to, endpoint_url, allow_incomplete))]
        if wds_to is not None:
            done.append(("samples", export_wds(store, wds_to, endpoint_url, allow_incomplete)))
    except ExportRefused as err:
        raise SystemExit(f"coyo-platform export: {err}") from err
    for what, report in done:
        print(
            f"exported {report.rows:,} {what} ({report.bytes:,} bytes) to {report.destination}: "
            f"{len(report.copied)} files copied, {len(report.skipped)} already there and "
            f"verified, {len(report.deleted)} stale files deleted"
        )


def clear(parts: list[str], stage: str, data_root: str | None = None) -> list[str]:
    """Delete ``parts``' output of ``stage`` and of the stages after it; prints what went."""
    from coyo_platform.common.shards import clear_partition
    from coyo_platform.definitions import local_resources

    store = local_resources(data_root=data_root)["storage"].store()
    gone = []
    for part in parts:
        deleted = clear_partition(store, part, stage)
        print(f"[{part}] cleared from {stage}: {len(deleted)} path(s)")
        for url in deleted:
            print(f"  deleted {url}")
        gone += deleted
    return gone


if __name__ == "__main__":
    sys.exit(main())
