"""Decoding images as they come from real folders and uploads, with a clear error per bad file.

Handles EXIF orientation, greyscale, CMYK, palette and alpha images (composited on white, as a
viewer shows them) and 16-bit images. Huge images are refused before decoding (decompression-bomb
guard), and JPEGs are decoded at a reduced scale when only a small size is needed, which bounds
memory whatever the file's resolution.
"""

from __future__ import annotations

import io
import warnings
from os import PathLike
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageLoadError", "load_image"]

DEFAULT_MAX_PIXELS = 100_000_000  # 10,000 x 10,000: far beyond any photo, far below a bomb
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


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: tuple[int, int] | None = None) -> Image.Image:
    """Open any supported image as 8-bit RGB, or raise ImageLoadError naming the file.

    `min_size` (height, width) lets JPEG decoding skip detail that a later resize would discard.
    """
    name = _name(source)
    if isinstance(source, (str, PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(name, "file not found")
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
                img.draft("RGB", (min_size[1], min_size[0]))
            img.load()
    except ImageLoadError:
        raise
    except PermissionError as exc:
        raise ImageLoadError(name, f"permission denied ({exc.strerror})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(name, "not an image, or an unsupported format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(name, f"refused by the decompression-bomb guard ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(name, f"truncated or corrupt image data ({exc})") from exc
    return _to_rgb(ImageOps.exif_transpose(img))


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
