"""A fault-injecting HTTP reverse proxy on loopback, put in front of an S3 server (moto's).

Clients (s3fs, polars, boto3, a program's subprocess) are pointed at ``proxy.url``; the test
switches what the proxy does with the requests that follow:

* nothing (the default, and ``pass_through()``): every request is forwarded unchanged;
* ``throttle(n, ...)``: the next ``n`` matching requests are answered by the proxy itself with
  S3's throttling reply (HTTP 503, ``<Code>SlowDown</Code>``; or e.g. 429 ``ThrottlingException``)
  and never reach the server;
* ``cut_writes(n, ...)``: for the next ``n`` matching writes (PUT/POST) the proxy reads part of
  the body, then drops the connection without an answer, as a server stopped mid-upload does.
  Nothing is forwarded: the server never sees the write.

``n`` may be ``math.inf`` (a fault that persists). Faults are checked in the order they were
added; the first one that matches and has requests left takes the request. ``requests`` lists every
request seen (method, path, outcome ``passed``, ``throttled`` or ``cut``, headers) and ``count``
tallies them, so a test can assert that retries really happened, and whose they were: botocore
numbers its attempts in the ``amz-sdk-request`` header (``attempt=3; max=8``).
"""

from __future__ import annotations

import http.client
import math
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

#: Headers that describe one hop, not the message: never copied across the proxy.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}

THROTTLE_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>"
)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    outcome: str  # "passed", "throttled" or "cut"
    headers: dict[str, str]


@dataclass
class Fault:
    kind: str  # "throttle" or "cut"
    remaining: float
    methods: frozenset[str] | None = None  # None: any method
    path: str | None = None  # a substring of the request's path (with its query), or None
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    fraction: float = 0.5  # of the body read before a cut

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.methods is None or method in self.methods)
            and (self.path is None or self.path in path)
        )


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:PORT") as proxy:`` ... ``proxy.url``."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.requests: list[Seen] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- switching faults ----------------------------------------------------------------------

    def throttle(
        self,
        n: float = 1,
        *,
        methods: Iterable[str] | None = None,
        path: str | None = None,
        status: int = 503,
        code: str = "SlowDown",
        message: str = "Please reduce your request rate.",
    ) -> None:
        """Answer the next ``n`` matching requests with S3's throttling error."""
        self._add(Fault("throttle", n, _methods(methods), path, status, code, message))

    def cut_writes(
        self,
        n: float = 1,
        *,
        methods: Iterable[str] | None = ("PUT", "POST"),
        path: str | None = None,
        fraction: float = 0.5,
    ) -> None:
        """Drop the connection of the next ``n`` matching writes after ``fraction`` of the body."""
        self._add(Fault("cut", n, _methods(methods), path, fraction=fraction))

    def pass_through(self) -> None:
        """Forget every pending fault: forward everything from now on."""
        with self._lock:
            self._faults.clear()

    def count(self, method: str | None = None, outcome: str | None = None) -> int:
        """Requests seen so far, of ``method`` and/or with ``outcome`` (None: any)."""
        return len(self.matching(method, outcome))

    def matching(self, method: str | None = None, outcome: str | None = None) -> list[Seen]:
        """The requests seen so far, of ``method`` and/or with ``outcome`` (None: any), in order."""
        with self._lock:
            return [
                r
                for r in self.requests
                if method in (None, r.method) and outcome in (None, r.outcome)
            ]

    # -- used by the handler -------------------------------------------------------------------

    def _add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take(self, method: str, path: str) -> Fault | None:
        """The fault for this request, if any, with one request used up."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
        return None

    def _record(self, handler: BaseHTTPRequestHandler, outcome: str) -> None:
        seen = Seen(
            handler.command,
            handler.path,
            outcome,
            {k.lower(): v for k, v in handler.headers.items()},
        )
        with self._lock:
            self.requests.append(seen)


def _methods(methods: Iterable[str] | None) -> frozenset[str] | None:
    return None if methods is None else frozenset(m.upper() for m in methods)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _any(self) -> None:
        fault = self.owner._take(self.command, self.path)
        length = int(self.headers.get("Content-Length") or 0)
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if fault is not None and fault.kind == "cut":
            self._cut(length, fault.fraction)
            return
        body = self._read_chunked() if chunked else self.rfile.read(length)
        if fault is not None:
            self._throttle(fault)
        else:
            self._forward(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

    def _cut(self, length: int, fraction: float) -> None:
        """Read part of the body, then vanish: a reset, no status line, nothing forwarded."""
        if length:
            self.rfile.read(max(0, min(length - 1, math.floor(length * fraction))))
        self.owner._record(self, "cut")
        self.close_connection = True
        sock = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)

    def _throttle(self, fault: Fault) -> None:
        body = THROTTLE_BODY.format(code=fault.code, message=fault.message).encode()
        self.owner._record(self, "throttled")
        self.send_response_only(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes) -> None:
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():  # Host too: the request is signed with it
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.owner._record(self, "passed")
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            out += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers, up to the blank line
            pass
        return bytes(out)
