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
LOOPBACK = "127.0.0.1/32"


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
                    "allow_networks": [LOOPBACK],  # the image server; public-only by default
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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback (moto's server), for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the standard AWS variables point every client (boto3, s3fs, subprocesses)
    at the loopback server with throwaway credentials."""
    import uuid

    import boto3

    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    bucket = f"coyo-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def write_tar(path: Path, samples: list[tuple[str, bytes, dict]]) -> None:
    """A webdataset shard as img2dataset writes it: ``key.jpg`` + ``key.json`` per sample."""
    import io
    import json
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, image, meta in samples:
            for ext, data in (("jpg", image), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
