"""How far two label sets agree: a baseline A (the labels in use, say) against a candidate B (a
new model, other weights, another precision), over the partitions both have labels for. Before a
candidate replaces the baseline, a person wants to know how many images change their top-1 class,
how much the top-5 lists overlap, how much the top-1 probability moves, and what the card's
threshold table would look like under each set.

Per partition the comparison runs shard by shard: the two label files of one shard (one per set)
are read, and only those, so memory is two shards' rows whatever a partition's size. Only shards
labeled in both sets are compared (``shards_only_baseline`` / ``shards_only_candidate`` count the
others); within them rows are joined on ``id``, and only images labeled in both (``error`` null,
labels present) are compared; the images labeled in one set alone are counted
(``only_baseline`` / ``only_candidate``). For each image compared:

- top-1 agreement: ``labels[0]`` is the same class in both;
- top-5 overlap: ``|top5(A) ∩ top5(B)| / 5`` (a list shorter than 5 still divides by 5);
- top-1 probability difference: ``|label_probs[0](A) - label_probs[0](B)|`` (in float64).

Each figure is kept as an integer count or a sum, and shares are taken last, so the totals over
partitions weigh every image alike (not an average of the partitions' averages). The threshold
table (images kept, labels per image; definitions in ``stats/aggregate.py``) is counted with
``aggregate_files`` on the same shared shards of each set, so both sides count the same images.
Imports no ``dagster``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from coyo_platform.common import layout
from coyo_platform.common.formats import labeled_ok
from coyo_platform.common.shards import label_files
from coyo_platform.common.storage import Storage
from coyo_platform.common.tables import Table
from coyo_platform.stats.aggregate import CARD_THRESHOLDS, aggregate_files, check_thresholds

#: Labels compared per image for the overlap.
TOP_N = 5
#: The totals' row in ``agreement_table``.
ALL = "all"


def _share(part: int | float, whole: int) -> float | None:
    """``part / whole``; None when there is nothing to divide by (no image compared)."""
    return part / whole if whole else None


@dataclass
class ThresholdPair:
    """One threshold of the card's table, counted under both sets (``stats.aggregate``'s
    ``kept`` and ``labels_above``), over the shards labeled in both."""

    threshold: float
    kept_baseline: int
    kept_candidate: int
    labels_above_baseline: int
    labels_above_candidate: int

    @property
    def labels_per_image_baseline(self) -> float:
        return self.labels_above_baseline / self.kept_baseline if self.kept_baseline else 0.0

    @property
    def labels_per_image_candidate(self) -> float:
        return self.labels_above_candidate / self.kept_candidate if self.kept_candidate else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "kept_baseline": self.kept_baseline,
            "kept_candidate": self.kept_candidate,
            "labels_above_baseline": self.labels_above_baseline,
            "labels_above_candidate": self.labels_above_candidate,
            "labels_per_image_baseline": self.labels_per_image_baseline,
            "labels_per_image_candidate": self.labels_per_image_candidate,
        }


@dataclass
class PartitionAgreement:
    """One partition's figures (or, as ``Agreement.total``, their sum), as counts and sums."""

    partition: str
    shards: int = 0  # labeled in both sets: compared
    shards_only_baseline: int = 0  # labeled in the baseline alone: not compared
    shards_only_candidate: int = 0
    images: int = 0  # labeled in both sets: compared
    top1_agree: int = 0  # images with the same top-1 class
    top5_shared: int = 0  # sum over the images of |top5(A) ∩ top5(B)|
    top1_prob_abs_diff_sum: float = 0.0  # sum over the images of |p1(A) - p1(B)|
    only_baseline: int = 0  # labeled in the baseline alone, in the compared shards
    only_candidate: int = 0
    thresholds: list[ThresholdPair] = field(default_factory=list)

    @property
    def top1_agreement(self) -> float | None:
        """Share of the compared images whose top-1 class is the same in both sets."""
        return _share(self.top1_agree, self.images)

    @property
    def top5_overlap(self) -> float | None:
        """Mean of ``|top5(A) ∩ top5(B)| / 5`` over the compared images."""
        return _share(self.top5_shared, TOP_N * self.images)

    @property
    def top1_prob_mean_abs_diff(self) -> float | None:
        """Mean absolute difference of the top-1 probability over the compared images."""
        return _share(self.top1_prob_abs_diff_sum, self.images)

    def to_json(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "shards": self.shards,
            "shards_only_baseline": self.shards_only_baseline,
            "shards_only_candidate": self.shards_only_candidate,
            "images": self.images,
            "top1_agree": self.top1_agree,
            "top5_shared": self.top5_shared,
            "top1_prob_abs_diff_sum": self.top1_prob_abs_diff_sum,
            "only_baseline": self.only_baseline,
            "only_candidate": self.only_candidate,
            "top1_agreement": self.top1_agreement,
            "top5_overlap": self.top5_overlap,
            "top1_prob_mean_abs_diff": self.top1_prob_mean_abs_diff,
            "thresholds": [t.to_json() for t in self.thresholds],
        }


