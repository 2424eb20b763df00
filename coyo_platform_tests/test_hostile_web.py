"""The hostile web, on loopback: a server that misbehaves in every way a 747M-URL crawl meets
(redirects into the private network, the cloud metadata address, trickling and endless bodies,
decompression bombs, HTML, garbage, changed images), and a second "internal" server that must
never see a request. The real download program runs against them; every row's recorded status is
checked, and no row is lost or duplicated."""

from __future__ import annotations

import dataclasses
import datetime
import http.server
import io
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import imagehash
import polars as pl
import pytest
from PIL import Image

from coyo_platform import demo
from coyo_platform.download.fetch import Guard, why_blocked
from coyo_platform_tests import conftest
from coyo_platform_tests.conftest import free_port, without_dagster


def download_cmd(metadata: Path, out: Path, *extra: str) -> list[str]:
    """conftest's, without dedup before download: these parts name one photo (with its crawl
    pHash) row after row on purpose, which dedup would fetch once."""
    return conftest.download_cmd(metadata, out, "--no-dedup-crawl-phash", *extra)


WEB_HOST = "127.0.0.2"  # the allowed "internet"; 127.0.0.1 stays forbidden, like a private network


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Files:
    def __init__(self, images: Path) -> None:
        self.photo = (images / "astronaut.jpg").read_bytes()
        self.other = (images / "coffee.jpg").read_bytes()
        self.tiny = (images / "tiny.jpg").read_bytes()
        self.truncated = (images / "truncated.jpg").read_bytes()
        # 12,000 x 8,000 = 96M pixels (above the 89.5M limit) and 20,000 x 20,000 (above PIL's
        # own hard limit): a few KB on the wire each, gigabytes once decoded
        self.bomb = _png(Image.new("1", (12_000, 8_000)))
        self.bomb_hard = _png(Image.new("1", (20_000, 20_000)))
        self.phash = {
            name: str(imagehash.phash(Image.open(io.BytesIO(data))))
            for name, data in (("photo", self.photo), ("other", self.other))
        }


