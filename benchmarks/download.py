"""What the download program's guard, checks and pHash cost, against img2dataset's own download.

    python benchmarks/download.py                     # 2,000 images, 2 processes x 16 threads
    python benchmarks/download.py --images 400 --quick  # tiny, for the tests
    python benchmarks/download.py --soak               # 50,000 URLs through a hostile hour

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

``--soak`` runs ours alone on a web that misbehaves as a crawl's does: 50,000 URLs, 5% hostile
(404s, HTML, garbage, truncated and tiny images, bombs, redirects into the private network), 2%
transient (their sites answer 503 until the first run ends) and, once, the whole server down for
30 seconds. The download program runs as a user would: once (the outage's shards are not
committed, and are redone after the backoff), then again with ``retry_failed`` (the transient
rows fetched again).
It prints img/s, the peak RSS of the largest process, the rows recovered by the retry, and checks
that every id is present exactly once and every image that can be downloaded was.
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
            # the rows name 24 photos over and over (with their pHashes): img2dataset fetches
            # every row, and so does ours here
            dedup_crawl_phash=False,
        )
        failed, _ = run_shards(part, out, settings)
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


class SoakHandler(http.server.SimpleHTTPRequestHandler):
    """The photos, plus ``/flaky/<i>`` (503 while ``flaky`` is set: their sites are down),
    ``/hostile/<kind>/<i>`` and, from ``outage_from`` to ``outage_until``, 503 for everything."""

    outage_from = outage_until = 0.0
    flaky = True
    photo = b""

    def log_message(self, *args: object) -> None:
        pass

    def _image(self, body: bytes, kind: str = "image/jpeg") -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        if self.outage_from <= time.monotonic() < self.outage_until:
            self.send_error(503)
            return
        if path.startswith("/flaky/"):
            if self.flaky:
                self.send_error(503)
            else:
                self._image(self.photo)
            return
        if path.startswith("/hostile/"):
            kind = path.split("/")[2]
            if kind == "404":
                self.send_error(404)
            elif kind == "html":
                self._image(b"<html>moved</html>", "text/html")
            elif kind == "garbage":
                self._image(os.urandom(3000))
            elif kind == "truncated":
                self._image(self.photo[: len(self.photo) // 3])
            elif kind == "tiny":
                self._image(SOAK_FILES["tiny"])
            elif kind == "bomb":
                self._image(SOAK_FILES["bomb"], "image/png")
            elif kind == "private":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1:9/latest/meta-data/")
                self.end_headers()
            return
        super().do_GET()


SOAK_FILES: dict[str, bytes] = {}
HOSTILE = ("404", "html", "garbage", "truncated", "tiny", "bomb", "private")


def soak(args: argparse.Namespace) -> None:
    """50,000 URLs, 5% hostile, 2% transient, one 30 s outage; ours only, as a user runs it."""
    import random

    import polars as pl
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="coyo-download-soak-"))
    names = make_site(work / "site", variants=24)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, format="JPEG")
    SOAK_FILES["tiny"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("1", (12_000, 8_000)).save(buf, format="PNG")
    SOAK_FILES["bomb"] = buf.getvalue()
    SoakHandler.photo = (work / "site" / names[0]).read_bytes()
    handler = functools.partial(SoakHandler, directory=str(work / "site"))
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://{HOST}:{server.server_address[1]}"

    rng = random.Random(0)
    urls, kinds = [], []
    for i in range(args.images):
        draw = rng.random()
        if draw < args.hostile:
            kind = HOSTILE[i % len(HOSTILE)]
            urls.append(f"{base}/hostile/{kind}/{i}")
        elif draw < args.hostile + args.transient:
            kind = "flaky"
            urls.append(f"{base}/flaky/{i}")
        else:
            kind = "photo"
            urls.append(f"{base}/{names[i % len(names)]}?v={i}")
        kinds.append(kind)
    part = work / "part.parquet"
    make_part(part, base, names, args.images)
    frame = pl.read_parquet(part).with_columns(
        pl.Series("url", urls), pl.Series("image_phash", [None] * len(urls), dtype=pl.String)
    )
    frame.write_parquet(part)
    reachable = sum(k in ("photo", "flaky") for k in kinds)

    out = work / "out"
    common = [
        sys.executable, "-m", "coyo_platform.download", "--metadata", str(part),
        "--output", str(out), "--processes-count", str(args.processes),
        "--thread-count", str(args.threads), "--number-sample-per-shard", str(args.shard),
        "--allow-networks", f"{HOST}/32", "--outage-backoff", str(args.outage_seconds),
    ]  # fmt: skip
    print(
        f"# soak: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{args.images:,} URLs ({args.hostile:.0%} hostile, {args.transient:.0%} transient), "
        f"one {args.outage_seconds:g} s outage {args.outage_at:g} s in; "
        f"{args.processes} processes x {args.threads} threads, shards of {args.shard}"
    )
    start = time.monotonic()
    SoakHandler.outage_from = start + args.outage_at
    SoakHandler.outage_until = start + args.outage_at + args.outage_seconds
    first, first_peak = _timed_run(common, start)
    SoakHandler.flaky = False  # their sites are back
    second, second_peak = _timed_run([*common, "--retry-failed"], time.monotonic())
    seconds = time.monotonic() - start
    server.shutdown()

    rows = pl.concat([pl.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
    images = rows.filter(pl.col("status") == "success")
    tar_ids = _tar_ids(out)
    statuses = dict(rows.group_by("status").len().iter_rows())
    print(
        f"first run:  {first['seconds']:7.1f} s  {first['succeeded']:,} images, "
        f"{first['transient_failures']:,} transient failures, {first['held_back']} shard tries "
        f"held back by the outage (redone); peak RSS {first_peak:,.0f} MB"
    )
    print(f"retry run:  {second['seconds']:7.1f} s  {second['recovered']:,} of "
          f"{second['retried']:,} rows recovered, {second['shards_revised']} shards rewritten; "
          f"peak RSS {second_peak:,.0f} MB")  # fmt: skip
    print(
        f"in all:     {seconds:7.1f} s  {images.height / seconds:7.1f} img/s; statuses {statuses}"
    )
    once = rows.height == rows["id"].n_unique() == args.images
    tars_once = len(tar_ids) == len(set(tar_ids)) == images.height
    print(f"every id once: {once} ({rows.height:,} rows, {rows['id'].n_unique():,} ids); "
          f"every image once in the tars: {tars_once}; "
          f"images {images.height:,} of {reachable:,} reachable")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    if not (once and tars_once and images.height == reachable):
        sys.exit("soak: rows lost, duplicated or not recovered")


def _timed_run(cmd: list[str], start: float) -> tuple[dict, float]:
    """Run the download program: its JSON report with ``seconds`` added, and the peak RSS (MB)
    of its largest process."""
    script = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(done.stderr); sys.stdout.write(done.stdout)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
        "sys.exit(done.returncode)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"download failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    report = json.loads("\n".join(lines[:-1])[done.stdout.index("{") :])
    report["seconds"] = time.monotonic() - start
    report["held_back"] = done.stderr.count(" not done: ")  # shards an outage kept uncommitted
    return report, float(lines[-1])


def _tar_ids(folder: Path) -> list[int]:
    import tarfile

    ids = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            ids += [json.load(t.extractfile(m))["id"] for m in t if m.name.endswith(".json")]
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the tests)")
    parser.add_argument("--soak", action="store_true", help="50,000 URLs through a hostile hour")
    parser.add_argument("--hostile", type=float, default=0.05, help="soak: share of hostile rows")
    parser.add_argument("--transient", type=float, default=0.02, help="soak: share transient")
    parser.add_argument("--outage-at", type=float, default=20.0, help="soak: outage starts (s)")
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="soak: outage (s)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        run_engine(args.engine, args.part, args.out, args.processes, args.threads, args.shard)
        return
    if args.soak:
        if args.quick:
            args.images, args.processes, args.threads, args.shard = 300, 1, 8, 50
            args.outage_at, args.outage_seconds = 2.0, 2.0
        elif args.images == 2000:
            args.images, args.shard = 50_000, 1_000
        soak(args)
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
