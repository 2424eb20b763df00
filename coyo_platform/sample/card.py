"""The subset's dataset card: ``<root>/coyo_labeled_300m/README.md``, generated from the run,
in the form of COYO-Labeled-300M's card (its YAML header, its fields), with what this run
measured: the threshold table, the rows of every part with its source digest, the top classes
by name, a chart of the top-1 distribution (``.coyo/top1.png``), the labeler, the sampling plan,
and how to load it. The folder holds only parquet parts and the card (the platform's other
files are in the hidden ``.coyo/``), so that ``datasets.load_dataset("parquet", data_dir=...)``
reads it as it is.

The counts come from each part's summary (``.coyo/summary/<part>.json``, written with the part
by ``subset.write_subset``), or from the part itself when its summary is missing or was written
for another file. Imports no ``dagster``.
"""

from __future__ import annotations

import math
from typing import Any

from coyo_platform.common import labelspace, layout
from coyo_platform.common.formats import CARD_SCHEMA
from coyo_platform.common.storage import Storage
from coyo_platform.sample.manifest import Manifest, ManifestPart
from coyo_platform.sample.plan import Plan
from coyo_platform.sample.subset import summarize
from coyo_platform.stats.aggregate import HISTOGRAM_BINS, Aggregate
from coyo_platform.stats.chart import stats_chart
from coyo_platform.stats.report import threshold_rows

TOP_CLASSES = 20
#: What the card says of the labeler: (name, key in its record or its settings).
_LABELER_FIELDS = [
    ("model", "model"),
    ("checkpoint", "checkpoint"),
    ("checkpoint sha256", "weights_sha256"),
    ("preset", "preset"),
    ("input size", "input_size"),
    ("interpolation", "interpolation"),
    ("resize", "resize"),
    ("mean", "mean"),
    ("std", "std"),
    ("crop", "crop_pct"),
    ("activation", "activation"),
    ("precision", "precision"),
    ("probabilities", "probabilities"),
    ("device", "device"),
    ("decode", "decode"),
    ("torch", "torch"),
    ("timm", "timm"),
]

_FIELDS = {
    "id": "COYO-700M's 64-bit id of the image-text pair (the same value as in COYO-700M)",
    "url": "the image URL (from COYO-700M)",
    "imagehash": "the perceptual hash (pHash) of the downloaded image, 16 hex digits",
    "labels": "the labeler's top 50 class indices among ImageNet-21k's 21,841 (fall11 order)",
    "label_probs": "their probabilities, in the same order (highest first)",
    "width": "the downloaded image's width in pixels",
    "height": "the downloaded image's height in pixels",
}


def size_category(rows: int) -> str:
    """The hub's ``size_categories`` value for ``rows`` (``n<1K`` ... ``n>1T``)."""
    names = ["1K", "10K", "100K", "1M", "10M", "100M", "1B", "10B", "100B", "1T"]
    if rows < 1000:
        return "n<1K"
    power = min(int(math.log10(rows)) - 3, len(names) - 1)
    if power >= len(names) - 1:
        return "n>1T"
    return f"{names[power]}<n<{names[power + 1]}"


def _summary(store: Storage, part: ManifestPart) -> dict[str, Any]:
    found = store.read_json_if_exists(layout.subset_summary(store, part.partition))
    if found and found.get("plan_digest") == part.plan_digest and found.get("rows") == part.rows:
        return found
    return summarize(store.scan_parquet(part.path))  # a part written before summaries


def _type(field_type: Any) -> str:
    return str(field_type).replace("list<item: ", "list<").replace("element: ", "")


def _merged(summaries: list[dict[str, Any]]) -> tuple[list[int], list[tuple[int, int]]]:
    """The parts' top-1 histogram summed, and (class, images) by images, most first."""
    histogram = [0] * HISTOGRAM_BINS
    classes: dict[int, int] = {}
    for s in summaries:
        histogram = [a + b for a, b in zip(histogram, s["top1_histogram"], strict=True)]
        for c, n in s["top1_classes"].items():
            classes[int(c)] = classes.get(int(c), 0) + n
    return histogram, sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))


