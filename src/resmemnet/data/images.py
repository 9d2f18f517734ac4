"""Decoding images as they come from real folders and uploads, with a clear error per bad file.

Handles EXIF orientation, greyscale, CMYK, palette and alpha images (composited on white, as a
viewer shows them) and 16-bit images. Huge images are refused before decoding (decompression-bomb
guard). When only a small size is needed, JPEGs are decoded at a reduced scale (draft mode) and
other formats are box-reduced right after decoding, before any conversion or copy, so memory stays
bounded by one decoded copy of the file whatever its resolution.
"""

from __future__ import annotations

import io
import os
import warnings
from os import PathLike
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "MAX_PIXELS_ENV", "ImageLoadError", "apply_max_pixels",
           "default_max_pixels", "load_image"]

# The decompression-bomb guard shared by the CLI, the library and the server: 40 MP is a 7,700 x 5,200
# photo, above any phone or DSLR camera's output, and decodes to 120 MB of RGB.
DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_ENV = "RESMEMNET_MAX_PIXELS"  # overrides DEFAULT_MAX_PIXELS (`resmemnet serve --max-pixels` overrides both)
# Modes whose pixel values can be box-averaged; the rest (palette, 1-bit, 16-bit) are converted first.
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F", "LAB", "HSV"})
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image

ImageSource = str | PathLike[str] | bytes | BinaryIO


class ImageLoadError(ValueError):
    """One image could not be used; the message names the file and the reason."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _name(source: ImageSource) -> str:
    if isinstance(source, (str, PathLike)):
        return str(source)
    return getattr(source, "name", "<bytes>") if not isinstance(source, bytes) else "<bytes>"


def default_max_pixels() -> int:
    """The pixel limit in force: $RESMEMNET_MAX_PIXELS when set, else DEFAULT_MAX_PIXELS."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r} is not a positive whole number of pixels; "
                         f"unset it or use e.g. {MAX_PIXELS_ENV}={DEFAULT_MAX_PIXELS}")
    return int(value)


def apply_max_pixels(limit: int | None = None) -> int:
    """Check `limit` (default: `default_max_pixels()`), make sure Pillow admits it, and return it.

    Pillow has a guard of its own (`Image.MAX_IMAGE_PIXELS`, refusing twice that at `Image.open`: 179 MP
    by default), which refused images this limit admits; it is raised to at least the limit, so the one
    limit decides (`load_image` refuses larger images from their header). Raised, never lowered: one
    process may hold several limits (servers, library calls), and each must be admitted. The CLI calls
    this once in the parent process, so a bad $RESMEMNET_MAX_PIXELS is one line there, never a
    DataLoader worker's traceback.
    """
    limit = default_max_pixels() if limit is None else limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"the pixel limit must be a positive whole number, got {limit!r}")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit
    return limit


def _missing_reason(path: Path) -> str:
    """Why a path that does not resolve to a file is missing: a broken link says so."""
    if not path.is_symlink():
        return "file not found"
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop as RuntimeError
        return "symbolic link loop"
    except OSError as exc:
        return "symbolic link loop" if exc.errno == 40 else f"dangling symbolic link (to {os.readlink(path)})"
    return "file not found"


def load_image(source: ImageSource, *, max_pixels: int | None = None,
               min_size: tuple[int, int] | None = None) -> Image.Image:
    """Open any supported image as 8-bit RGB, or raise ImageLoadError naming the file.

    `max_pixels` defaults to `default_max_pixels()`. `min_size` (height, width) lets decoding skip
    detail that a later resize would discard: the result is then smaller, but at least
    max(min_size) on both sides (either side may end up vertical after EXIF rotation).
    """
    max_pixels = apply_max_pixels(max_pixels)
    name = _name(source)
    if isinstance(source, (str, PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(name, _missing_reason(path))
        if not path.is_file():
            raise ImageLoadError(name, "not a regular file")
        if path.stat().st_size == 0:
            raise ImageLoadError(name, "empty file (0 bytes)")
    elif isinstance(source, bytes):
        if not source:
            raise ImageLoadError(name, "empty file (0 bytes)")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides instead
            img = Image.open(source)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageLoadError(name, f"image is {width}x{height} = {width * height:,} pixels, over the limit "
                                           f"of {max_pixels:,} (decompression-bomb guard)")
            if min_size is not None and img.format == "JPEG":
                img.draft("RGB", (max(min_size), max(min_size)))
            img.load()
            if min_size is not None:
                img = _reduce(img, max(min_size))
    except ImageLoadError:
        raise
    except PermissionError as exc:
        raise ImageLoadError(name, f"permission denied ({exc.strerror})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(name, "not an image, or an unsupported format") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own check at Image.open, set to at least the limit
        raise ImageLoadError(name, f"image is over the limit of {max_pixels:,} pixels (decompression-bomb "
                                   "guard)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(name, f"truncated or corrupt image data ({exc})") from exc
    return _to_rgb(ImageOps.exif_transpose(img))


def _reduce(img: Image.Image, side: int) -> Image.Image:
    """Box-average by the largest whole factor that keeps both sides >= side.

    Runs right after decoding, so the EXIF rotation and the RGB conversion (each a full copy) act on
    the small image; PNGs cannot be decoded at a reduced scale as JPEGs can.
    """
    factor = min(img.size) // side
    if factor < 2:
        return img
    if img.mode not in _REDUCIBLE_MODES:  # averaging palette indices or 1-bit values would be meaningless
        img = _to_rgb(img)
    return img.reduce(factor)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float32)
        # 16-bit data scaled to 8 bits; 'I' images that already fit in 8 bits are left as they are.
        scale = 257.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        grey = np.clip(values / scale, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
