"""What the download program's guard, checks and pHash cost, against img2dataset's own download.

    python benchmarks/download.py                     # 2,000 images, 2 processes x 16 threads
    python benchmarks/download.py --images 400 --quick  # tiny, for the tests

A loopback HTTP server (on 127.0.0.2, allowed through ``allow_networks``) serves real photos
(scikit-image's samples, scaled so the short side is 600-1,200 px, JPEG q90, like web images a
512 px recipe downsizes). Both engines get the same COYO-700M-schema part, the same recipe (512 px,
keep ratio, only if bigger, no re-encode), the same processes and threads, one after the other in
fresh subprocesses:

  img2dataset: ``img2dataset.download`` as the platform called it before the guard (urllib's plain
               urlopen, cv2 decode/resize, sha256, exif);
  ours:        ``download.run.run_shards``: the guarded fetch (DNS check, deadline, size cut),
               the header check for bombs, the pHash and its distance, the same resizer and
               writer, staged shards moved into place.

It prints images/s for each, the ratio ours / img2dataset (1.0 = no cost), each one's peak RSS
(the parent and its pool, via RUSAGE_CHILDREN), and checks that both downloaded every image.
The server shares the CPU with the download program: compare the ratio, not the absolute rate, with
a real crawl, where the network and DNS set the pace (img2dataset: about 100 img/s per core).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

HOST = "127.0.0.2"


def make_site(folder: Path, variants: int) -> list[str]:
    from importlib import resources

    from PIL import Image, ImageOps

    from coyo_platform.demo import PHOTOS

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    shipped = resources.files("skimage.data")
    for i in range(variants):
        photo = PHOTOS[i % len(PHOTOS)]
        with Image.open(io.BytesIO(shipped.joinpath(photo).read_bytes())) as raw:
            img = raw.convert("RGB")
        short = 600 + (i * 97) % 600
        scale = short / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)))
        if i % 2:
            img = ImageOps.mirror(img)
        name = f"img{i}.jpg"
        img.save(folder / name, format="JPEG", quality=90)
        names.append(name)
    return names


def make_part(path: Path, base: str, names: list[str], rows: int) -> None:
    import imagehash
    import polars as pl
    from PIL import Image

    from coyo_platform.demo import Item
    from coyo_platform.demo import make_part as demo_part

    folder = path.parent / "site"
    hashes = {n: str(imagehash.phash(Image.open(folder / n))) for n in names}
    frame = demo_part(folder, [Item(n, "photo") for n in names], base, rows, 10**12)
    urls = [f"{base}/{names[i % len(names)]}?v={i}" for i in range(rows)]
    frame = frame.with_columns(
        pl.Series("url", urls),
        pl.Series("image_phash", [hashes[names[i % len(names)]] for i in range(rows)]),
    )
    frame.write_parquet(path)


def run_engine(engine: str, part: str, out: str, processes: int, threads: int, shard: int):
    """In a fresh process: download ``part`` with ``engine``; print a JSON line."""
    start = time.perf_counter()
    if engine == "img2dataset":
        import img2dataset

        img2dataset.download(
            url_list=part,
            input_format="parquet",
            url_col="url",
            caption_col="text",
            save_additional_columns=["id", "image_phash"],
            output_format="webdataset",
            output_folder=out,
            image_size=512,
            resize_mode="keep_ratio",
            resize_only_if_bigger=True,
            skip_reencode=True,
            min_image_size=200,
            max_aspect_ratio=3.0,
            retries=1,
            timeout=10,
            number_sample_per_shard=shard,
            processes_count=processes,
            thread_count=threads,
            incremental_mode="incremental",
            enable_wandb=False,
        )
    else:
        from coyo_platform.download.run import run_shards
        from coyo_platform.download.settings import DownloadSettings

        settings = DownloadSettings(
            processes_count=processes,
            thread_count=threads,
            number_sample_per_shard=shard,
            allow_networks=(f"{HOST}/32",),
        )
        failed = run_shards(part, out, settings)
        assert not failed, failed
    seconds = time.perf_counter() - start
    import polars as pl

    rows = pl.concat([pl.read_parquet(p) for p in sorted(Path(out).glob("*.parquet"))])
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    print(
        json.dumps(
            {
                "engine": engine,
                "seconds": seconds,
                "rows": rows.height,
                "success": int((rows["status"] == "success").sum()),
                "peak_rss_mb": peak / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the tests)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        run_engine(args.engine, args.part, args.out, args.processes, args.threads, args.shard)
        return
    if args.quick:
        args.images, args.processes, args.threads, args.shard = 40, 1, 4, 20

    work = Path(tempfile.mkdtemp(prefix="coyo-download-bench-"))
    names = make_site(work / "site", variants=24)
    handler = functools.partial(
        type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
        directory=str(work / "site"),
    )
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://{HOST}:{server.server_address[1]}"
    part = work / "part.parquet"
    make_part(part, base, names, args.images)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.images} images from {len(names)} photos (600-1,200 px short side) on {base}; "
          f"{args.processes} processes x {args.threads} threads, "
          f"shards of {args.shard}")  # fmt: skip
    results = {}
    for engine in ("img2dataset", "ours"):
        cmd = [sys.executable, __file__, "--engine", engine, "--part", str(part),
               "--out", str(work / engine), "--processes", str(args.processes),
               "--threads", str(args.threads), "--shard", str(args.shard)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{engine} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if result["success"] != args.images:
            sys.exit(f"{engine}: {result['success']} of {args.images} images downloaded")
        results[engine] = result
        rate = result["rows"] / result["seconds"]
        print(f"{engine:12s} {result['seconds']:7.1f} s  {rate:7.1f} img/s  "
              f"peak RSS {result['peak_rss_mb']:,.0f} MB")  # fmt: skip
    server.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    ratio = results["img2dataset"]["seconds"] / results["ours"]["seconds"]
    print(f"ours / img2dataset (images per second): {ratio:.2f}")


if __name__ == "__main__":
    main()