class Hostile(http.server.BaseHTTPRequestHandler):
    files: Files
    hits: Counter
    gate: threading.Event = threading.Event()  # /gate.jpg answers once the test sets it
    relay: threading.Event = threading.Event()  # /relay-wait.jpg answers once /relay-open.jpg
    web_hits: Counter

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, kind: str = "image/jpeg", headers: dict | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802, C901 - one route per misbehaviour
        path, _, query = self.path.partition("?")
        self.hits[path] += 1
        f = self.files
        try:
            if path in ("/photo.jpg", "/photo2.jpg", "/nohash.jpg"):
                self._send(f.photo)
            elif path == "/changed.jpg":  # the crawl saw `photo` here; now it serves another
                self._send(f.other)
            elif path == "/tiny.jpg":
                self._send(f.tiny)
            elif path == "/truncated.jpg":
                self._send(f.truncated)
            elif path == "/garbage.jpg":
                self._send(os.urandom(5000))
            elif path == "/page.html":
                self._send(b"<html><body>moved</body></html>", "text/html; charset=utf-8")
            elif path == "/noai.jpg":
                self._send(f.photo, headers={"X-Robots-Tag": "noai"})
            elif path == "/bomb.png":
                self._send(f.bomb, "image/png")
            elif path == "/bomb-hard.png":
                self._send(f.bomb_hard, "image/png")
            elif path == "/r":  # redirect to ?to=...
                self.send_response(302)
                self.send_header("Location", query.removeprefix("to="))
                self.end_headers()
            elif path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.end_headers()
            elif path == "/404.jpg":
                self.send_error(404)
            elif path == "/500.jpg":
                self.send_error(500)
            elif path == "/reset.jpg":  # the connection dies before any answer
                self.connection.shutdown(2)
            elif path == "/sleep.jpg":  # headers never come within the timeout
                time.sleep(6)
                self._send(f.photo)
            elif path == "/trickle.jpg":  # a byte a second, each read within the per-read timeout
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(f.photo)))
                self.end_headers()
                for byte in f.photo[:20]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(1)
            elif path == "/endless.jpg":  # no length, never ends
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()
                chunk = b"\xff" * 65536
                for _ in range(2000):  # 128 MB at most, then give up on the client
                    self.wfile.write(chunk)
            elif path == "/r-body":  # a redirect whose own body announces 10^20 bytes
                self.send_response(302)
                self.send_header("Location", "/photo.jpg")
                self.send_header("Content-Length", str(10**20))
                self.end_headers()
                self.wfile.write(b"x" * 1000)
            elif path == "/short.jpg":  # the connection ends halfway through the body
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(f.photo)))
                self.end_headers()
                self.wfile.write(f.photo[: len(f.photo) // 2])
                self.close_connection = True
            elif path == "/gate.jpg":
                self.gate.wait()
                self._send(f.photo)
            elif path == "/relay-wait.jpg":  # no answer before /relay-open.jpg is asked for
                self.relay.wait(timeout=20)
                self._send(f.photo)
            elif path == "/relay-open.jpg":
                self.relay.set()
                self._send(f.photo)
            elif path == "/huge.jpg":  # announces 10 GB
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(10**10))
                self.end_headers()
                self.wfile.write(b"\xff\xd8" + b"\0" * 1000)
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the download program hung up: what a cut is


def _serve(
    host: str, handler: type, tls: tuple[Path, Path] | None = None
) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"{'https' if tls else 'http'}://{host}:{server.server_address[1]}"


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for WEB_HOST (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(WEB_HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory):
    images = tmp_path_factory.mktemp("hostile")
    demo.write_images(images)
    files = Files(images)
    internal_hits: Counter = Counter()
    web_hits: Counter = Counter()
    internal = type("Internal", (Hostile,), {"files": files, "hits": internal_hits})
    hostile = type("Web", (Hostile,), {"files": files, "hits": web_hits})
    Hostile.web_hits = web_hits
    inside, inside_url = _serve("127.0.0.1", internal)  # stands for 169.254.169.254 / 10.x
    outside, web_url = _serve(WEB_HOST, hostile)
    trusted = _certificate(images, "trusted")  # the download program trusts it (SSL_CERT_FILE)
    secure, secure_url = _serve(WEB_HOST, hostile, tls=trusted)
    untrusted, untrusted_url = _serve(WEB_HOST, hostile, tls=_certificate(images, "untrusted"))
    os.environ["SSL_CERT_FILE"] = str(trusted[0])  # read by the download subprocesses
    urls = {"web": web_url, "https": secure_url, "untrusted": untrusted_url}
    yield files, urls, inside_url, internal_hits
    os.environ.pop("SSL_CERT_FILE")
    for server in (inside, outside, secure, untrusted):
        server.shutdown()
        server.server_close()


def _cases(files: Files, urls: dict, inside: str) -> list[tuple[str, str | None, str, str]]:
    """(url, the crawl's image_phash, expected status, expected reason) for each row."""
    port = inside.rsplit(":", 1)[1]
    web, tls = urls["web"], urls["https"]
    good = files.phash["photo"]
    return [
        (f"{web}/photo.jpg", good, "success", ""),
        (f"{web}/r?to={web}/photo2.jpg", good, "success", ""),
        (f"{web}/nohash.jpg", None, "success", ""),
        (f"{web}/changed.jpg", good, "drifted", "drifted"),
        (f"{web}/r?to={inside}/latest/meta-data/", good, "blocked", "blocked: loopback address"),
        (f"{web}/r?to=http://localhost:{port}/x", good, "blocked", "blocked: loopback address"),
        (f"{web}/r?to=file:///etc/passwd", good, "blocked", "blocked: redirect to a non-http(s)"),
        (
            "http://169.254.169.254/latest/meta-data/iam/",
            good,
            "blocked",
            "blocked: link-local address",
        ),
        (f"{inside}/latest/meta-data/", good, "blocked", "blocked: loopback address"),
        (f"http://localhost:{port}/x.jpg", good, "blocked", "blocked: loopback address"),
        (f"http://[::1]:{port}/x.jpg", good, "blocked", "blocked: loopback address"),
        (f"http://2130706433:{port}/x.jpg", good, "blocked", "blocked: loopback address"),
        (f"http://[::ffff:127.0.0.1]:{port}/x", good, "blocked", "blocked: loopback address"),
        ("http://10.0.0.1/x.jpg", good, "blocked", "blocked: private address"),
        ("http://0.0.0.0/x.jpg", good, "blocked", "blocked: unspecified address"),
        ("file:///etc/passwd", good, "blocked", "blocked: not an http(s) URL"),
        (f"{web}/loop", good, "failed_to_download", "download: http 302"),
        (f"{web}/404.jpg", good, "failed_to_download", "download: http 404"),
        (f"{web}/500.jpg", good, "failed_to_download", "download: http 500"),
        (f"{web}/reset.jpg", good, "failed_to_download", "download: connection reset"),
        (f"{web}/noai.jpg", good, "failed_to_download", "download: disallowed by X-Robots-Tag"),
        (f"{web}/sleep.jpg", good, "timeout", "timeout"),
        (f"{web}/trickle.jpg", good, "timeout", "timeout"),
        (f"{web}/endless.jpg", good, "too_large", "too large"),
        (f"{web}/huge.jpg", good, "too_large", "too large"),
        (f"{web}/bomb.png", good, "decompression_bomb", "decompression bomb"),
        (f"{web}/bomb-hard.png", good, "decompression_bomb", "decompression bomb"),
        (f"{web}/page.html", good, "not_an_image", "not an image"),
        (f"{web}/garbage.jpg", good, "not_an_image", "not an image"),
        (f"{web}/truncated.jpg", good, "not_an_image", "not an image"),
        (f"{web}/tiny.jpg", good, "failed_to_resize", "resize: image too small"),
        (f"{web}/r-body", good, "success", ""),  # a redirect's body is never read
        (f"{web}/short.jpg", good, "failed_to_download", "download: incomplete body"),
        ("http://[::1", good, "failed_to_download", "download: bad url"),  # malformed URLs
        ("http://ex\uff03ample.com/a.jpg", good, "failed_to_download", "download: bad url"),
        # the same over TLS: the guard, the deadline and the size cut hold there too
        (f"{tls}/photo.jpg", good, "success", ""),
        (f"{web}/r?to={tls}/photo2.jpg", good, "success", ""),
        (f"{tls}/r?to={inside}/latest/", good, "blocked", "blocked: loopback address"),
        (f"{tls}/trickle.jpg", good, "timeout", "timeout"),
        (f"{tls}/endless.jpg", good, "too_large", "too large"),
        (f"{urls['untrusted']}/photo.jpg", good, "failed_to_download", "download: tls"),
    ]


def _part(tmp: Path, rows: list[tuple[str, str | None, str, str]]) -> Path:
    frame = demo.make_part(tmp, [demo.Item("x.jpg", "photo")], "http://unused", len(rows), 10**12)
    frame = frame.with_columns(
        pl.Series("url", [r[0] for r in rows]),
        pl.Series("image_phash", [r[1] for r in rows], dtype=pl.String),
    )
    path = tmp / "part.parquet"
    frame.write_parquet(path)
    return path


def _download(part: Path, out: Path, *extra: str, env: dict | None = None) -> dict:
    """Run the download program; its report (printed as JSON outside Dagster)."""
    cmd = download_cmd(
        part, out,
        "--thread-count", "16", "--number-sample-per-shard", "12", "--retries", "0",
        "--timeout", "2", "--max-seconds", "4", "--max-bytes", str(4 * 1024 * 1024),
        "--allow-networks", f"{WEB_HOST}/32", *extra,
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


def _rows(out: Path) -> pl.DataFrame:
    files = sorted(out.glob("*.parquet"))
    assert len(files) == len(list(out.glob("*_stats.json")))
    return pl.concat([pl.read_parquet(f) for f in files])


def _tar_ids(out: Path) -> list[int]:
    ids = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    ids.append(json.load(t.extractfile(m))["id"])
    return ids


def test_every_misbehaviour_gets_its_status_and_no_row_is_lost(web, tmp_path: Path):
    files, urls, inside_url, internal_hits = web
    cases = _cases(files, urls, inside_url)
    part = _part(tmp_path, cases)
    ids = pl.read_parquet(part)["id"].to_list()
    report = _download(part, tmp_path / "out", "--drop-drifted")

    rows = _rows(tmp_path / "out")
    assert sorted(rows["id"]) == sorted(ids), "every input row exactly once"
    by_id = {r["id"]: r for r in rows.iter_rows(named=True)}
    wrong = []
    for (url, _, status, _reason), i in zip(cases, ids, strict=True):
        row = by_id[i]
        if row["status"] != status:
            wrong.append((url, status, row["status"], row["error_message"]))
    assert not wrong, wrong

    # final and transient failures kept apart, per row
    for row in rows.iter_rows(named=True):
        message = row["error_message"] or ""
        transient = row["status"] == "timeout" or any(
            m in message
            for m in ("HTTP Error 500", "RemoteDisconnected", "IncompleteRead", "incomplete body")
        )
        assert row["transient"] is transient, (row["status"], message)

    # the private side never saw a request: not directly, not by redirect, not by name
    assert sum(internal_hits.values()) == 0, internal_hits

    # only successes are in the tars, each once
    success = sorted(i for (_, _, s, _), i in zip(cases, ids, strict=True) if s == "success")
    assert sorted(_tar_ids(tmp_path / "out")) == success

    # the drift distance is kept; the crawl's hash missing -> no distance
    assert by_id[ids[0]]["phash_distance"] == 0
    assert by_id[ids[2]]["phash_distance"] is None
    assert by_id[ids[3]]["phash_distance"] > 12

    # what the UI shows: statuses, reasons, blocked and drift figures
    expected = Counter(s for _, _, s, _ in cases)
    assert report["by_status"] == dict(expected)
    assert report["blocked"] == expected["blocked"]
    assert report["attempted"] == len(cases) and report["succeeded"] == expected["success"]
    reasons = Counter()
    for _, _, status, reason in cases:
        if status != "success":
            reasons[reason] += 1
    for reason, n in reasons.items():
        got = sum(v for k, v in report["failures"].items() if k.startswith(reason))
        assert got == n, (reason, report["failures"])
    # images that decoded and have a crawl hash: five successes, the drifted one, the tiny one
    assert report["phash_compared"] == 7
    assert report["drifted"] == 1 and report["drift_rate"] == pytest.approx(1 / 7, abs=1e-4)


def test_drifted_images_are_kept_unless_asked_and_counted_either_way(web, tmp_path: Path):
    files, urls, inside_url, _ = web
    cases = [c for c in _cases(files, urls, inside_url)[:4] if c[2] in ("success", "drifted")]
    part = _part(tmp_path, cases)
    report = _download(part, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert rows["status"].to_list().count("success") == len(cases)
    assert report["drifted"] == 1 and report["drifted_dropped"] is False
    assert report["drift_rate"] == pytest.approx(1 / 3, abs=1e-4)


def test_a_rerun_after_everything_failed_keeps_every_row_once(web, tmp_path: Path):
    """Shards are done once written: a rerun changes nothing and duplicates nothing. Both runs
    go without dagster importable, as in the programs image."""
    files, urls, inside_url, _ = web
    part = _part(tmp_path, _cases(files, urls, inside_url)[:14])
    out, env = tmp_path / "out", without_dagster(tmp_path / "no_dagster")
    _download(part, out, env=env)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    report = _download(part, out, env=env)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert report["shards_this_run"] == 0 and report["attempted"] == 14
    assert _rows(out)["id"].is_unique().all()


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("169.254.169.254", "link-local"),  # AWS/GCP/Azure instance metadata
        ("fd00:ec2::254", "private"),  # AWS metadata over IPv6
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "non-global"),  # carrier-grade NAT
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::ffff:169.254.169.254", "link-local"),  # IPv4-mapped
        ("2002:a9fe:a9fe::", "link-local"),  # 6to4 wrapping 169.254.169.254
        ("2002:808:808::1", None),  # 6to4 wrapping 8.8.8.8: both global
        ("2001:0:7f00:1:8000:63bf:3fff:fdd2", "loopback"),  # Teredo, server 127.0.0.1
        ("2001:0:808:808:8000:63bf:80ff:fefe", "loopback"),  # Teredo, client 127.0.1.1
        # Teredo with server 8.8.8.8 and client 8.8.4.4: the Teredo prefix itself is not global
        ("2001:0:808:808:8000:63bf:f7f7:fbfb", "private"),
        ("fe80::1", "link-local"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_which_addresses_are_refused(address: str, blocked: str | None):
    reason = why_blocked(ipaddress.ip_address(address))
    assert (reason is None) if blocked is None else (blocked in reason), reason


def test_urls_are_sent_as_a_browser_sends_them(monkeypatch: pytest.MonkeyPatch):
    """A non-ASCII host goes out IDNA-encoded (and is resolved and guarded as such), a
    non-ASCII path and query percent-encoded as UTF-8; a host IDNA refuses is a bad URL."""
    from coyo_platform.download.fetch import Fetcher, FetchError, browser_url

    seen: list[tuple[str, str]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append((self.headers["Host"], self.path))
            body = _png(Image.new("RGB", (4, 4)))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    server, base = _serve(WEB_HOST, Recorder)
    port = server.server_address[1]
    real = socket.getaddrinfo
    asked: list[str] = []

    def resolve(host, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - a stub DNS for one name
        asked.append(host)
        return real(WEB_HOST if host == "xn--bcher-kva.example" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    fetcher = Fetcher(guard=Guard((ipaddress.ip_network(f"{WEB_HOST}/32"),)))
    try:
        data = fetcher.fetch(f"http://bücher.example:{port}/straße/ä b.png?q=ü&x=%20")
    finally:
        server.shutdown()
    assert data.startswith(b"\x89PNG")
    assert asked == ["xn--bcher-kva.example"]
    assert seen == [(f"xn--bcher-kva.example:{port}", "/stra%C3%9Fe/%C3%A4%20b.png?q=%C3%BC&x=%20")]
    assert browser_url("http://example.com/a%20b?c=d") == "http://example.com/a%20b?c=d"
    with pytest.raises(FetchError, match="bad url: host"):
        fetcher.fetch("http://\u0301abc.example/x.png")  # a label opening with a combining mark


def test_one_thread_s_fetches_each_get_their_own_time_limit_and_guard(web):
    """A thread keeps its opener from fetch to fetch: each fetch still gets a deadline of its
    own (a fetch after one cut at the time limit succeeds), redirects still go through the
    guard, and the limit still cuts a trickling body."""
    from coyo_platform.download.fetch import Fetcher, FetchError
    from coyo_platform.download.statuses import BLOCKED, TIMEOUT

    files, urls, inside, internal_hits = web
    base = urls["web"]
    fetcher = Fetcher(guard=Guard((ipaddress.ip_network(f"{WEB_HOST}/32"),)), max_seconds=3)
    for _ in range(2):
        start = time.monotonic()
        with pytest.raises(FetchError) as cut:
            fetcher.fetch(f"{base}/trickle.jpg")
        assert cut.value.status == TIMEOUT
        assert time.monotonic() - start >= 2.5  # its own 3 s, not what an earlier fetch left
        assert fetcher.fetch(f"{base}/photo.jpg") == files.photo
        assert fetcher.fetch(f"{base}/r?to={base}/photo2.jpg") == files.photo
        hits = sum(internal_hits.values())
        with pytest.raises(FetchError) as blocked:
            fetcher.fetch(f"{base}/r?to={inside}/latest/meta-data/")
        assert blocked.value.status == BLOCKED and "loopback" in str(blocked.value)
        assert sum(internal_hits.values()) == hits


def test_the_allow_list_opens_only_what_it_names():
    guard = Guard((ipaddress.ip_network("10.20.0.0/16"),))
    guard.check(ipaddress.ip_address("10.20.3.4"))
    with pytest.raises(Exception, match="private"):
        guard.check(ipaddress.ip_address("10.21.0.1"))
    with pytest.raises(Exception, match="link-local"):
        guard.check(ipaddress.ip_address("169.254.169.254"))


def test_a_bad_allow_list_is_refused_before_any_download(tmp_path: Path):
    cmd = download_cmd(
        tmp_path / "none.parquet", tmp_path / "out", "--allow-networks", "10.0.0.0/8,intranet"
    )
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "allow_networks: 'intranet' is not an IP network" in done.stderr
    assert not (tmp_path / "out").exists()


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _gated_part(tmp: Path, files: Files, urls: dict) -> Path:
    web, good = urls["web"], files.phash["photo"]
    rows = [(f"{web}/photo.jpg?v={i}", good, "success", "") for i in range(11)]
    return _part(tmp, [*rows, (f"{web}/gate.jpg", good, "success", "")])


def test_a_download_process_killed_fails_the_run_clearly_and_a_rerun_finishes(web, tmp_path):
    """A pool process killed (the OOM killer, a crashing decoder) fails the run with a message,
    instead of hanging it; the rerun finishes with every row once."""
    files, urls, _, _ = web
    part, out = _gated_part(tmp_path, files, urls), tmp_path / "out"
    Hostile.gate.clear()
    cmd = download_cmd(
        part, out, "--thread-count", "4", "--number-sample-per-shard", "6",
        "--allow-networks", f"{WEB_HOST}/32",
    )  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not Hostile.web_hits["/gate.jpg"]:  # shard 1 is in flight
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        [pool_process] = [c for c in _children(proc.pid) if b"spawn_main" in _cmdline(c)]
        os.kill(pool_process, 9)
        _, err = proc.communicate()
    finally:
        Hostile.gate.set()
    assert proc.returncode != 0
    assert "a download process died" in err and "rerun to resume" in err
    # the same settings again: the finished shard is kept, the other one is done whole
    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads(again.stdout[again.stdout.index("{") :])
    assert report["attempted"] == 12 and report["succeeded"] == 12
    assert _rows(out)["id"].is_unique().all() and not (out / "_tmp").exists()

    # other shard sizes would cut the part differently: refused, nothing changed
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = cmd[: cmd.index("--number-sample-per-shard") + 1] + ["5", *cmd[-2:]]
    refused = subprocess.run(other, capture_output=True, text=True, check=False)
    assert refused.returncode != 0
    assert "settings.number_sample_per_shard=6, but this run asks for" in refused.stderr
    assert "settings.number_sample_per_shard=5" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_the_next_shard_is_fetched_while_a_shard_waits_on_its_slowest_row(web, tmp_path):
    """One process, two threads, two shards of six rows: shard 0's first row gets no answer until
    a row of shard 1 is asked for. A thread that finished shard 0's other rows goes on to shard 1
    instead of idling until the slow row is done, so the slow row is answered within the 3 s
    timeout, and both shards are committed whole, every row once."""
    files, urls, _, _ = web
    web_url, good = urls["web"], files.phash["photo"]
    rows = [(f"{web_url}/relay-wait.jpg", good, "success", "")]
    rows += [(f"{web_url}/photo.jpg?v={i}", good, "success", "") for i in range(5)]
    rows += [(f"{web_url}/photo.jpg?v={i}", good, "success", "") for i in range(5, 10)]
    rows += [(f"{web_url}/relay-open.jpg", good, "success", "")]
    part, out = _part(tmp_path, rows), tmp_path / "out"
    Hostile.relay.clear()
    cmd = download_cmd(
        part, out, "--processes-count", "1", "--thread-count", "2",
        "--number-sample-per-shard", "6", "--timeout", "3", "--retries", "0",
        "--allow-networks", f"{WEB_HOST}/32",
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = _rows(out)
    assert sorted(got["id"]) == sorted(pl.read_parquet(part)["id"])
    assert got["status"].to_list() == ["success"] * 12, got.select("url", "status", "error_message")
    assert sorted(_tar_ids(out)) == sorted(got["id"])
    assert sorted(p.name for p in out.glob("*_stats.json")) == [
        "00000_stats.json",
        "00001_stats.json",
    ]


def test_a_host_that_keeps_timing_out_is_not_retried_at_once_until_it_answers(web, tmp_path):
    """One thread, one retry, in row order: three rows whose answers never come in time, four
    that answer, one more that never does. The first is tried twice, then its host has timed out
    twice in a row and the next two are tried once each; the host then answers, so the last
    slow row gets its retry again (6 requests for the 4 slow rows, not 8). A stalling host holds
    a thread once per row, not once per try, and a host that times out now and then keeps its
    retries. Each slow row is still a transient timeout, for ``retry_failed``."""
    files, urls, _, _ = web
    good = files.phash["photo"]
    slow = [(f"{urls['web']}/sleep.jpg?v={i}", good, "timeout", "") for i in range(4)]
    fine = [(f"{urls['web']}/photo.jpg?v={i}", good, "success", "") for i in range(4)]
    part, out = _part(tmp_path, [*slow[:3], *fine, slow[3]]), tmp_path / "out"
    before = Hostile.web_hits["/sleep.jpg"]
    cmd = download_cmd(
        part, out, "--processes-count", "1", "--thread-count", "1", "--retries", "1",
        "--timeout", "1", "--allow-networks", f"{WEB_HOST}/32",
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = _rows(out).sort("id")
    assert got["status"].to_list() == ["timeout"] * 3 + ["success"] * 4 + ["timeout"]
    assert got["transient"].to_list() == [True] * 3 + [False] * 4 + [True]
    assert Hostile.web_hits["/sleep.jpg"] - before == 6


def _outage_cmd(part: Path, out: Path) -> list[str]:
    return download_cmd(
        part, out, "--number-sample-per-shard", "5", "--timeout", "2", "--retries", "0",
        "--shard-retries", "1", "--outage-backoff", "0.2", "--allow-networks", f"{WEB_HOST}/32",
    )  # fmt: skip


def test_a_server_down_then_up_loses_nothing(web, tmp_path: Path):
    """The image server is down: every row fails transiently (connection refused), so no shard
    is committed; the program tries again after a backoff, then fails naming the likely cause.
    With the server back, the same command downloads every image, each once."""
    files, _, _, _ = web
    port = free_port()
    base = f"http://{WEB_HOST}:{port}"
    rows = [(f"{base}/photo.jpg", files.phash["photo"], "success", "")] * 10
    part = _part(tmp_path, rows)
    out = tmp_path / "out"
    down = subprocess.run(_outage_cmd(part, out), capture_output=True, text=True)
    assert down.returncode == 1
    assert "0 of 2 shards finished" in down.stderr
    assert "5 of 5 rows failed transiently (download: connection refused 5)" in down.stderr
    assert "likely cause: the network" in down.stderr
    assert "trying again in 0.2 s" in down.stderr  # backed off once, then gave up
    assert not list(out.glob("*_stats.json")) and not list(out.glob("*.tar"))

    handler = type("Back", (Hostile,), {"files": files, "hits": Counter()})
    server = http.server.ThreadingHTTPServer((WEB_HOST, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = subprocess.run(_outage_cmd(part, out), capture_output=True, text=True)
    finally:
        server.shutdown()
        server.server_close()
    assert up.returncode == 0, up.stderr[-2000:]
    got = _rows(out)
    assert sorted(got["id"]) == sorted(pl.read_parquet(part)["id"])  # every row once
    assert got["status"].to_list() == ["success"] * 10
    assert sorted(_tar_ids(out)) == sorted(got["id"])  # every image once


def test_names_that_all_fail_to_resolve_are_an_outage(web, tmp_path: Path):
    """A resolver down looks like every name failing: not committed as ten dead links."""
    rows = [(f"http://no-such-host-{i}.invalid/x.jpg", None, "", "") for i in range(5)]
    out = tmp_path / "out"
    done = subprocess.run(_outage_cmd(_part(tmp_path, rows), out), capture_output=True, text=True)
    assert done.returncode == 1
    assert "every name failed to resolve" in done.stderr
    assert not list(out.glob("*_stats.json"))


def test_a_partition_with_no_image_fails_and_says_why(web, tmp_path: Path):
    """Every URL blocked (they name loopback addresses): the download fails as bad input, with
    the counts and the fix, and not as an empty success."""
    rows = [(f"http://127.0.0.1:9/{i}.jpg", None, "", "") for i in range(4)]
    out = tmp_path / "out"
    cmd = download_cmd(_part(tmp_path, rows), out, "--number-sample-per-shard", "5")
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no image downloaded: all 4 URLs failed (blocked 4;")
    assert "non-public addresses; --allow-networks" in line


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_a_second_download_on_the_same_folder_is_refused(web, tmp_path: Path):
    import fcntl

    files, urls, _, _ = web
    part, out = _gated_part(tmp_path, files, urls), tmp_path / "out"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)  # as a running download program holds it
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        cmd = download_cmd(part, out, "--allow-networks", f"{WEB_HOST}/32")
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        os.close(holder)
    assert done.returncode != 0
    assert f"another download program is writing {out}" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == []


def test_formats_beyond_the_web_image_ones_are_refused_before_decoding():
    """A TIFF (where Pillow and libtiff can read one file as two sizes) never reaches a decoder;
    the web's own formats pass."""
    from coyo_platform.download.inspect import inspect

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format=fmt)
        return buf.getvalue()

    refused = inspect(encoded("TIFF"), None, 10**6)
    assert (refused.status, refused.message) == (
        "not_an_image",
        "not an image: format TIFF refused",
    )
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP"):
        got = inspect(encoded(fmt), None, 10**6)
        assert (got.status, got.size) == ("success", (64, 48)), fmt


def test_opencv_refuses_what_pillow_would_in_a_pool_process(tmp_path: Path):
    """The pool processes give OpenCV the same pixel limit (img2dataset's resizer decodes with
    it): an image over ``max_pixels`` is refused by the decoder itself, not decoded."""
    script = (
        "import io, os\n"
        "from PIL import Image\n"
        "from coyo_platform.download.run import _pool_process\n"
        "_pool_process(os.getppid(), 100 * 100)\n"
        "from img2dataset.resizer import Resizer\n"
        "r = Resizer(image_size=64, resize_mode='keep_ratio', resize_only_if_bigger=True)\n"
        "def png(w, h):\n"
        "    b = io.BytesIO(); Image.new('RGB', (w, h)).save(b, format='PNG'); return b\n"
        "print(r(png(100, 100))[-1], '|', r(png(101, 100))[-1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    within, beyond = done.stdout.strip().split(" | ")
    assert within == "None"  # decoded
    assert "CV_IO_MAX_IMAGE_PIXELS" in beyond  # refused by OpenCV


def test_an_image_the_two_decoders_see_differently_is_refused(tmp_path: Path):
    """Pillow's header said one size, OpenCV decoded another: the row is refused, not kept."""
    from coyo_platform.download.inspect import Fetched
    from coyo_platform.download.settings import DownloadSettings
    from coyo_platform.download.shard import ShardDownloader

    shard = ShardDownloader(str(tmp_path), DownloadSettings(), ["url", "caption"])
    shard.resizer = lambda stream: (b"jpeg", 512, 512, 32768, 32768, None)  # libtiff's view
    got = Fetched(0, b"bytes", "success", size=(256, 256))
    image, meta = shard._sample(0, {"url": "http://x/y.tif", "caption": None}, got)
    assert image is None and meta["status"] == "not_an_image"
    assert meta["error_message"] == (
        "not an image: decoders disagree (Pillow 256 x 256, OpenCV 32768 x 32768)"
    )
    shard.resizer = lambda stream: (b"jpeg", 512, 256, 1024, 512, None)
    got = dataclasses.replace(got, size=(1024, 512))  # the same size: kept
    kept, meta = shard._sample(0, {"url": "http://x/y.jpg", "caption": None}, got)
    assert kept == b"jpeg" and meta["status"] == "success"


def test_alpha_is_composited_as_img2dataset_does_it_in_bounded_memory(tmp_path: Path):
    """RGBA images are composited over white in uint8, band by band: the same pixels as
    img2dataset's float64 compositing, and a 9000 x 9000 RGBA PNG (340 KB, under max_pixels)
    stays under 1.5 GB above the process's high-water mark (714 MB measured), where
    img2dataset's own path took 5.9 GB more."""
    import cv2
    import numpy as np

    from coyo_platform.download.shard import matted

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (300, 257, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    img = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_UNCHANGED)
    alpha = img[:, :, 3, np.newaxis]
    theirs = np.rint((alpha / 255 * img[..., :3] + 255 - alpha).clip(0, 255)).astype(np.uint8)
    ours = cv2.imdecode(np.frombuffer(matted(buf.getvalue()), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(ours, theirs)
    jpeg = _jpeg(Image.new("RGB", (8, 8)))
    assert matted(jpeg) is jpeg  # no alpha: the bytes as they came

    script = (
        "import io, os, resource, sys\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "from img2dataset.resizer import Resizer\n"
        "from coyo_platform.download.shard import matted\n"
        "a = np.zeros((9000, 9000, 4), np.uint8); a[::7, :, 0] = 200; a[:, :, 3] = 128\n"
        "b = io.BytesIO(); Image.fromarray(a, 'RGBA').save(b, format='PNG'); del a\n"
        "data = b.getvalue(); del b\n"
        "r = Resizer(image_size=512, resize_mode='keep_ratio', resize_only_if_bigger=True)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = r(io.BytesIO(matted(data)))\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(out[1], out[2], out[5], (peak - base) // 1024)\n"
    )
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    width, height, error, above_base_mb = done.stdout.split()
    print(f"9000 x 9000 RGBA: {above_base_mb} MB above the base")
    assert (width, height, error) == ("512", "512", "None")
    assert int(above_base_mb) < 1536  # the README's bound for one decode at this size


def test_an_outage_fails_the_step_with_its_cause_retried_then_a_rerun_gets_every_image(
    site, tmp_path: Path
):
    """Through Dagster: the image server down, the download step fails with the program's own
    reason (the outage and its counts), and is retried by the retry policy, as a transient
    failure; with the server back, the next materialization downloads every image, each once."""
    import functools

    import dagster as dg

    from coyo_platform.assets.coyo700m_metadata import coyo700m_metadata
    from coyo_platform.assets.downloaded_shards import downloaded_shards
    from coyo_platform.definitions import local_resources
    from coyo_platform_tests.conftest import LOOPBACK, expected_outcomes

    port = free_port()
    source = tmp_path / "source"
    demo.write_parts(source, site.images, site.items, f"http://127.0.0.1:{port}", 1, 10)
    resources = local_resources(source=str(source), data_root=str(tmp_path / "data"))
    settings = {
        "processes_count": 1, "thread_count": 4, "number_sample_per_shard": 5,
        "allow_networks": [LOOPBACK], "shard_retries": 0, "outage_backoff": 0.0,
    }  # fmt: skip
    config = {"ops": {"downloaded_shards": {"config": settings}}}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("coyo_parts", ["part-00000"])
        down = dg.materialize(
            [coyo700m_metadata, downloaded_shards], partition_key="part-00000",
            instance=instance, resources=resources, run_config=config, raise_on_error=False,
        )  # fmt: skip
        assert not down.success
        [failure] = [e.step_failure_data for e in down.all_events if e.is_step_failure]
        said = failure.user_failure_data.description
        assert said.startswith("download: RuntimeError: 0 of 2 shards finished")
        assert "rows failed transiently (download: connection refused" in said
        retried = instance.all_logs(down.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
        assert [e.step_key for e in retried] == ["downloaded_shards"] * 2  # the policy's 2
        assert not list((tmp_path / "data" / "downloaded_shards").rglob("*_stats.json"))

        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=site.images)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            up = dg.materialize(
                [downloaded_shards], partition_key="part-00000", instance=instance,
                resources=resources, run_config=config,
            )  # fmt: skip
        finally:
            server.shutdown()
            server.server_close()
    [done] = up.asset_materializations_for_node("downloaded_shards")
    part = pl.read_parquet(next(source.glob("part-00000*.parquet")))
    assert done.metadata["succeeded"].value == expected_outcomes(part, site.items)["photo"] > 0
    rows = _rows(tmp_path / "data" / "downloaded_shards" / "part-00000")
    assert sorted(rows["id"]) == sorted(part["id"])  # every row once


def test_an_outage_in_the_middle_of_a_shard_is_not_committed_and_is_redone(web, tmp_path: Path):
    """The server answers the first 3 requests, then 503 for the next 7 (an outage mid-shard),
    then recovers: the shard is not committed with 7 lost rows; it is redone after the backoff,
    whole, every row a success, each once."""
    files, _, _, _ = web
    answered, lock = Counter(), threading.Lock()

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            with lock:
                answered["n"] += 1
                n = answered["n"]
            if 3 < n <= 10:
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(files.photo)))
            self.end_headers()
            self.wfile.write(files.photo)

        def log_message(self, *args: object) -> None:
            pass

    server, base = _serve(WEB_HOST, Flaky)
    try:
        rows = [(f"{base}/{i}.jpg", files.phash["photo"], "", "") for i in range(10)]
        part = _part(tmp_path, rows)
        cmd = _outage_cmd(part, tmp_path / "out")
        cmd[cmd.index("--number-sample-per-shard") + 1] = "10"
        cmd += ["--thread-count", "1"]  # one request at a time: the counts above are exact
        done = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "7 of 10 rows failed transiently (download: http 503 7)" in done.stderr
    assert "trying again in 0.2 s" in done.stderr
    got = _rows(tmp_path / "out")
    assert got["status"].to_list() == ["success"] * 10
    assert sorted(got["id"]) == sorted(pl.read_parquet(part)["id"])
    assert sorted(_tar_ids(tmp_path / "out")) == sorted(got["id"])
    assert answered["n"] == 20  # 10 in the outage's try, 10 in the redo


FLAPPING_RESOLVER = """
import socket, threading
_real, _lock, _calls = socket.getaddrinfo, threading.Lock(), [0]
def _flapping(host, *args, **kwargs):
    if host != "flaky.test":
        return _real(host, *args, **kwargs)
    with _lock:
        _calls[0] += 1
        n = _calls[0]
    with open(__import__("os").environ["COYO_TEST_RESOLVER_LOG"], "a") as log:
        log.write("fail\\n" if n % 2 else "ok\\n")
    if n % 2:  # every other answer: "temporary failure in name resolution"
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    return _real("127.0.0.2", *args, **kwargs)
socket.getaddrinfo = _flapping
"""


def test_a_flapping_resolver_is_a_transient_failure_and_a_retry_recovers_it(web, tmp_path: Path):
    """A stub resolver that fails every other lookup (EAI_AGAIN): each such failure is
    transient, the fetch tries again (``retries`` 1) and gets the image; every row a success."""
    files, urls, _, _ = web
    port = urls["web"].rsplit(":", 1)[1]
    rows = [
        (f"http://flaky.test:{port}/photo.jpg?{i}", files.phash["photo"], "", "") for i in range(6)
    ]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FLAPPING_RESOLVER)
    log = tmp_path / "resolver.log"
    env = {**os.environ, "PYTHONPATH": str(hook), "COYO_TEST_RESOLVER_LOG": str(log)}
    cmd = download_cmd(
        _part(tmp_path, rows), tmp_path / "out", "--thread-count", "1", "--retries", "1",
        "--number-sample-per-shard", "6", "--allow-networks", f"{WEB_HOST}/32",
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    got = _rows(tmp_path / "out")
    assert got["status"].to_list() == ["success"] * 6
    assert sorted(_tar_ids(tmp_path / "out")) == sorted(got["id"])
    assert log.read_text().split() == ["fail", "ok"] * 6  # each URL: one failure, one answer


def crafted_tiff(big: int = 32768, small: int = 256) -> bytes:
    """The review's crafted BigTIFF: ImageWidth and ImageLength each twice, SLONG8 ``big`` first,
    then SHORT ``small``. Pillow skips the SLONG8 entries and reads ``small`` x ``small``;
    libtiff, under OpenCV, keeps them: ``big`` x ``big``. 336 bytes."""
    import struct
    import zlib

    strip = zlib.compress(b"\0" * (small * small), 9)
    entries = [
        (256, 17, big), (256, 3, small), (257, 17, big), (257, 3, small),  # width, length
        (258, 3, 8), (259, 3, 8), (262, 3, 1),  # 8 bits, deflate, grey
        (273, 16, None), (277, 3, 1), (278, 3, big), (279, 16, len(strip)),  # one strip
    ]  # fmt: skip
    ifd_at = 16
    data_at = ifd_at + 8 + 20 * len(entries) + 8
    out = bytearray(
        b"II" + struct.pack("<HHHQ", 43, 8, 0, ifd_at) + struct.pack("<Q", len(entries))
    )
    for tag, kind, value in entries:
        value = data_at if value is None else value
        packed = struct.pack("<q" if kind == 17 else "<Q", value) if kind in (16, 17) else None
        out += struct.pack("<HHQ", tag, kind, 1) + (packed or struct.pack("<H6x", value))
    return bytes(out + struct.pack("<Q", 0) + strip)


def test_the_crafted_tiff_is_refused_before_any_decode(tmp_path: Path):
    """The TIFF that Pillow reads as 256 x 256 and OpenCV as 32768 x 32768 (2.8 GB once decoded
    by img2dataset's resizer): refused from its header, by format; and OpenCV, with the pool
    processes' limit, refuses it too rather than decode it."""
    from coyo_platform.download.inspect import inspect

    data = crafted_tiff()
    assert Image.open(io.BytesIO(data)).size == (256, 256)  # Pillow's view
    got = inspect(data, None, 89_478_485)
    assert (got.status, got.message) == ("not_an_image", "not an image: format TIFF refused")
    (tmp_path / "crafted.tif").write_bytes(data)
    script = (
        "import cv2, numpy, sys\n"
        "data = numpy.fromfile(sys.argv[1], numpy.uint8)\n"
        "try:\n    cv2.imdecode(data, cv2.IMREAD_UNCHANGED)\n"
        "except cv2.error as exc:\n    print(str(exc).splitlines()[-1][:200])\n"
    )
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "89478485"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "crafted.tif")],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert "pixels <= CV_IO_MAX_IMAGE_PIXELS" in done.stdout  # OpenCV's view: 32768 x 32768


def _large_images(folder: Path, side: int) -> dict[str, bytes]:
    """Images of ``side`` x ``side`` pixels that compress well (a few MB at most on the wire):
    8-bit and 16-bit RGBA PNGs, a JPEG and a WebP."""
    import cv2
    import numpy as np

    y, x = np.mgrid[0:side, 0:side]
    rgba = np.stack([x // 16 % 256, y // 16 % 256, (x + y) // 32 % 256, x // 64 % 256], -1)
    bgra = rgba.astype(np.uint8)[..., [2, 1, 0, 3]]
    files = {
        "rgba.png": cv2.imencode(".png", bgra)[1],
        "rgba16.png": cv2.imencode(".png", bgra.astype(np.uint16) * 257)[1],
        "big.jpg": cv2.imencode(".jpg", bgra[..., :3], [cv2.IMWRITE_JPEG_QUALITY, 50])[1],
        "big.webp": cv2.imencode(".webp", bgra[..., :3], [cv2.IMWRITE_WEBP_QUALITY, 10])[1],
    }
    return {name: data.tobytes() for name, data in files.items()}


def _silent(*args: object) -> None:
    pass


def _peak_rss_mb(cmd: list[str]) -> float:
    """Run ``cmd``; the largest peak RSS (MB) of any one process it started, itself included
    (``RUSAGE_CHILDREN`` of a fresh parent: the maximum over its waited-for descendants)."""
    script = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(done.stderr[-3000:])\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True)
    code, peak = done.stdout.split()
    assert code == "0", done.stderr
    return float(peak)


#: README's bound on one download process's memory, above its footprint on ordinary images:
#: the bytes in flight (2 x thread_count x max_bytes) and RSS_PER_MAX_PIXEL bytes per pixel of
#: max_pixels (decodes share a budget of max_pixels pixels per process: one image at the limit
#: at a time, its decode, grey copy or composite, and what the resizer makes of it).
RSS_PER_MAX_PIXEL = 20


def test_a_download_process_stays_within_the_stated_memory_bound_on_a_hostile_part(
    tmp_path: Path,
):
    """16 threads on a part of images at the pixel limit (8- and 16-bit RGBA PNGs, JPEGs,
    WebPs), crafted TIFFs and bombs: the peak RSS of the largest download process stays
    within README's bound above the same program's peak on ordinary photos."""
    side, threads, max_bytes = 4000, 16, 4 * 1024 * 1024
    max_pixels = side * side
    images = tmp_path / "images"
    images.mkdir()
    demo.write_images(images)
    for name, data in _large_images(images, side).items():
        (images / name).write_bytes(data)
    (images / "crafted.tif").write_bytes(crafted_tiff())
    (images / "bomb.png").write_bytes(_png(Image.new("1", (side + 1, side))))
    hostile = ["rgba.png", "rgba16.png", "big.jpg", "big.webp"] * 10 + ["crafted.tif"] * 4
    hostile += ["bomb.png"] * 4

    import functools

    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": _silent})
    server, base = _serve(WEB_HOST, functools.partial(quiet, directory=images))
    try:
        peaks, statuses = {}, {}
        for run, names in (("ordinary", ["astronaut.jpg"] * len(hostile)), ("hostile", hostile)):
            rows = [(f"{base}/{name}?{i}", None, "", "") for i, name in enumerate(names)]
            out = tmp_path / run
            cmd = download_cmd(
                _part(tmp_path, rows), out, "--thread-count", str(threads),
                "--number-sample-per-shard", str(len(rows)), "--max-pixels", str(max_pixels),
                "--max-bytes", str(max_bytes), "--allow-networks", f"{WEB_HOST}/32",
            )  # fmt: skip
            peaks[run] = _peak_rss_mb(cmd)
            statuses[run] = _rows(out)
    finally:
        server.shutdown()
        server.server_close()
    got = statuses["hostile"].with_columns(pl.col("url").str.extract(r"/([\w.]+)\?").alias("file"))
    outcome = dict(got.group_by("file", "status").len().select("file", "status").iter_rows())
    assert outcome == {
        "rgba.png": "success", "rgba16.png": "success", "big.jpg": "success",
        "big.webp": "success", "crafted.tif": "not_an_image", "bomb.png": "decompression_bomb",
    }  # fmt: skip
    bound_mb = (2 * threads * max_bytes + RSS_PER_MAX_PIXEL * max_pixels) / 2**20
    above = peaks["hostile"] - peaks["ordinary"]
    print(
        f"peak RSS: ordinary {peaks['ordinary']:.0f} MB, hostile {peaks['hostile']:.0f} MB: "
        f"{above:.0f} MB above, bound {bound_mb:.0f} MB"
    )
    assert above <= bound_mb
