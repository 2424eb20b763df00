"""Offline fixtures for ``make demo`` and the tests: real photos on a loopback image server, small
COYO-700M-schema parts that point at it, and a small timm model with random weights.

The photos are the sample images shipped inside scikit-image's wheel (astronaut, chelsea, coffee,
rocket, ...), plus flips, crops and re-encodings of them, so nothing is downloaded. The parts also
name the web's usual failures: 404s, an HTML page, a truncated JPEG, an image too small, one too
wide, and a host that refuses connections.

The demo model has random weights: its labels are meaningless. It exists to exercise the pipeline.
"""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageOps

from coyo_platform.ingest.schema import COYO700M_COLUMNS, FLOAT, INT

DEMO_MODEL = "test_efficientnet"  # a tiny timm architecture; random weights, made offline
LOOPBACK = "127.0.0.1/32"  # the image server's network: downloads are public-only by default
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
)
FIRST_ID = 4_896_263_451_343  # COYO ids are Spark monotonically_increasing_id values


@dataclass(frozen=True)
class Item:
    """A file the image server serves (or a name it lacks) and what it provokes."""

    name: str
    kind: str  # "photo", or the failure it provokes


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder: Path) -> list[Item]:
    """Write the served files into ``folder`` and return the catalogue, failures included."""
    shipped = resources.files("skimage.data")  # photos inside scikit-image's wheel
    folder.mkdir(parents=True, exist_ok=True)
    items: list[Item] = []
    for photo in PHOTOS:
        name = photo.split(".")[0]
        with Image.open(io.BytesIO(shipped.joinpath(photo).read_bytes())) as raw:
            img = raw.convert("RGB")
        w, h = img.size
        variants = {
            f"{name}.jpg": (img, "JPEG"),
            f"{name}_flip.jpg": (ImageOps.mirror(img), "JPEG"),
            f"{name}_crop.jpg": (img.crop((w // 8, h // 8, w - w // 8, h - h // 8)), "JPEG"),
            f"{name}.png": (ImageOps.flip(img), "PNG"),
        }
        for file, (variant, fmt) in variants.items():
            (folder / file).write_bytes(_encode(variant, fmt))
            items.append(Item(file, "photo"))
    with Image.open(folder / "astronaut.jpg") as raw:
        base = raw.convert("RGB")
    (folder / "tiny.jpg").write_bytes(_encode(base.resize((120, 120)), "JPEG"))
    items.append(Item("tiny.jpg", "image too small"))
    (folder / "banner.jpg").write_bytes(_encode(base.resize((900, 250)), "JPEG"))
    items.append(Item("banner.jpg", "aspect ratio too large"))
    (folder / "truncated.jpg").write_bytes(_encode(base, "JPEG")[:400])
    items.append(Item("truncated.jpg", "truncated"))
    (folder / "page.html").write_text("<html><body>not an image</body></html>")
    items.append(Item("page.html", "not an image"))
    items.append(Item("missing.jpg", "http 404"))
    return items


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _file_facts(folder: Path) -> dict[str, tuple[str, int, int]]:
    """pHash, width and height of each served file, as the crawl recorded them (none for
    non-images and truncated files)."""
    import imagehash

    facts = {}
    for file in folder.iterdir():
        try:
            with Image.open(file) as img:
                img.load()
                facts[file.name] = (str(imagehash.phash(img)), img.width, img.height)
        except Exception:  # not an image: the crawl had no hash or size for it either
            pass
    return facts


def crawl_phash(phash: str, row: int) -> str:
    """The crawl's pHash of a demo row's image: the served file's, with two bits flipped that
    are this row's alone (the ``row``-th pair of bits). Each demo URL stands for an image of its
    own, as in COYO-700M, where rows that share an ``image_phash`` are duplicates (dedup before
    download keeps one); two bits are well within the drift check's 12."""
    a, b = next(itertools.islice(itertools.combinations(range(64), 2), row % 2016, None))
    return f"{int(phash, 16) ^ (1 << a) ^ (1 << b):016x}"


def make_part(
    folder: Path, items: list[Item], base_url: str, rows: int, first_id: int, seed: int = 0
) -> pl.DataFrame:
    """``rows`` COYO-700M-schema rows whose URLs name ``items`` in turn (each URL unique through a
    query string); the last row names a host that refuses connections."""
    rng = np.random.default_rng(seed)
    facts = _file_facts(folder)
    names = [items[i % len(items)].name for i in range(rows)]
    urls = [f"{base_url}/{name}?v={first_id + i}" for i, name in enumerate(names)]
    urls[-1] = f"http://127.0.0.1:{closed_port()}/gone.jpg"
    columns: dict[str, object] = {
        "id": [first_id + 7 * i for i in range(rows)],
        "url": urls,
        "text": [f"demo caption {i} ({name})" for i, name in enumerate(names)],
        "image_phash": [
            crawl_phash(facts.get(n, ("0" * 16, 0, 0))[0], first_id // 1_000_000 * rows + i)
            for i, n in enumerate(names)
        ],
        "width": [facts.get(n, ("", 0, 0))[1] for n in names],
        "height": [facts.get(n, ("", 0, 0))[2] for n in names],
    }
    for name, kind in COYO700M_COLUMNS.items():
        if name not in columns:
            columns[name] = rng.integers(1, 600, rows) if kind == INT else rng.random(rows)
    frame = pl.DataFrame(columns)
    return frame.select(
        pl.col(c).cast(pl.Int64 if k == INT else pl.Float64 if k == FLOAT else pl.String)
        for c, k in COYO700M_COLUMNS.items()
    )


def part_file_name(index: int) -> str:
    """The hub's naming: ``part-00000-<uuid>-c000.snappy.parquet``."""
    return f"part-{index:05d}-17da4908-939c-46e5-91d0-15f256041956-c000.snappy.parquet"


def write_parts(
    source: Path, images: Path, items: list[Item], base_url: str, parts: int, rows: int
) -> list[str]:
    """Write ``parts`` parts of ``rows`` rows into ``source``; returns their partition keys."""
    source.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(parts):
        frame = make_part(images, items, base_url, rows, FIRST_ID + i * 1_000_000, seed=i)
        frame.write_parquet(source / part_file_name(i), compression="snappy")
        keys.append(f"part-{i:05d}")
    return keys


def make_random_model(path: Path, photos: Path, model: str = DEMO_MODEL, seed: int = 0) -> Path:
    """Save a ``model`` with 21,843 outputs and random weights to ``path`` (no download).

    Its labels are meaningless. Left as initialized, every image would score about the same; so
    the classifier is drawn at random around the pooled features of the JPEGs in ``photos``, with
    a bias of -5, which spreads top-1 probabilities over roughly 0.3 to 1.0 like a real
    sigmoid-trained model's, and gives the threshold something to cut.
    """
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    from coyo_platform.common.labelspace import NUM_MODEL_OUTPUTS

    torch.manual_seed(seed)
    net = timm.create_model(model, pretrained=False, num_classes=NUM_MODEL_OUTPUTS).eval()
    config = {**resolve_data_config(model=net), "crop_pct": 1.0, "crop_mode": "squash"}
    transform = create_transform(**config)
    stems = tuple(photo.split(".")[0] for photo in PHOTOS)
    files = [p for p in sorted(photos.glob("*.jpg")) if p.stem.startswith(stems)]
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in files])
    with torch.no_grad():
        features = net.forward_head(net.forward_features(batch), pre_logits=True)
        center = features.mean(0)
        spread = (features - center).norm(dim=1).mean()
        fc = net.get_classifier()
        fc.weight.copy_(torch.randn_like(fc.weight) * 2.0 / spread)
        fc.bias.copy_(-5.0 - fc.weight @ center)  # logits = (features - center) @ W.T - 5
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def demo_configs(checkpoint: Path) -> dict[str, dict]:
    """The settings the demo runs with, by asset; everything else is the product's default."""
    return {
        "downloaded_shards": {"allow_networks": [LOOPBACK]},
        "labeled_shards": {
            "model": DEMO_MODEL,
            "checkpoint": str(checkpoint),
            "preset": "timm",  # the tiny model's own eval size, not EfficientNetV2-XL's 512
        },
    }
