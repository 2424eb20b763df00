"""Shared fixtures: real photos on a real HTTP server on loopback, COYO-700M-schema parts that
point at it, and a small timm model with random weights saved to a checkpoint (nothing is
downloaded)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from coyo_platform import demo

ROWS = 45  # rows per test part: every catalogue item at least once, several shards of 20
SHARD_SIZE = 20


@dataclass
class Site:
    images: Path
    items: list[demo.Item]
    base_url: str
    checkpoint: Path


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("site")
    items = demo.write_images(root / "images")
    checkpoint = demo.make_random_model(root / "random_model.pth", root / "images")
    with demo.serve_folder(root / "images") as base_url:
        yield Site(root / "images", items, base_url, checkpoint)


@pytest.fixture
def source(site: Site, tmp_path: Path) -> Path:
    """A source folder with two parts, ``part-00000`` and ``part-00001``."""
    folder = tmp_path / "source"
    demo.write_parts(folder, site.images, site.items, site.base_url, parts=2, rows=ROWS)
    return folder


def expected_outcomes(part: pl.DataFrame, items: list[demo.Item]) -> Counter:
    """What each row of a demo part should become: 'photo' or its failure, by the catalogue."""
    kinds = {item.name: item.kind for item in items}
    outcomes: Counter = Counter()
    for url in part["url"]:
        name = url.rsplit("/", 1)[-1].split("?")[0]
        outcomes[kinds.get(name, "connection refused")] += 1
    return outcomes


def fast_run_config(checkpoint: Path) -> dict:
    """Settings sized for a 2-core machine; everything else is the product's default."""
    return {
        "ops": {
            "downloaded_shards": {
                "config": {
                    "processes_count": 1,
                    "thread_count": 8,
                    "number_sample_per_shard": SHARD_SIZE,
                }
            },
            "labeled_shards": {
                "config": {
                    "preset": "timm",
                    "model": demo.DEMO_MODEL,
                    "checkpoint": str(checkpoint),
                    "num_workers": 1,
                    "batch_size": 16,
                }
            },
        }
    }
