"""What came back from one URL, before anything decodes it in full: decompression bombs are
refused from the header, and the image's pHash is compared with the crawl's ``image_phash``
(content drift). Imports no ``dagster``."""

from __future__ import annotations

import functools
import io
import threading
import warnings
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


#: Full decodes at once per process: a PNG or WebP (no draft mode) of up to ``max_pixels`` takes
#: about 3 bytes a pixel while hashed; the fetch threads wait here rather than exhaust memory.
_DECODES = threading.BoundedSemaphore(4)


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
            with _DECODES:
                img.draft("L", (128, 128))
                out.phash = str(imagehash.phash(img))
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data
            return Fetched(-1, None, NOT_AN_IMAGE, f"not an image: {exc}"[:200])
    out.distance = hamming(out.phash, crawl_phash)
    return out
