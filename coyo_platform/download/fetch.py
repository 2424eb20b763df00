"""Fetch one image URL from the hostile web: never a private address, never for too long, never
too many bytes.

img2dataset fetches with a bare ``urllib.request.urlopen``, which follows any URL anywhere: a URL
to 169.254.169.254 reaches a cloud machine's instance-metadata service, ``file:///etc/passwd``
reads a local file, and a server that trickles one byte every few seconds holds a thread forever.
This module is the download program's only way out to the web:

- **Addresses.** The host name is resolved here, every address it resolves to is checked, and the
  connection is opened to the checked address itself (so a DNS answer that changes between check
  and connect changes nothing). Loopback, private, link-local (the metadata service), multicast,
  reserved, unspecified and other non-global addresses are refused, in IPv4-mapped, 6to4 and
  Teredo (server and client) IPv6 addresses as well as outside them,
  unless an ``allow`` network names them (tests, private mirrors). Every redirect hop is a new
  request through the same check. Only ``http`` and ``https``: no ``file:``, ``ftp:``, ``data:``.
  Proxy variables are ignored (a proxy would connect on our behalf, past the check).
- **Time.** ``timeout`` bounds each socket operation (connect, each read); ``max_seconds`` bounds
  the whole fetch, redirects and a trickling body included.
- **Size.** A ``Content-Length`` above ``max_bytes`` is refused before the body is read; a body
  that grows past it is cut there.

A failed fetch raises :class:`FetchError` with a ``status`` (``download/statuses.py``) and a
message. Imports no ``dagster``.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from coyo_platform.download.statuses import BLOCKED, FAILED, NOT_AN_IMAGE, TIMEOUT, TOO_LARGE

# img2dataset imports albumentations, whose import-time update check goes online
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
MAX_REDIRECTS = 5
MAX_ADDRESSES = 4  # of a DNS answer, tried in turn; the rest are checked but not tried

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(Exception):
    """A URL that gave no image bytes; ``status`` says which kind of failure, ``transient``
    whether another try may do better (a timeout, a 503, a reset; not a 404 or a blocked URL)."""

    def __init__(self, status: str, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.transient = transient


#: What a browser leaves as it is in a path or a query (RFC 3986's reserved and unreserved
#: characters, and ``%`` for escapes already there); anything else is percent-encoded as UTF-8.
_URL_SAFE = "/:@!$&'()*+,;=-._~%?#[]"


def browser_url(url: str) -> str:
    """``url`` as a browser sends it: a non-ASCII host IDNA-encoded (UTS 46, the ``idna``
    package: ``bücher.example`` -> ``xn--bcher-kva.example``), non-ASCII (and space) in the path
    and query percent-encoded as UTF-8. ASCII URLs come back unchanged. ``FetchError`` (failed,
    ``bad url``) for a host IDNA refuses."""
    if url.isascii() and " " not in url:
        return url
    import idna

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise FetchError(FAILED, f"bad url: host {host!r}: {exc}") from None
    netloc = host if ":" not in host else f"[{host}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    if parts.username is not None:
        user = urllib.parse.quote(parts.username, safe="%")
        password = f":{urllib.parse.quote(parts.password, safe='%')}" if parts.password else ""
        netloc = f"{user}{password}@{netloc}"
    path = urllib.parse.quote(parts.path, safe=_URL_SAFE)
    query = urllib.parse.quote(parts.query, safe=_URL_SAFE)
    fragment = urllib.parse.quote(parts.fragment, safe=_URL_SAFE)
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, fragment))


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """``["127.0.0.1/32", "10.1.0.0/16"]`` -> networks; a bad entry raises ValueError naming it."""
    networks = []
    for value in values:
        value = value.strip()
        if not value:
            continue
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise ValueError(
                f"allow_networks: {value!r} is not an IP network (e.g. 10.0.0.0/8 or 127.0.0.1)"
            ) from exc
    return tuple(networks)


def why_blocked(address: Address) -> str | None:
    """Why ``address`` is no place for a download to go, or None for a global unicast address.
    An IPv6 address that carries IPv4 ones (mapped, 6to4, Teredo's server and client) is checked
    as each of them and as itself."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        for inner in (a for a in embedded if a is not None):
            reason = why_blocked(inner)
            if reason:
                return f"{reason} (inside {address})"
        if address.ipv4_mapped is not None:
            return None  # ::ffff:a.b.c.d is a.b.c.d, checked above
    kinds = ("loopback", "link_local", "site_local", "unspecified", "multicast", "reserved")
    for kind in (*kinds, "private"):
        if getattr(address, f"is_{kind}", False):
            article = "an" if kind == "unspecified" else "a"
            return f"{address} is {article} {kind.replace('_', '-')} address"
    if not address.is_global:
        return f"{address} is a non-global address"
    return None


@dataclass(frozen=True)
class Guard:
    """Where a fetch may connect: global addresses, plus the ``allow`` networks."""

    allow: tuple[Network, ...] = ()

    def check(self, address: Address) -> None:
        if any(address in net for net in self.allow if net.version == address.version):
            return
        reason = why_blocked(address)
        if reason:
            raise FetchError(BLOCKED, f"blocked: {reason}")

    def connect(self, host: str, port: int, timeout: float, deadline: float) -> socket.socket:
        """Resolve ``host``, check every address, connect to a checked one (at most
        ``MAX_ADDRESSES`` tried, each within the per-read timeout and the fetch's deadline).

        The system resolver has no timeout of its own: a slow DNS answer can outlast the
        deadline (img2dataset's advice for a crawl is a local caching resolver)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            transient = exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None))
            raise FetchError(FAILED, f"dns: {host}: {exc.strerror}", transient) from None
        for *_, sockaddr in infos:  # one private answer blocks the name: no picking and choosing
            self.check(ipaddress.ip_address(sockaddr[0].split("%")[0]))
        error: OSError = TimeoutError("no connection before the time limit")
        for family, kind, proto, _, sockaddr in infos[:MAX_ADDRESSES]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(min(timeout, left))  # also bounds the TLS handshake after
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error


class _DeadlineReader(io.RawIOBase):
    """The response's socket stream, each wait bounded by the per-read timeout and the fetch's
    deadline (a server trickling headers or body byte by byte is cut at the deadline)."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, timeout: float, deadline: float):
        self._raw, self._sock, self._timeout, self._deadline = raw, sock, timeout, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:  # noqa: ANN001 - io's signature
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("response still arriving at the time limit")
        self._sock.settimeout(min(self._timeout, left))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Response(http.client.HTTPResponse):
    """A response read against the deadline of this thread's fetch under way (read when the
    response is made, not when its connection was)."""

    def __init__(self, sock, *args, timeout: float, **kwargs) -> None:  # noqa: ANN001
        super().__init__(sock, *args, **kwargs)
        deadline = _THREAD.deadline
        # keep the socket stream (it holds the socket open after urllib drops the connection)
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, timeout, deadline))