def _sum_partitions(
    name: str, parts: Sequence[PartitionAgreement], ts: Sequence[float]
) -> PartitionAgreement:
    total = PartitionAgreement(name, thresholds=[ThresholdPair(t, 0, 0, 0, 0) for t in ts])
    for p in parts:  # in partition order: the float sum comes out the same every time
        total.shards += p.shards
        total.shards_only_baseline += p.shards_only_baseline
        total.shards_only_candidate += p.shards_only_candidate
        total.images += p.images
        total.top1_agree += p.top1_agree
        total.top5_shared += p.top5_shared
        total.top1_prob_abs_diff_sum += p.top1_prob_abs_diff_sum
        total.only_baseline += p.only_baseline
        total.only_candidate += p.only_candidate
        for into, t in zip(total.thresholds, p.thresholds, strict=True):
            into.kept_baseline += t.kept_baseline
            into.kept_candidate += t.kept_candidate
            into.labels_above_baseline += t.labels_above_baseline
            into.labels_above_candidate += t.labels_above_candidate
    return total


@dataclass
class Agreement:
    """A baseline label set against a candidate, per partition (in key order) and in total."""

    baseline: str
    candidate: str
    thresholds: tuple[float, ...]
    partitions: list[PartitionAgreement]

    @property
    def total(self) -> PartitionAgreement:
        """Every partition's counts summed (partition ``"all"``)."""
        return _sum_partitions(ALL, self.partitions, self.thresholds)

    def to_json(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "thresholds": list(self.thresholds),
            "partitions": [p.to_json() for p in self.partitions],
            "total": self.total.to_json(),
        }


def _labeled() -> pl.Expr:
    """Rows that were labeled: not failed, with labels and probabilities."""
    return (
        labeled_ok() & (pl.col("labels").list.len() > 0) & (pl.col("label_probs").list.len() > 0)
    ).fill_null(False)


def _read_shard(store: Storage, url: str) -> pl.DataFrame:
    """A shard's labeled images: id, top-1 class, top-5 classes, top-1 probability."""
    return (
        store.scan_parquet([url])
        .select("id", "labels", "label_probs", "error")
        .filter(_labeled())
        .select(
            pl.col("id").cast(pl.Int64),
            top1=pl.col("labels").list.first(),
            top5=pl.col("labels").list.head(TOP_N),
            p1=pl.col("label_probs").list.first().cast(pl.Float64),
        )
        .collect()
    )


def _compare_shard(store: Storage, a_url: str, b_url: str, into: PartitionAgreement) -> None:
    a, b = _read_shard(store, a_url), _read_shard(store, b_url)
    try:
        both = a.join(b, on="id", how="inner", suffix="_b", validate="1:1")
    except pl.exceptions.ComputeError as exc:
        raise ValueError(f"an id repeats in {a_url} or {b_url}: {exc}") from exc
    row = both.select(
        images=pl.len(),
        agree=(pl.col("top1") == pl.col("top1_b")).sum(),
        shared=pl.col("top5").list.set_intersection(pl.col("top5_b")).list.len().sum(),
        diff=(pl.col("p1") - pl.col("p1_b")).abs().sum(),
    ).row(0, named=True)
    into.shards += 1
    into.images += int(row["images"])
    into.top1_agree += int(row["agree"])
    into.top5_shared += int(row["shared"])
    into.top1_prob_abs_diff_sum += float(row["diff"])
    into.only_baseline += a.height - int(row["images"])
    into.only_candidate += b.height - int(row["images"])


def _by_shard(files: list[str]) -> dict[str, str]:
    return {layout.shard_name(f): f for f in files}


def compare_partition(
    store: Storage,
    key: str,
    baseline: str,
    candidate: str,
    thresholds: Sequence[float] = CARD_THRESHOLDS,
) -> PartitionAgreement:
    """One partition's figures: its shards labeled in both sets, one shard at a time."""
    ts = check_thresholds(thresholds)
    a_files = _by_shard(label_files(store, key, baseline))
    b_files = _by_shard(label_files(store, key, candidate))
    shared = sorted(a_files.keys() & b_files.keys())
    part = PartitionAgreement(
        key,
        shards_only_baseline=len(a_files.keys() - b_files.keys()),
        shards_only_candidate=len(b_files.keys() - a_files.keys()),
    )
    for shard in shared:
        _compare_shard(store, a_files[shard], b_files[shard], part)
    agg_a = aggregate_files([a_files[s] for s in shared], ts, store)
    agg_b = aggregate_files([b_files[s] for s in shared], ts, store)
    part.thresholds = [
        ThresholdPair(t, ta.kept, tb.kept, ta.labels_above, tb.labels_above)
        for t, ta, tb in zip(ts, agg_a.thresholds, agg_b.thresholds, strict=True)
    ]
    return part


