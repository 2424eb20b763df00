"""A small PNG chart of label stats (top-1 histogram, top classes), drawn with Pillow, which the
label stage already needs; no plotting library. Imports no ``dagster``."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT, PAD = 760, 300, 40
BAR, TEXT, AXIS = (66, 133, 244), (32, 33, 36), (154, 160, 166)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def stats_chart(histogram: Sequence[int], top: Sequence[tuple[str, int]]) -> bytes:
    """PNG: left, images per top-1 probability bin (0 to 1); right, the top classes by images."""
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw, font = ImageDraw.Draw(img), _font()
    half = WIDTH // 2

    # histogram
    draw.text((PAD, 8), "images by top-1 probability", fill=TEXT, font=font)
    left, right, bottom, top_y = PAD, half - 20, HEIGHT - PAD, PAD
    draw.line([(left, bottom), (right, bottom)], fill=AXIS)
    peak = max(histogram, default=0) or 1
    step = (right - left) / max(len(histogram), 1)
    for i, count in enumerate(histogram):
        h = (bottom - top_y) * count / peak
        draw.rectangle(
            [left + i * step + 1, bottom - h, left + (i + 1) * step - 1, bottom], fill=BAR
        )
    for tick in (0.0, 0.5, 1.0):
        x = left + tick * (right - left)
        draw.text((x - 8, bottom + 6), f"{tick:.1f}", fill=TEXT, font=font)
    draw.text((left, bottom + 20), f"peak bin: {peak:,} images", fill=AXIS, font=font)

    # top classes
    draw.text((half + 10, 8), "top-1 classes", fill=TEXT, font=font)
    rows = list(top)[:10]
    most = max((n for _, n in rows), default=0) or 1
    label_w, y0, row_h = 150, PAD, (HEIGHT - 2 * PAD) / max(len(rows), 1)
    for i, (name, count) in enumerate(rows):
        y = y0 + i * row_h
        draw.text((half + 10, y + 2), name[:24], fill=TEXT, font=font)
        w = (WIDTH - PAD - (half + 10 + label_w)) * count / most
        x = half + 10 + label_w
        draw.rectangle([x, y + 2, x + w, y + row_h - 4], fill=BAR)
        draw.text((x + w + 4, y + 2), f"{count:,}", fill=TEXT, font=font)

    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()
