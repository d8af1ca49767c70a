"""Opening an image the way a viewer shows it: EXIF orientation applied, 16-bit and grayscale images scaled to
8-bit RGB, transparency shown on white. The trainers and the evaluation read images only through here, so a
phone photo is trained on and scored the same way up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError

HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
IMAGE_EXTENSIONS = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}


def image_files(folder: Path) -> list[Path]:
    """Image files in a folder, by name; hidden files (including our own temporary files) are skipped."""
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def open_image(source: Path | Image.Image, name: str) -> Image.Image:
    """An RGB image with its EXIF orientation applied; anything unreadable is an `InputError` naming it."""
    try:
        if isinstance(source, Image.Image):
            image = ImageOps.exif_transpose(source)
        else:
            with Image.open(source) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"{name} is not a readable image: {error}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in HIGH_BIT_DEPTH_MODES:
        # Pillow's own conversion clips 16-bit values to 255 (a white image); scale them down instead.
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in TRANSPARENT_MODES:
        # Transparent pixels carry arbitrary colours; show them on white as most viewers do.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")
