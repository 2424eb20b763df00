"""What the download program's guard, checks and pHash cost, against img2dataset's own download.

    python benchmarks/download.py                     # 2,000 images, 2 processes x 16 threads
    python benchmarks/download.py --images 400 --quick  # tiny, for the tests
    python benchmarks/download.py --web                # 3,000 rows on a realistic web of 64 hosts
    python benchmarks/download.py --soak               # 50,000 URLs through a hostile hour
    ... --json figures.json                            # also write the figures (not --soak)

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
Its last line: ``ours / img2dataset (images per second): X.XX (target >= 0.95: met|missed)``.

``--web`` runs both engines the same way on a realistic web instead, where waiting, not the CPU,
sets the pace. The parent process serves it; each engine runs in a subprocess with
``SSL_CERT_FILE`` naming the benchmark's throwaway CA, so the default verifying contexts trust it
(urllib's in img2dataset, ``ssl.create_default_context()`` in ours; nothing turns verification off,
and the benchmark checks first that the default context refuses the certificate without it):

- 64 hosts, 127.0.1.1 ... 127.0.1.64 (Linux routes all of 127/8 on ``lo``), each its own
  ``ThreadingHTTPServer`` speaking HTTP/1.1 keep-alive (always a ``Content-Length``), so a client
  that reuses connections can. 16 of them (every fourth in popularity order, from the second)
  serve TLS 1.3 with one certificate whose subjectAltName lists the 64 addresses.
- Host popularity is Zipf (exponent 1.1) over the hosts in a fixed random order: the first, a CDN,
  gets about a quarter of the rows. Each row names one of 48 JPEGs made from scikit-image's photos,
  220-2,000 px short side (log-uniform), quality 75-95, about 18 KB to 1.2 MB (the upscaled ones
  given a little grain, as a camera's photo of that size has).
- Before its first byte, every response waits a server think time (log-normal, median 150 ms,
  sigma ln(2 / 0.15) / 1.645 = 1.575 so that 5% exceed 2 s, capped at 8 s to stay under both
  engines' 10 s timeout) plus one round trip of its host (each host a fixed RTT, log-normal with
  median 30 ms and sigma 0.6, capped at 300 ms). Loopback has no round trips of its own, so a
  connection's setup is simulated too: the first request on each new connection waits one more
  RTT (the TCP handshake) and, on a TLS host, another (the TLS 1.3 handshake; its real CPU is spent
  as well). Bandwidth is not modelled: the bytes then arrive at loopback speed.
- 3 hosts stall (popularity ranks 18, 32 and 48; the one at 18 over TLS): they accept, read the
  request and never answer (until the server shuts down, or 60 s). Their rows time out for both
  engines (each try 10 s, retries 1).
- All of it is deterministic: the think time is seeded from the row index (the URL's ``?v=``), the
  RTT, TLS and stalling from the host, so both engines meet exactly the same web.

Both engines get the same COYO-700M-schema part (its ``image_phash`` each file's pHash), the same
recipe, processes, threads, shards, retries (1) and timeout (10 s); ours allows
``127.0.1.0/24`` and fetches every row (``dedup_crawl_phash`` off: rows repeat photos). It prints
each engine's seconds, images/s (successful images over wall time), successes, timeouts, other
failures and peak RSS, and the connections the servers accepted for it (a client reusing
connections opens fewer than it makes requests); the rows on TLS hosts and on stalling hosts and
what became of them; whether both succeeded on exactly the same rows (exit 1 if not, or if a
stalled row succeeded); and last
``ours / img2dataset (images per second): X.XX (target >= 1.2: met|missed)``. ``--web --quick``:
150 rows, 1 process x 8 threads, shards of 50, think time capped at 1 s, and only 3 rows (all in
the first shard) on the stalling hosts, so a test stays short.

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
import resource
import shutil
import ssl
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


def make_part(
    path: Path,
    base: str,
    names: list[str],
    rows: int,
    urls: list[str] | None = None,
    picks: list[int] | None = None,
) -> None:
    """A COYO-700M-schema part of ``rows`` rows naming ``names`` in turn on ``base`` (or, given,
    row i's URL ``urls[i]`` naming ``names[picks[i]]``); ``image_phash`` is each file's pHash."""
    import imagehash
    import polars as pl
    from PIL import Image

    from coyo_platform.demo import Item
    from coyo_platform.demo import make_part as demo_part

    folder = path.parent / "site"
    hashes = {n: str(imagehash.phash(Image.open(folder / n))) for n in names}
    frame = demo_part(folder, [Item(n, "photo") for n in names], base, rows, 10**12)
    picks = picks if picks is not None else [i % len(names) for i in range(rows)]
    if urls is None:
        urls = [f"{base}/{names[picks[i]]}?v={i}" for i in range(rows)]
    frame = frame.with_columns(
        pl.Series("url", urls),
        pl.Series("image_phash", [hashes[names[picks[i]]] for i in range(rows)]),
    )
    frame.write_parquet(path)


def make_web_site(folder: Path, variants: int, seed: int = 0) -> list[str]:
    """``variants`` JPEGs of scikit-image's photos: short side log-uniform in 220-2,000 px (the
    recipe's 200 px minimum stays out of play), quality 75-95; the upscaled ones get a little
    grain (an upscaled photo is smoother, so smaller, than a camera's of that size)."""
    import math
    import random
    from importlib import resources

    from PIL import Image, ImageChops, ImageOps

    from coyo_platform.demo import PHOTOS

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    shipped = resources.files("skimage.data")
    names = []
    for i in range(variants):
        photo = PHOTOS[i % len(PHOTOS)]
        with Image.open(io.BytesIO(shipped.joinpath(photo).read_bytes())) as raw:
            img = raw.convert("RGB")
        short = round(math.exp(rng.uniform(math.log(220), math.log(2000))))
        quality = rng.randint(75, 95)
        scale = short / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)))
        if scale > 1:
            img = ImageChops.add(img, Image.effect_noise(img.size, 2).convert("RGB"), 1.0, -128)
        if (i // len(PHOTOS)) % 2:
            img = ImageOps.mirror(img)
        name = f"img{i}.jpg"
        img.save(folder / name, format="JPEG", quality=quality)
        names.append(name)
    return names


def run_engine(
    engine: str,
    part: str,
    out: str,
    processes: int,
    threads: int,
    shard: int,
    allow: str = f"{HOST}/32",
):
    """In a fresh process: download ``part`` with ``engine`` (ours allowing the network
    ``allow``); print a JSON line."""
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
            allow_networks=(allow,),
            # the rows name 24 photos over and over (with their pHashes): img2dataset fetches
            # every row, and so does ours here
            dedup_crawl_phash=False,
        )
        failed, _ = run_shards(part, out, settings)
        assert not failed, failed
    seconds = time.perf_counter() - start
    import polars as pl

    from coyo_platform.download.statuses import failure_reason

    rows = pl.concat([pl.read_parquet(p) for p in sorted(Path(out).glob("*.parquet"))])
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    peak = max(u.ru_maxrss for u in usage)
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)  # the engine's processes, after they ended
    success_ids, timeout_ids, others = [], [], {}
    for row_id, status, message in rows.select("id", "status", "error_message").iter_rows():
        if status == "success":
            success_ids.append(row_id)
            continue
        reason = failure_reason(status, message)
        if reason in ("timeout", "download: timeout"):
            timeout_ids.append(row_id)
        else:
            others[reason] = others.get(reason, 0) + 1
    print(
        json.dumps(
            {
                "engine": engine,
                "seconds": seconds,
                "rows": rows.height,
                "success": len(success_ids),
                "timeouts": len(timeout_ids),
                "other_failures": sum(others.values()),
                "other_reasons": others,
                "peak_rss_mb": peak / 1024,
                "cpu_seconds": cpu,
                "success_ids": success_ids,
                "timeout_ids": timeout_ids,
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
        f"# soak: {machine()}; "
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


# --- the realistic web (--web) -------------------------------------------------------------------

WEB_NETWORK = "127.0.1.0/24"
WEB_HOSTS = 64
WEB_ZIPF = 1.1
WEB_TLS_RANKS = frozenset(range(2, WEB_HOSTS + 1, 4))  # 16 hosts: ranks 2, 6, 10, ..., 62
WEB_STALL_RANKS = (18, 32, 48)  # not among the 3 most popular; 18 is a TLS host
THINK_MEDIAN = 0.150
THINK_SIGMA = 1.575  # ln(2 / 0.15) / 1.645: 5% of think times exceed 2 s
RTT_MEDIAN, RTT_SIGMA, RTT_CAP = 0.030, 0.6, 0.300
STALL_SECONDS = 60.0
WEB_TARGET = 1.2  # ours / img2dataset, images per second
CPU_TARGET = 0.95


def web_address(number: int) -> str:
    return f"127.0.1.{number}"


def think_time(row: int, cap: float) -> float:
    """The server's think time for row ``row``'s URL: the same for every engine and every try."""
    import math
    import random

    return min(
        cap, random.Random(f"think {row}").lognormvariate(math.log(THINK_MEDIAN), THINK_SIGMA)
    )


def host_rtt(number: int) -> float:
    import math
    import random

    rtt = random.Random(f"rtt {number}").lognormvariate(math.log(RTT_MEDIAN), RTT_SIGMA)
    return min(RTT_CAP, rtt)


class WebHandler(http.server.BaseHTTPRequestHandler):
    """One connection to one host of the web (``self.server``: its RTT, TLS, stalling); see the
    module docstring for the delays."""

    protocol_version = "HTTP/1.1"  # keep-alive, unless the client asks to close
    timeout = 60  # an idle keep-alive connection (or a stuck handshake) is closed after this

    def log_message(self, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.requests_served = 0
        self.server.web.count("connections", "tls_connections" if self.server.tls else None)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # here, in this connection's thread, not the acceptor's

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        host: WebServer = self.server  # type: ignore[assignment]
        web = host.web
        path, _, query = self.path.partition("?")
        if path == "/ping":  # the TLS check before the runs: no delays
            self._send(200, b"ok", "text/plain")
            return
        if host.stalls:  # read the request, never answer
            web.stop.wait(STALL_SECONDS)
            self.close_connection = True
            return
        setup = 0.0
        if self.requests_served == 0:  # a new connection: the TCP (and TLS 1.3) handshake RTTs
            setup = host.rtt * (2 if host.tls else 1)
        self.requests_served += 1
        web.count("requests")
        try:
            row = int(query.removeprefix("v="))
        except ValueError:
            row = -1
        time.sleep(setup + think_time(row, web.think_cap) + host.rtt)
        body = web.files.get(path.lstrip("/"))
        if body is None:
            self._send(404, b"not found", "text/plain")
        else:
            self._send(200, body, "image/jpeg")


class WebServer(http.server.ThreadingHTTPServer):
    """One host of the web: its own address, RTT, TLS or not, stalling or not."""

    daemon_threads = True
    request_queue_size = 256  # a burst of connects to the CDN host must not overflow the backlog

    def __init__(self, web: Web, number: int, tls: ssl.SSLContext | None, stalls: bool) -> None:
        self.web, self.number, self.stalls = web, number, stalls
        self.tls_context = tls
        self.tls = tls is not None
        self.rtt = host_rtt(number)
        super().__init__((web_address(number), 0), WebHandler)

    def server_bind(self) -> None:
        import socketserver

        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: its getfqdn asks the DNS
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):  # noqa: ANN201
        sock, address = super().get_request()
        if self.tls_context is not None:  # the handshake happens in the connection's thread
            sock = self.tls_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        error = sys.exc_info()[1]
        reason = type(error).__name__
        if isinstance(error, ssl.SSLError):
            reason += f" {error.reason}"
        with self.web.lock:
            self.web.errors[reason] = self.web.errors.get(reason, 0) + 1


class Web:
    """The 64 hosts (in the benchmark's process), their files and shared state."""

    def __init__(self, files: dict[str, bytes], tls_context: ssl.SSLContext, think_cap: float):
        import random

        self.files, self.think_cap = files, think_cap
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.errors: dict[str, int] = {}
        self.counts: dict[str, int] = {}  # connections, tls_connections, requests
        order = list(range(1, WEB_HOSTS + 1))
        random.Random("host order").shuffle(order)
        self.by_rank = order  # by_rank[r - 1]: the host number at popularity rank r
        self.servers = {}
        for rank, number in enumerate(order, 1):
            tls = tls_context if rank in WEB_TLS_RANKS else None
            self.servers[number] = WebServer(self, number, tls, rank in WEB_STALL_RANKS)
        for server in self.servers.values():
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def count(self, *names: str | None) -> None:
        with self.lock:
            for name in filter(None, names):
                self.counts[name] = self.counts.get(name, 0) + 1

    def base(self, number: int) -> str:
        server = self.servers[number]
        scheme = "https" if server.tls else "http"
        return f"{scheme}://{web_address(number)}:{server.server_port}"

    def close(self) -> None:
        self.stop.set()  # the stalling hosts' handlers give up
        stoppers = [threading.Thread(target=s.shutdown) for s in self.servers.values()]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for server in self.servers.values():
            server.server_close()


def make_tls(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA (``ca.pem``) and one server certificate for the 64 addresses (its
    subjectAltName); returns the CA's path and the servers' TLS context."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coyo benchmark throwaway CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    addresses = [x509.IPAddress(ipaddress.ip_address(web_address(n))) for n in range(1, 65)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.1.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(addresses), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return ca_path, context


TLS_CHECK = """
import socket, ssl, sys, urllib.request
host, port = sys.argv[1], int(sys.argv[2])
try:
    with urllib.request.urlopen(f"https://{host}:{port}/ping", timeout=10) as r:  # img2dataset's
        r.read()
    context = ssl.create_default_context()  # ours
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            print("verified", tls.version())
except Exception as exc:
    print("refused:", str(exc)[:200])
"""


def check_tls(web: Web, number: int, ca: Path) -> tuple[str, str]:
    """What urllib's default context and ``ssl.create_default_context()`` make of TLS host
    ``number``, in a fresh process, without and with ``SSL_CERT_FILE=ca``."""
    answers = []
    for env in (os.environ, {**os.environ, "SSL_CERT_FILE": str(ca)}):
        cmd = [
            sys.executable,
            "-c",
            TLS_CHECK,
            web_address(number),
            str(web.servers[number].server_port),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(env), timeout=60)
        answers.append(done.stdout.strip() or done.stderr.strip()[-300:])
    return answers[0], answers[1]


def plan_rows(
    web: Web, rows: int, variants: int, quick: bool
) -> tuple[list[str], list[int], list[int]]:
    """Each row's URL, image and host: hosts drawn Zipf by popularity rank, images uniformly.
    Quick: the stalling hosts get no draw, only rows 10, 25 and 40 (in the first shard)."""
    import random

    rng = random.Random("rows")
    weights = [rank**-WEB_ZIPF for rank in range(1, WEB_HOSTS + 1)]
    if quick:
        weights = [0.0 if r in WEB_STALL_RANKS else w for r, w in enumerate(weights, 1)]
    ranks = rng.choices(range(1, WEB_HOSTS + 1), weights, k=rows)
    if quick:
        for i, rank in zip((10, 25, 40), WEB_STALL_RANKS, strict=True):
            if i < rows:
                ranks[i] = rank
    hosts = [web.by_rank[rank - 1] for rank in ranks]
    picks = [rng.randrange(variants) for _ in range(rows)]
    urls = [f"{web.base(h)}/img{picks[i]}.jpg?v={i}" for i, h in enumerate(hosts)]
    return urls, picks, hosts


def machine() -> str:
    from coyo_platform.common.machine import cpu_model

    return cpu_model()


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def spawn_engine(
    engine: str,
    work: Path,
    part: Path,
    args: argparse.Namespace,
    allow: str = f"{HOST}/32",
    env: dict[str, str] | None = None,
) -> dict:
    """``engine`` on ``part`` in a fresh subprocess; its JSON report, with ``held_back``: the
    shard tries ours kept uncommitted as an outage (and redid)."""
    cmd = [sys.executable, __file__, "--engine", engine, "--part", str(part),
           "--out", str(work / engine), "--processes", str(args.processes),
           "--threads", str(args.threads), "--shard", str(args.shard),
           "--allow", allow]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        sys.exit(f"{engine} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["held_back"] = done.stderr.count(" not done: ")
    return result


def verdict(ratio: float, target: float) -> str:
    met = "met" if ratio >= target else "missed"
    return f"ours / img2dataset (images per second): {ratio:.2f} (target >= {target:g}: {met})"


def write_json(path: str | None, figures: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")


def web(args: argparse.Namespace) -> None:
    """Both engines on the realistic web of the module docstring."""
    import polars as pl

    rows = args.images
    think_cap = 1.0 if args.quick else 8.0
    before = loadavg()
    work = Path(tempfile.mkdtemp(prefix="coyo-download-web-"))
    names = make_web_site(work / "site", variants=48)
    files = {n: (work / "site" / n).read_bytes() for n in names}
    ca, tls_context = make_tls(work)
    the_web = Web(files, tls_context, think_cap)
    try:
        urls, picks, hosts = plan_rows(the_web, rows, len(names), args.quick)
        part = work / "part.parquet"
        make_part(part, "", names, rows, urls=urls, picks=picks)
        ids = pl.read_parquet(part, columns=["id"])["id"].to_list()
        tls_rows = {ids[i] for i, h in enumerate(hosts) if the_web.servers[h].tls}
        stalled = {ids[i] for i, h in enumerate(hosts) if the_web.servers[h].stalls}
        stalled_tls = len(stalled & tls_rows)
        cdn = the_web.by_rank[0]
        sizes = sorted(len(b) for b in files.values())
        row_kb = sorted(len(files[names[k]]) / 1024 for k in picks)
        rtts = sorted(s.rtt * 1000 for s in the_web.servers.values())
        think = sorted(think_time(i, think_cap) for i in range(rows))
        print(f"# machine: {machine()}; load average before: {before}")
        print(
            f"# web: {rows:,} rows over {WEB_HOSTS} hosts (127.0.1.1-64: {len(WEB_TLS_RANKS)} "
            f"over TLS, {len(WEB_STALL_RANKS)} stalling), Zipf {WEB_ZIPF:g} (the most popular, "
            f"{web_address(cdn)}: {hosts.count(cdn) / rows:.0%} of the rows); {len(names)} JPEGs "
            f"of {sizes[0] / 1024:,.0f}-{sizes[-1] / 1024:,.0f} KB (a row's: median "
            f"{row_kb[rows // 2]:,.0f} KB, mean {sum(row_kb) / rows:,.0f} KB)"
        )
        print(
            f"# delays: think time median {think[rows // 2] * 1000:.0f} ms, "
            f"{sum(t > 2 for t in think) / rows:.1%} over 2 s, capped at {think_cap:g} s; host "
            f"RTTs {rtts[0]:.0f}-{rtts[-1]:.0f} ms (median {rtts[len(rtts) // 2]:.0f} ms), "
            "one more per new connection (two on TLS): simulated, loopback has none"
        )
        print(
            f"# {args.processes} processes x {args.threads} threads, shards of {args.shard}, "
            "retries 1, timeout 10 s"
        )
        print(
            f"# rows on TLS hosts: {len(tls_rows):,}; rows on stalling hosts: {len(stalled):,} "
            f"({stalled_tls} of them over TLS)"
        )
        probe = the_web.by_rank[1]
        without, with_ca = check_tls(the_web, probe, ca)
        print(
            f"# TLS check on {web_address(probe)} (urllib's default context and "
            f"ssl.create_default_context()): without our CA: {without}; with "
            f"SSL_CERT_FILE={ca}: {with_ca}"
        )
        if "CERTIFICATE_VERIFY_FAILED" not in without or not with_ca.startswith("verified"):
            sys.exit("TLS check failed: the default context must refuse the throwaway CA "
                     "without SSL_CERT_FILE and verify with it")  # fmt: skip
        env = {**os.environ, "SSL_CERT_FILE": str(ca)}
        results = {}
        for engine in ("img2dataset", "ours"):
            with the_web.lock:
                the_web.errors.clear()
                the_web.counts.clear()
            result = spawn_engine(engine, work, part, args, WEB_NETWORK, env)
            with the_web.lock:
                result["server_errors"] = dict(the_web.errors)
                result["server"] = {"connections": 0, "tls_connections": 0, "requests": 0}
                result["server"].update(the_web.counts)
            result["images_per_second"] = result["success"] / result["seconds"]
            results[engine] = result
            print(
                f"{engine:12s} {result['seconds']:7.1f} s  {result['images_per_second']:7.1f} "
                f"img/s  {result['success']:,} images  {result['timeouts']:,} timeouts  "
                f"{result['other_failures']:,} other failures  "
                f"peak RSS {result['peak_rss_mb']:,.0f} MB"
            )
            served = result["server"]
            print(
                f"  server side: {served['connections']:,} connections "
                f"({served['tls_connections']:,} over TLS) for {served['requests']:,} "
                "answered requests"
            )
            if result["other_reasons"]:
                print(f"  {engine} other failures: {result['other_reasons']}")
            if result["held_back"]:
                print(f"  {engine}: {result['held_back']} shard tries held back as an outage")
            if result["server_errors"]:
                print(f"  server-side errors during {engine}: {result['server_errors']}")
        ok = {e: set(r["success_ids"]) for e, r in results.items()}
        timed_out = {e: set(r["timeout_ids"]) for e, r in results.items()}
        print(
            f"TLS rows: {len(tls_rows):,}; succeeded: img2dataset "
            f"{len(ok['img2dataset'] & tls_rows):,}, ours {len(ok['ours'] & tls_rows):,} "
            f"({stalled_tls} on the stalling TLS host)"
        )
        print(
            f"stalled rows: {len(stalled):,}; timed out: img2dataset "
            f"{len(timed_out['img2dataset'] & stalled):,}, "
            f"ours {len(timed_out['ours'] & stalled):,}"
            f"; succeeded: img2dataset {len(ok['img2dataset'] & stalled)}, "
            f"ours {len(ok['ours'] & stalled)}"
        )
        same = ok["img2dataset"] == ok["ours"]
        if same:
            print(f"same successful rows for both engines: yes ({len(ok['ours']):,} rows)")
        else:
            only_i2d = sorted(ok["img2dataset"] - ok["ours"])
            only_ours = sorted(ok["ours"] - ok["img2dataset"])
            print(
                f"same successful rows for both engines: NO ({len(only_i2d)} only img2dataset's, "
                f"e.g. {only_i2d[:5]}; {len(only_ours)} only ours, e.g. {only_ours[:5]})"
            )
        stall_ok = not (stalled & (ok["img2dataset"] | ok["ours"]))
        after = loadavg()
        print(f"# load average after: {after}")
        ratio = results["ours"]["images_per_second"] / results["img2dataset"]["images_per_second"]
        print(verdict(ratio, WEB_TARGET))
        for result in results.values():
            del result["success_ids"], result["timeout_ids"]
        write_json(
            args.json,
            {
                "mode": "web-quick" if args.quick else "web",
                "machine": machine(),
                "rows": rows,
                "processes": args.processes,
                "threads": args.threads,
                "shard": args.shard,
                "tls_rows": len(tls_rows),
                "stalled_rows": len(stalled),
                "engines": results,
                "tls_successes": {e: len(ok[e] & tls_rows) for e in ok},
                "stalled_timeouts": {e: len(timed_out[e] & stalled) for e in ok},
                "same_successful_rows": same,
                "ratio_images_per_second": ratio,
                "target": WEB_TARGET,
                "target_met": ratio >= WEB_TARGET,
                "load_average_before": before,
                "load_average_after": after,
            },
        )
    finally:
        the_web.close()
        shutil.rmtree(work, ignore_errors=True)
    if not same:
        sys.exit("web: the engines succeeded on different rows")
    if not stall_ok:
        sys.exit("web: a row on a stalling host succeeded")


def cpu_bound(args: argparse.Namespace) -> None:
    """Both engines on one CPU-bound loopback server (the module docstring's first mode)."""
    before = loadavg()
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

    print(f"# {machine()}; "
          f"{args.images} images from {len(names)} photos (600-1,200 px short side) on {base}; "
          f"{args.processes} processes x {args.threads} threads, "
          f"shards of {args.shard}")  # fmt: skip
    print(f"# load average before: {before}")
    results = {}
    for engine in ("img2dataset", "ours"):
        result = spawn_engine(engine, work, part, args)
        del result["success_ids"], result["timeout_ids"]
        if result["success"] != args.images:
            sys.exit(f"{engine}: {result['success']} of {args.images} images downloaded")
        results[engine] = result
        rate = result["rows"] / result["seconds"]
        cpu_ms = 1000 * result["cpu_seconds"] / result["rows"]
        print(f"{engine:12s} {result['seconds']:7.1f} s  {rate:7.1f} img/s  "
              f"CPU {cpu_ms:5.1f} ms/img  "
              f"peak RSS {result['peak_rss_mb']:,.0f} MB")  # fmt: skip
    server.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    after = loadavg()
    print(f"# load average after: {after}")
    ratio = results["img2dataset"]["seconds"] / results["ours"]["seconds"]
    print(verdict(ratio, CPU_TARGET))
    write_json(
        args.json,
        {
            "mode": "cpu-quick" if args.quick else "cpu",
            "machine": machine(),
            "images": args.images,
            "processes": args.processes,
            "threads": args.threads,
            "shard": args.shard,
            "engines": results,
            "ratio_images_per_second": ratio,
            "target": CPU_TARGET,
            "target_met": ratio >= CPU_TARGET,
            "load_average_before": before,
            "load_average_after": after,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, help="rows (2,000; --web 3,000; --soak 50,000)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the tests)")
    parser.add_argument("--web", action="store_true", help="a realistic web of 64 hosts")
    parser.add_argument("--json", help="also write the figures to this file (not --soak)")
    parser.add_argument("--soak", action="store_true", help="50,000 URLs through a hostile hour")
    parser.add_argument("--hostile", type=float, default=0.05, help="soak: share of hostile rows")
    parser.add_argument("--transient", type=float, default=0.02, help="soak: share transient")
    parser.add_argument("--outage-at", type=float, default=20.0, help="soak: outage starts (s)")
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="soak: outage (s)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--allow", default=f"{HOST}/32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        run_engine(
            args.engine, args.part, args.out, args.processes, args.threads, args.shard, args.allow
        )
        return
    if args.soak:
        if args.quick:
            args.images, args.processes, args.threads, args.shard = 300, 1, 8, 50
            args.outage_at, args.outage_seconds = 2.0, 2.0
        elif args.images is None:
            args.images, args.shard = 50_000, 1_000
        soak(args)
        return
    if args.web:
        if args.quick:
            args.images, args.processes, args.threads, args.shard = 150, 1, 8, 50
        elif args.images is None:
            args.images = 3_000
        web(args)
        return
    if args.quick:
        args.images, args.processes, args.threads, args.shard = 40, 1, 4, 20
    elif args.images is None:
        args.images = 2_000
    cpu_bound(args)


if __name__ == "__main__":
    main()
