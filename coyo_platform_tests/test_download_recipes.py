"""Which bytes are stored: img2dataset's 512 px copy (COYO's recipe, the default) or, with
``keep_original``, each image as fetched; the download program on the loopback image server."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import polars as pl
from PIL import Image

from coyo_platform import demo
from coyo_platform_tests.conftest import LOOPBACK, download_cmd


def _members(out: Path) -> dict[int, tuple[str, bytes]]:
    """id -> (image member's extension, its bytes), over every tar in ``out``."""
    found: dict[int, tuple[str, bytes]] = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in files.items():
            key, _, ext = name.partition(".")
            if ext != "json" and ext != "txt":
                meta = json.loads(files[f"{key}.json"])
                found[meta["id"]] = (ext, data)
    return found


def test_keep_original_stores_the_bytes_as_fetched(site, tmp_path: Path):
    photos = [item for item in site.items if item.kind == "photo"]
    part = demo.make_part(site.images, photos, site.base_url, len(photos) + 1, 10**6)
    path = tmp_path / "part.parquet"
    part.write_parquet(path)
    served = {
        row["id"]: row["url"].split("/")[-1].split("?")[0] for row in part.iter_rows(named=True)
    }
    runs = {}
    for name, extra in (("copy", ()), ("original", ("--keep-original",))):
        out = tmp_path / name
        cmd = download_cmd(path, out, "--allow-networks", LOOPBACK, *extra)
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = (_members(out), pl.read_parquet(out / "*.parquet"))

    originals, rows = runs["original"]
    assert len(originals) == len(photos)  # every photo, and the refused host's row is no image
    for id_, (ext, data) in originals.items():
        file = site.images / served[id_]
        assert data == file.read_bytes()  # byte for byte, PNGs too
        assert ext == {"png": "png", "jpg": "jpg"}[file.suffix[1:]]
    # width/height are the stored image's: the original's own size
    for row in rows.filter(pl.col("status") == "success").iter_rows(named=True):
        with Image.open(site.images / served[row["id"]]) as img:
            assert (
                (row["width"], row["height"])
                == img.size
                == (row["original_width"], row["original_height"])
            )

    copies, copy_rows = runs["copy"]
    assert set(copies) == set(originals)  # the same rows pass the same checks
    big = copy_rows.filter(pl.min_horizontal("original_width", "original_height") > 512)
    assert big.height > 0
    for row in big.iter_rows(named=True):  # COYO's recipe: shorter side to 512, JPEG
        ext, data = copies[row["id"]]
        with Image.open(io.BytesIO(data)) as img:
            assert ext == "jpg" and img.format == "JPEG" and min(img.size) == 512