#: This thread's fetch under way (``deadline``) and its openers, one per Fetcher (building
#: urllib's OpenerDirector per fetch cost about 0.3 ms of CPU, a third of a loopback fetch).
_THREAD = threading.local()


def _connection_class(base: type, guard: Guard, timeout: float):
    """http.client's connection class, with its socket from the guard and its response read
    against the deadline of this thread's fetch under way."""

    def connect(address, timeout, source_address=None):  # noqa: ANN001
        deadline = _THREAD.deadline
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no connection before the time limit")
        return guard.connect(address[0], address[1], timeout, deadline)

    def make(host: str, **kwargs):
        conn = base(host, **kwargs)
        conn._create_connection = connect  # an instance attribute in http.client, by design
        conn.response_class = functools.partial(_Response, timeout=timeout)
        return conn

    return make


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process (urllib would load the CA bundle per connection)."""
    return ssl.create_default_context()


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, make) -> None:  # noqa: ANN001
        super().__init__()
        self._make = make

    def http_open(self, req):  # noqa: ANN001
        return self.do_open(self._make, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, make, context: ssl.SSLContext) -> None:  # noqa: ANN001
        super().__init__(context=context)
        self._make = make

    def https_open(self, req):  # noqa: ANN001
        return self.do_open(self._make, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirects (at most ``MAX_REDIRECTS``); each hop is a new, guarded request. A
    redirect to another scheme (``file:``, ``ftp:``) is refused as blocked."""

    max_redirections = MAX_REDIRECTS

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001
        location = headers.get("location") or headers.get("uri") or ""
        target = browser_url(urllib.parse.urljoin(req.full_url, location))
        fp.close()  # urllib would read the redirect's whole body, unbounded: never read it
        if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
            raise FetchError(BLOCKED, f"blocked: redirect to a non-http(s) URL ({target[:80]})")
        return super().http_error_302(req, io.BytesIO(), code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


@dataclass(frozen=True)
class Fetcher:
    """Fetch image bytes within the limits; see the module docstring."""

    guard: Guard = Guard()
    timeout: float = 10.0
    max_seconds: float = 30.0
    max_bytes: int = 20 * 1024 * 1024
    disallowed_directives: frozenset[str] = frozenset(
        {"noai", "noimageai", "noindex", "noimageindex"}
    )

    def _opener(self) -> urllib.request.OpenerDirector:
        """This thread's opener for this fetcher (an opener holds no state between requests:
        each request's redirects travel on the request itself)."""
        openers = getattr(_THREAD, "openers", None)
        if openers is None:
            openers = _THREAD.openers = {}
        opener = openers.get(self)
        if opener is None:
            opener = openers[self] = self._new_opener()
        return opener

    def _new_opener(self) -> urllib.request.OpenerDirector:
        opener = urllib.request.OpenerDirector()  # no file:, ftp:, data: or proxy handlers
        limits = (self.guard, self.timeout)
        for handler in (
            _HTTPHandler(_connection_class(http.client.HTTPConnection, *limits)),
            _HTTPSHandler(_connection_class(http.client.HTTPSConnection, *limits), _tls_context()),
            _RedirectHandler(),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
            urllib.request.UnknownHandler(),
        ):
            opener.add_handler(handler)
        return opener

    def fetch(self, url: str) -> bytes:
        """The body of ``url``, or FetchError."""
        _THREAD.deadline = time.monotonic() + self.max_seconds
        try:
            try:
                scheme = urllib.parse.urlsplit(url).scheme.lower() if isinstance(url, str) else ""
            except ValueError as exc:  # "http://[::1", a host NFKC-normalizing to a new one
                raise FetchError(FAILED, f"bad url: {exc}") from None
            if scheme not in ("http", "https"):
                if scheme:  # file:, ftp:, gopher:, data: ... reach what a web URL must not
                    raise FetchError(BLOCKED, f"blocked: not an http(s) URL ({scheme}:)")
                raise FetchError(FAILED, f"bad url: {str(url)[:80]!r}")
            try:
                url = browser_url(url)  # the guard then resolves the encoded host
                request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
                urllib.parse.urlsplit(url).port  # noqa: B018 - raises on a bad port
            except ValueError as exc:
                raise FetchError(FAILED, f"bad url: {exc}") from None
            with self._opener().open(request, timeout=self.timeout) as response:
                return self._read(response)
        except FetchError:
            raise
        except urllib.error.HTTPError as exc:
            transient = exc.code >= 500 or exc.code in (408, 429)
            raise FetchError(FAILED, f"HTTP Error {exc.code}: {exc.reason}", transient) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise FetchError(TIMEOUT, f"timeout: {reason}", True) from None
            transient = isinstance(reason, ConnectionError)  # refused, reset; not TLS, not a URL
            raise FetchError(FAILED, str(reason), transient) from None
        except TimeoutError as exc:
            raise FetchError(TIMEOUT, f"timeout: {exc}", True) from None
        except (ConnectionError, http.client.IncompleteRead, http.client.RemoteDisconnected) as exc:
            raise FetchError(FAILED, f"{type(exc).__name__}: {exc}", True) from None
        except Exception as exc:  # noqa: BLE001 - a malformed URL or reply is this row's failure
            raise FetchError(FAILED, f"{type(exc).__name__}: {str(exc)[:160]}") from None

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        from img2dataset.downloader import is_disallowed  # img2dataset's X-Robots-Tag rule

        if self.disallowed_directives and is_disallowed(
            response.headers, None, self.disallowed_directives
        ):
            raise FetchError(FAILED, "Use of image disallowed by X-Robots-Tag directive")
        kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind.startswith("text/"):
            raise FetchError(NOT_AN_IMAGE, f"not an image: content type {kind}")
        if response.length is not None and response.length > self.max_bytes:
            raise FetchError(TOO_LARGE, f"too large: {response.length:,} bytes announced")
        body = bytearray()
        while True:
            chunk = response.read1(1 << 16)
            if not chunk:
                if response.length:  # the connection ended before the announced length
                    missing = f"{response.length:,} of {len(body) + response.length:,} bytes"
                    raise FetchError(FAILED, f"incomplete body: {missing} missing", True)
                return bytes(body)
            body += chunk
            if len(body) > self.max_bytes:
                raise FetchError(TOO_LARGE, f"too large: more than {self.max_bytes:,} bytes")
