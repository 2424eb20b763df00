"""Label stats: the partial aggregates give the card's table exactly, and merge exactly."""

from __future__ import annotations

import json
import random
from collections import Counter

import polars as pl
import pytest

from coyo_platform.stats import aggregate as stats
from coyo_platform.stats.report import threshold_rows


def _frame(rows: list[dict]) -> pl.DataFrame:
    """Label rows in the label program's column types."""
    return pl.DataFrame(
        rows,
        schema={
            "labels": pl.List(pl.Int32),
            "label_probs": pl.List(pl.Float32),
            "error": pl.String,
        },
    )


def _labels(n: int, seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        probs = sorted((rng.random() ** 4 for _ in range(50)), reverse=True)
        labels = rng.sample(range(21_841), 50)
        error = "decode: OSError" if i % 17 == 0 else None
        rows.append({"labels": labels, "label_probs": probs, "error": error})
    return _frame(rows)


def _direct_table(frame: pl.DataFrame, t: float) -> tuple[float, int, float]:
    ok = [r for r in frame.iter_rows(named=True) if r["error"] is None]
    kept = [r for r in ok if r["label_probs"][0] >= t]
    above = [
        [lab for lab, p in zip(r["labels"], r["label_probs"], strict=True) if p >= t] for r in kept
    ]
    per_image = sum(map(len, above)) / len(kept) if kept else 0.0
    return per_image, len({lab for labs in above for lab in labs}), len(kept) / len(ok)


def test_threshold_table_matches_a_direct_count():
    frame = _labels(400, seed=1)
    table = threshold_rows(stats.partial_aggregate(frame.lazy()))
    assert [r["threshold"] for r in table] == list(stats.CARD_THRESHOLDS)
    for row in table:
        per_image, unique, share = _direct_table(frame, row["threshold"])
        assert row["labels_per_image"] == pytest.approx(per_image)
        assert row["unique_labels"] == unique
        assert row["share_kept"] == pytest.approx(share)


def test_merged_partitions_equal_one_pass_over_all_rows():
    a, b = _labels(150, seed=2), _labels(230, seed=3)
    merged = stats.merge_aggregates(
        [stats.partial_aggregate(a.lazy()), stats.partial_aggregate(b.lazy())]
    )
    whole = stats.partial_aggregate(pl.concat([a, b]).lazy())
    assert merged == whole
    assert sum(whole.top1_histogram) == whole.images
    assert whole.failed == len([i for i in range(150) if i % 17 == 0]) + len(
        [i for i in range(230) if i % 17 == 0]
    )


def test_merge_refuses_different_thresholds():
    frame = _labels(20, seed=4).lazy()
    with pytest.raises(ValueError, match="different thresholds"):
        stats.merge_aggregates(
            [stats.partial_aggregate(frame), stats.partial_aggregate(frame, thresholds=(0.5,))]
        )


def test_every_count_of_labels_above_a_threshold_from_0_to_50_is_counted_exactly():
    """The search's every branch: one row of 50 labels per count k = 0..50 of labels that clear
    every threshold (the rest clear none), and rows whose k-th label sits exactly on a
    threshold's float32 value (counted as above)."""
    rows = []
    for k in range(51):
        rows.append(
            {
                "labels": list(range(50)),
                "label_probs": [0.9 - 0.001 * j for j in range(k)] + [0.01] * (50 - k),
                "error": None,
            }
        )
    for k in (1, 2, 3, 16, 17, 33, 50):  # the k-th probability exactly 0.05 (as float32)
        probs = [0.9] * (k - 1) + [0.05] + [0.001] * (50 - k)
        rows.append({"labels": list(range(50)), "label_probs": probs, "error": None})
    frame = _frame(rows)
    agg = stats.partial_aggregate(frame.lazy())
    on = (1, 2, 3, 16, 17, 33, 50)
    for counts in agg.thresholds:  # 0.05 clears only the lowest threshold
        below = 0 if counts.threshold == 0.05 else 1  # labels of the rows in ``on`` left out
        above = Counter(range(1, 51)) + Counter(k - below for k in on if k - below)
        assert counts.labels_per_image == {str(k): v for k, v in sorted(above.items())}
        assert counts.class_counts == {
            str(c): 50 - c + sum(c < k - below for k in on) for c in range(50)
        }


def test_rows_with_fewer_or_more_than_top_k_labels_are_counted_exactly():
    """The counts above each threshold are a search over list positions for up to 50
    labels (past a list's end counts as below) and a whole-list count beyond: rows of 1, 7, 50
    and 64 labels give the direct count, and the stats survive their JSON."""
    rng = random.Random(5)
    rows = []
    for i, n in enumerate([1, 7, 50, 64] * 40):
        power = 0.3 if n > 50 else 3  # the long rows: nearly all of their labels above 0.25
        probs = sorted((rng.random() ** power for _ in range(n)), reverse=True)
        rows.append({"labels": rng.sample(range(21_841), n), "label_probs": probs, "error": None})
        if i % 9 == 0:
            rows.append({"labels": None, "label_probs": None, "error": "decode: OSError"})
    frame = _frame(rows)
    agg = stats.partial_aggregate(frame.lazy())
    for row, t in zip(threshold_rows(agg), stats.CARD_THRESHOLDS, strict=True):
        per_image, unique, share = _direct_table(frame, t)
        assert row["labels_per_image"] == pytest.approx(per_image)
        assert row["unique_labels"] == unique
        assert row["share_kept"] == pytest.approx(share)
    ok = [r for r in frame.iter_rows(named=True) if r["error"] is None]
    for counts, t in zip(agg.thresholds, stats.CARD_THRESHOLDS, strict=True):
        above = [sum(p >= t for p in r["label_probs"]) for r in ok]
        assert counts.labels_per_image == {
            str(k): v for k, v in sorted(Counter(a for a in above if a).items())
        }
    assert agg.failed == 18 and agg.images == 160
    assert max(int(k) for k in agg.thresholds[-1].labels_per_image) > 50
    assert stats.Aggregate.from_json(json.loads(json.dumps(agg.to_json()))) == agg
