"""What came back from one URL, before anything decodes it in full: decompression bombs are
refused from the header, and the image's pHash is compared with the crawl's ``image_phash``
(content drift). Imports no ``dagster``."""

from __future__ import annotations

import contextlib
import functools
import io
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from coyo_platform.download.statuses import DECOMPRESSION_BOMB, NOT_AN_IMAGE, SUCCESS


@dataclass
class Fetched:
    """One row after fetching and inspecting: image bytes, or the status that stopped it."""

    key: int
    data: bytes | None = None
    status: str = SUCCESS
    message: str | None = None
    phash: str | None = None
    distance: int | None = None
    transient: bool = False  # a failure another try may not meet (timeout, 5xx, reset, DNS)
    size: tuple[int, int] | None = None  # (width, height) as Pillow reads the header


#: The formats a web image of COYO's may be in; anything else (TIFF, ICO, PSD, PCX, ...) is
#: refused before any decode: every extra parser is another way for two decoders to disagree
#: about a file (a TIFF Pillow reads as 256 x 256 and libtiff, under OpenCV, as 32768 x 32768).
FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP"})


class PixelBudget:
    """Pixels being decoded at once in a process, at most ``limit``: a fetch thread waits until
    its image fits (one image larger than the whole budget runs alone). Ordinary photos (a few
    hundred thousand pixels) never wait; images near ``max_pixels`` decode one or two at a
    time, whatever the thread count, so the decodes' memory is bounded by the limit, not by
    ``thread_count``."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def take(self, pixels: int) -> Iterator[None]:
        with self._changed:
            while self.used and self.used + pixels > self.limit:
                self._changed.wait()
            self.used += pixels
        try:
            yield
        finally:
            with self._changed:
                self.used -= pixels
                self._changed.notify_all()


_DECODES: dict[int, PixelBudget] = {}
_BUDGET_LOCK = threading.Lock()


def decode_budget(max_pixels: int) -> PixelBudget:
    """This process's budget for full decodes (the pHash's here, the composite and resize of
    ``shard.py``): ``max_pixels`` pixels, so one image at the limit at a time."""
    with _BUDGET_LOCK:
        return _DECODES.setdefault(max_pixels, PixelBudget(max_pixels))


@functools.cache
def _quiet_pil() -> None:
    """PIL warns above its pixel limit; ``max_pixels`` decides here (once per process: warning
    filters are process-wide and not thread-safe to change per call)."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def hamming(a: str | None, b: str | None) -> int | None:
    """Bits that differ between two 16-hex-digit pHashes; None if either is missing or malformed."""
    import imagehash

    if not (isinstance(a, str) and isinstance(b, str) and len(a) == 16 == len(b)):
        return None
    try:
        return int(imagehash.hex_to_hash(a) - imagehash.hex_to_hash(b))
    except ValueError:  # not hex
        return None


def inspect(data: bytes, crawl_phash: str | None, max_pixels: int) -> Fetched:
    """Check the header (refuse bombs before decoding), then decode at reduced size for the pHash.

    JPEGs are decoded through PIL's draft mode (at most 8x smaller, never below 128 px): pHash
    looks at a 32 x 32 grayscale version, and on the demo photos the draft hash equals the full
    one while taking a quarter of the time.
    """
    import imagehash
    from PIL import Image

    _quiet_pil()
    out = Fetched(key=-1, data=data)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        return Fetched(-1, None, DECOMPRESSION_BOMB, f"decompression bomb: {exc}")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for non-images
        return Fetched(-1, None, NOT_AN_IMAGE, f"not an image: {type(exc).__name__}")
    with img:
        width, height = img.size
        out.size = (width, height)
        if img.format not in FORMATS:
            return Fetched(-1, None, NOT_AN_IMAGE, f"not an image: format {img.format} refused")
        if width * height > max_pixels:
            return Fetched(
                -1,
                None,
                DECOMPRESSION_BOMB,
                f"decompression bomb: {width} x {height} pixels, more than {max_pixels:,}",
            )
        try:
            img.draft("L", (128, 128))  # JPEGs: decoded at 1/8 of the size, or less
            with decode_budget(max_pixels).take(img.size[0] * img.size[1]):
                out.phash = str(imagehash.phash(img))
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
            return Fetched(-1, None, NOT_AN_IMAGE, f"not an image: {exc}"[:200])
    out.distance = hamming(out.phash, crawl_phash)
    return out