def card_text(
    store: Storage,
    manifest: Manifest,
    plan: Plan,
    histogram: list[int],
    classes: list[tuple[int, int]],
    names: list[str],
) -> str:
    """The card's Markdown, YAML header first."""
    rows = sum(p.rows for p in manifest.parts)
    labelers = manifest.labelers
    record = {}
    if len(labelers) == 1 and labelers[0]:
        url = layout.labeler_record(layout.label_sets(store), labelers[0])
        record = store.read_json_if_exists(url) or {}
    settings = record.get("settings", {})
    rollup_url = layout.rollup(store)
    rollup = store.read_json_if_exists(rollup_url)
    out = [
        "---",
        "annotations_creators:",
        "- machine-generated",
        "language:",
        "- en",
        "language_creators:",
        "- other",
        "license:",
        "- cc-by-4.0",
        "multilinguality:",
        "- monolingual",
        "pretty_name: COYO-Labeled-300M (rebuilt with coyo_platform)",
        "size_categories:",
        f"- {size_category(rows)}",
        "source_datasets:",
        "- kakaobrain/coyo-700m",
        "tags:",
        "- image-labeled pairs",
        "task_categories:",
        "- image-classification",
        "task_ids:",
        "- multi-label-image-classification",
        "configs:",
        "- config_name: default",
        '  data_files: "*.parquet"',
        "---",
        "# Dataset Card for COYO-Labeled-300M (rebuilt)",
        "",
        "Generated by coyo_platform from the run that wrote this folder; rewritten whenever the",
        "subset changes.",
        "",
        "## Dataset Summary",
        "",
        f"**{rows:,} images** with machine labels, in {len(manifest.parts)} parquet files (one per",
        "COYO-700M part): the images of COYO-700M that were downloaded and labeled, whose top-1",
        f"probability is at least **{plan.threshold:g}**"
        + (", after the plan's deduplication and class caps" if _filtered(plan) else "")
        + ". Each row carries the top 50 of ImageNet-21k's 21,841 classes with their",
        "probabilities (`labels`, `label_probs`), so that a user can choose a threshold for",
        "multi-label use, or take the top-1 class for single-label use.",
    ]
    if not manifest.complete:
        out += ["", "**Incomplete:** " + "; ".join(manifest.problems[:10])]
    out += [
        "",
        "## How to load",
        "",
        "```python",
        "import datasets",
        'ds = datasets.load_dataset("parquet", data_dir="<this folder>", split="train")',
        "",
        "import polars as pl",
        'frame = pl.scan_parquet("<this folder>/*.parquet")',
        "```",
        "",
        "## Data Fields",
        "",
        "| name | type | description |",
        "|---|---|---|",
    ]
    out += [f"| {f.name} | {_type(f.type)} | {_FIELDS[f.name]} |" for f in CARD_SCHEMA]
    out += ["", "## Thresholds", ""]
    if rollup:
        agg = Aggregate.from_json(rollup)
        out += [
            f"Over all {agg.images:,} labeled images (`label_stats_rollup`): for each threshold,",
            "the labels per image at or above it, the classes that appear, and the images whose",
            "top-1 clears it.",
            "",
            "| threshold | labels per image | unique labels | images kept | share |",
            "|---:|---:|---:|---:|---:|",
        ]
        out += [
            f"| {r['threshold']:g} | {r['labels_per_image']:.2f} | {r['unique_labels']:,} | "
            f"{r['images_kept']:,} | {r['share_kept']:.2%} |"
            for r in threshold_rows(agg)
        ]
    else:
        out.append("Not measured: `label_stats_rollup` was not materialized.")
    top = classes[:TOP_CLASSES]
    out += [
        "",
        "## Top-1 distribution",
        "",
        f"![Images by top-1 probability, and the top classes]({layout.SUBSET_META}/top1.png)",
        "",
        "| top-1 probability | images |",
        "|---|---:|",
    ]
    out += [
        f"| {i / HISTOGRAM_BINS:.2f}-{(i + 1) / HISTOGRAM_BINS:.2f} | {n:,} |"
        for i, n in enumerate(histogram)
        if n
    ]
    out += [
        "",
        f"## Top {len(top)} classes (by top-1 label)",
        "",
        "| label | class | images | share |",
        "|---:|---|---:|---:|",
    ]
    out += [f"| {c} | {names[c]} | {n:,} | {n / (rows or 1):.2%} |" for c, n in top]
    out += ["", "## Labeler", ""]
    if record:
        given = {**{k: settings.get(k) for k in ("preset", "checkpoint")}, **record}
        out.append(f"- label set: `{labelers[0]}`")
        out += [
            f"- {name}: {given[key]}"
            for name, key in _LABELER_FIELDS
            if given.get(key) not in (None, "", [])
        ]
    else:
        out.append(
            f"{len(labelers)} labelers: {', '.join(labelers) or 'none'} (a subset of one labeler"
            " has its record here)"
        )
    sampling = {k: v for k, v in manifest.sampling.items() if v not in (None, False)}
    out += [
        "",
        "## Sampling plan",
        "",
        "- plan: "
        + (
            "the default (`subset_plan` never materialized)" if plan.default else f"`{plan.digest}`"
        ),  # fmt: skip
        f"- settings: {', '.join(f'{k}={v}' for k, v in sorted(sampling.items())) or 'defaults'}",
        f"- threshold: {plan.threshold!r}"
        + (
            f" (found for a target of {plan.target_rows:,} images)" if plan.target_rows else ""
        ),  # fmt: skip
        f"- images labeled: {plan.images_labeled:,}; eligible after dedup and caps: "
        f"{plan.images_eligible:,}; kept: {rows:,}",
        f"- duplicates dropped (same pHash): {plan.duplicates_dropped:,}; classes capped: "
        f"{plan.classes_capped:,}",
        "",
        "## Parts",
        "",
        "Each part's rows, bytes, and the digest of the COYO-700M part it came from (its ids and "
        "URLs).",
        "",
        "| part | rows | bytes | source | source sha256 |",
        "|---|---:|---:|---|---|",
    ]
    out += [
        f"| {p.partition} | {p.rows:,} | {p.bytes:,} | {p.source or '?'} | "
        f"{p.source_sha256 or '?'} |"
        for p in manifest.parts
    ]
    out += [
        "",
        "## Source Data and License",
        "",
        "[COYO-700M](https://huggingface.co/datasets/kakaobrain/coyo-700m), under CC-BY-4.0, as",
        "COYO-Labeled-300M; the images belong to their owners: this card and the parquet files",
        "hold URLs and labels only.",
        "",
    ]
    return "\n".join(out)


def _filtered(plan: Plan) -> bool:
    return bool(plan.duplicates_dropped or plan.classes_capped or plan.crawl_duplicates_dropped)


def write_card(store: Storage, manifest: Manifest, plan: Plan) -> str:
    """Write the card and its chart; returns the card's URL."""
    histogram, classes = _merged([_summary(store, p) for p in manifest.parts])
    names = labelspace.class_names()
    text = card_text(store, manifest, plan, histogram, classes, names)
    chart = stats_chart(histogram, [(names[c], n) for c, n in classes[:10]])
    store.write_bytes(layout.card_chart(store), chart)
    url = layout.card(store)
    store.write_bytes(url, text.encode())
    return url
