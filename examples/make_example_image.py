#!/usr/bin/env python
"""Draw ``examples/concept.png``: a procedurally generated toy character.

The picture (a round, plush-like little robot with big eyes, antenna, arms and
feet, standing on a plain pastel background) is made only with Pillow and
numpy, so the repository ships no third-party photographs. The output is
deterministic: running the script again writes the same pixels.

Usage::

    python examples/make_example_image.py [OUT_PATH] [--size 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFAULT_OUT = Path(__file__).resolve().parent / "concept.png"

# Palette.
BG_TOP = (236, 242, 250)
BG_BOTTOM = (214, 224, 238)
SHADOW = (150, 160, 178)
BODY = (233, 120, 72)
BODY_DARK = (196, 88, 50)
BELLY = (252, 214, 150)
FACE = (255, 244, 226)
EYE_WHITE = (255, 255, 255)
PUPIL = (34, 40, 58)
IRIS = (64, 132, 196)
CHEEK = (244, 150, 150)
ANTENNA = (80, 88, 104)
BULB = (120, 200, 120)
OUTLINE = (70, 46, 40)

SUPERSAMPLE = 2  # draw at 2x and downsample, for smooth edges


def _background(size: int) -> Image.Image:
    """Plain vertical gradient (quantised so the PNG stays small)."""
    t = np.linspace(0.0, 1.0, size, dtype=np.float64)[:, None, None]
    top = np.array(BG_TOP, dtype=np.float64)[None, None, :]
    bottom = np.array(BG_BOTTOM, dtype=np.float64)[None, None, :]
    rows = np.round(top * (1.0 - t) + bottom * t).astype(np.uint8)
    return Image.fromarray(np.repeat(rows, size, axis=1), mode="RGB")


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill, outline=None, width=0):
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill, outline=outline, width=width)


def draw_concept(size: int = 512) -> Image.Image:
    """Return the concept picture as a ``size`` x ``size`` RGB image."""
    s = size * SUPERSAMPLE
    u = s / 512.0  # drawing units: coordinates below are given for a 512 px canvas

    def P(*xs: float) -> list[float]:
        return [x * u for x in xs]

    img = _background(s)

    # Soft ground shadow, blurred on its own layer.
    shadow = Image.new("L", (s, s), 0)
    ImageDraw.Draw(shadow).ellipse(P(150, 430, 362, 470), fill=150)
    shadow = shadow.filter(ImageFilter.GaussianBlur(10 * u))
    img.paste(Image.new("RGB", (s, s), SHADOW), (0, 0), shadow)

    d = ImageDraw.Draw(img)
    line = max(1, round(4 * u))

    # Feet.
    for x in (205, 307):
        _ellipse(d, x * u, 432 * u, 38 * u, 20 * u, BODY_DARK, OUTLINE, line)

    # Arms (behind the body), with round hands.
    d.line(P(170, 300, 112, 250), fill=OUTLINE, width=round(26 * u))
    d.line(P(170, 300, 112, 250), fill=BODY_DARK, width=round(18 * u))
    _ellipse(d, 108 * u, 244 * u, 20 * u, 20 * u, BODY, OUTLINE, line)
    d.line(P(342, 300, 398, 340), fill=OUTLINE, width=round(26 * u))
    d.line(P(342, 300, 398, 340), fill=BODY_DARK, width=round(18 * u))
    _ellipse(d, 402 * u, 344 * u, 20 * u, 20 * u, BODY, OUTLINE, line)

    # Body and belly patch with three buttons.
    d.rounded_rectangle(P(160, 250, 352, 432), radius=60 * u, fill=BODY, outline=OUTLINE, width=line)
    _ellipse(d, 256 * u, 350 * u, 62 * u, 58 * u, BELLY, OUTLINE, line)
    for y, colour in ((322, (226, 72, 72)), (350, (72, 150, 220)), (378, (90, 180, 90))):
        _ellipse(d, 256 * u, y * u, 9 * u, 9 * u, colour, OUTLINE, max(1, line // 2))

    # Antenna.
    d.line(P(256, 96, 256, 52), fill=ANTENNA, width=round(8 * u))
    _ellipse(d, 256 * u, 46 * u, 16 * u, 16 * u, BULB, OUTLINE, line)
    _ellipse(d, 251 * u, 41 * u, 5 * u, 5 * u, (220, 250, 220))

    # Ears.
    for x in (136, 376):
        d.rounded_rectangle(P(x - 18, 150, x + 18, 210), radius=14 * u, fill=BODY_DARK, outline=OUTLINE, width=line)

    # Head and face plate.
    d.rounded_rectangle(P(146, 92, 366, 262), radius=70 * u, fill=BODY, outline=OUTLINE, width=line)
    d.rounded_rectangle(P(172, 122, 340, 240), radius=52 * u, fill=FACE, outline=OUTLINE, width=line)

    # Eyes: white, iris, pupil, highlight.
    for x in (218, 294):
        _ellipse(d, x * u, 172 * u, 28 * u, 32 * u, EYE_WHITE, OUTLINE, line)
        _ellipse(d, (x + 3) * u, 178 * u, 18 * u, 20 * u, IRIS)
        _ellipse(d, (x + 4) * u, 180 * u, 10 * u, 11 * u, PUPIL)
        _ellipse(d, (x - 4) * u, 170 * u, 5 * u, 5 * u, EYE_WHITE)

    # Cheeks and a smile.
    for x in (190, 322):
        _ellipse(d, x * u, 212 * u, 13 * u, 8 * u, CHEEK)
    d.arc(P(232, 196, 280, 228), start=20, end=160, fill=OUTLINE, width=line)

    return img.resize((size, size), Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help=f"output PNG (default {DEFAULT_OUT})")
    parser.add_argument("--size", type=int, default=512, help="width and height in pixels (default 512)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_concept(args.size).save(out, format="PNG", optimize=True)
    print(f"{out} ({out.stat().st_size // 1024} KiB, {args.size}x{args.size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