def partitions_labeled(store: Storage, labeler: str) -> list[str]:
    """Partition keys with at least one labeled shard in ``labeler``'s label set, sorted."""
    pattern = layout.shard_file(layout.labels(store, "*", labeler), "*", ".parquet")
    keys = {f.rstrip("/").rsplit("/", 2)[-2] for f in store.glob(pattern)}
    return sorted(k for k in keys if not k.startswith(("_", ".")))


def _check_label_set(store: Storage, labeler: str, role: str, existing: list[str]) -> None:
    if labeler not in existing:
        there = ", ".join(existing) if existing else "none"
        raise ValueError(
            f"no label set {labeler!r} (the {role}) under {layout.label_sets(store)}; "
            f"label sets there: {there}"
        )


def _keys_to_compare(
    store: Storage, baseline: str, candidate: str, keys: Sequence[str] | None
) -> list[str]:
    in_a = partitions_labeled(store, baseline)
    in_b = partitions_labeled(store, candidate)
    if keys is None:
        shared = sorted(set(in_a) & set(in_b))
        if not shared:
            raise ValueError(
                f"label sets {baseline!r} (the baseline, {len(in_a)} partitions) and "
                f"{candidate!r} (the candidate, {len(in_b)} partitions) share no partition"
            )
        return shared
    wanted = sorted(set(keys))
    if not wanted:
        raise ValueError("give at least one partition to compare (or None for all shared)")
    for labeler, role, present in ((baseline, "baseline", in_a), (candidate, "candidate", in_b)):
        missing = [k for k in wanted if k not in present]
        if missing:
            raise ValueError(
                f"label set {labeler!r} (the {role}) has no labels for partition(s) "
                f"{', '.join(missing)}"
            )
    return wanted


def compare_label_sets(
    store: Storage,
    baseline: str,
    candidate: str,
    keys: list[str] | None = None,
    thresholds: Sequence[float] = CARD_THRESHOLDS,
) -> Agreement:
    """Compare label set ``candidate`` with ``baseline`` over ``keys`` (None: every partition both
    have labels for), partitions in key order. Raises ValueError for the same set twice, a
    labeler id with no label set under the root, or no partition to compare."""
    if baseline == candidate:
        raise ValueError(f"baseline and candidate are the same label set: {baseline!r}")
    ts = check_thresholds(thresholds)
    existing = layout.labelers(store)
    _check_label_set(store, baseline, "baseline", existing)
    _check_label_set(store, candidate, "candidate", existing)
    parts = [
        compare_partition(store, key, baseline, candidate, ts)
        for key in _keys_to_compare(store, baseline, candidate, keys)
    ]
    return Agreement(baseline, candidate, ts, parts)


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def agreement_table(agreement: Agreement) -> Table:
    """One row per partition, then the totals (``all``)."""
    table = Table(
        {
            "partition": "string",
            "images": "int",
            "top1_agreement": "float",
            "top5_overlap": "float",
            "top1_prob_mean_abs_diff": "float",
            "only_baseline": "int",
            "only_candidate": "int",
        }
    )
    for p in [*agreement.partitions, agreement.total]:
        table.records.append(
            {
                "partition": p.partition,
                "images": p.images,
                "top1_agreement": _rounded(p.top1_agreement),
                "top5_overlap": _rounded(p.top5_overlap),
                "top1_prob_mean_abs_diff": _rounded(p.top1_prob_mean_abs_diff),
                "only_baseline": p.only_baseline,
                "only_candidate": p.only_candidate,
            }
        )
    return table


def thresholds_table(agreement: Agreement) -> Table:
    """The card's threshold table under both sets, over all compared partitions: A is the
    baseline, B the candidate."""
    table = Table(
        {
            "threshold": "string",
            "images kept A": "int",
            "images kept B": "int",
            "labels per image A": "float",
            "labels per image B": "float",
        }
    )
    for t in agreement.total.thresholds:
        table.records.append(
            {
                "threshold": f"{t.threshold:.2f}",
                "images kept A": t.kept_baseline,
                "images kept B": t.kept_candidate,
                "labels per image A": round(t.labels_per_image_baseline, 2),
                "labels per image B": round(t.labels_per_image_candidate, 2),
            }
        )
    return table
