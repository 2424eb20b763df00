"""Every row of a downloaded shard's parquet ends with one ``status``; ``error_message`` says
more, and :func:`failure_reason` groups those messages into reasons a person can act on.
Imports no ``dagster``."""

from __future__ import annotations

import re

SUCCESS = "success"
BLOCKED = "blocked"  # the URL named a private/loopback/link-local/... address, or not http(s)
FAILED = "failed_to_download"  # HTTP error, DNS, refused, reset, TLS, X-Robots-Tag noai
TIMEOUT = "timeout"  # no complete answer within timeout (per read) or max_seconds (in all)
TOO_LARGE = "too_large"  # more than max_bytes
NOT_AN_IMAGE = "not_an_image"  # an HTML page, a truncated or undecodable file
DECOMPRESSION_BOMB = "decompression_bomb"  # more than max_pixels: refused from the header
DRIFTED = "drifted"  # drop_drifted: the image is not the one the crawl saw
FAILED_TO_RESIZE = "failed_to_resize"  # img2dataset's filters: too small, aspect ratio too large

STATUSES = (
    SUCCESS,
    BLOCKED,
    FAILED,
    TIMEOUT,
    TOO_LARGE,
    NOT_AN_IMAGE,
    DECOMPRESSION_BOMB,
    DRIFTED,
    FAILED_TO_RESIZE,
)

# img2dataset records the exception text; group those texts into reasons a person can act on.
_REASONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"HTTP Error (\d{3})"), r"http \1"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"Connection refused"), "connection refused"),
    (
        re.compile(r"Connection reset|Remote end closed|RemoteDisconnected", re.I),
        "connection reset",
    ),
    (re.compile(r"^dns:|Name or service not known|nodename nor servname|getaddrinfo", re.I), "dns"),
    (re.compile(r"CERTIFICATE|SSL", re.I), "tls"),
    (re.compile(r"Image decoding error"), "not an image"),
    (re.compile(r"X-Robots-Tag"), "disallowed by X-Robots-Tag"),
    (re.compile(r"unknown url type|no host given|^bad url", re.I), "bad url"),
]
_BLOCKED_KIND = re.compile(r"is an? ([\w-]+ address)|(not an http\(s\) URL)|(redirect to a non)")


def failure_reason(status: str, message: str | None) -> str:
    """A short, stable reason for a failed row, e.g. ``download: http 404``, ``blocked: link-local
    address``, ``timeout`` or ``resize: image too small``."""
    text = message or "unknown"
    if status == BLOCKED:
        hit = _BLOCKED_KIND.search(text)
        kind = (hit.group(1) or hit.group(2) or "redirect to a non-http(s) URL") if hit else "other"
        return f"blocked: {kind}"
    if status in (TIMEOUT, TOO_LARGE, NOT_AN_IMAGE, DECOMPRESSION_BOMB, DRIFTED):
        return status.replace("_", " ")
    stage = "download" if status == FAILED else "resize"
    for pattern, reason in _REASONS:
        hit = pattern.search(text)
        if hit:
            return f"{stage}: {hit.expand(reason)}"
    # unknown text: drop numbers and addresses so identical failures group together
    text = re.sub(r"0x[0-9a-f]+|\d+", "N", text.lower())
    return f"{stage}: {text[:80]}"
