"""Decoding to the size that is needed: JPEG draft mode, PNG box reduction, and the one pixel limit."""

import io

import numpy as np
import pytest
from PIL import Image

from resmemnet.data.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, default_max_pixels, load_image


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _gradient(size: tuple[int, int]) -> Image.Image:
    grey = Image.linear_gradient("L").resize(size)
    return Image.merge("RGB", [grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grey])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_large_images_are_decoded_small_but_never_below_the_needed_size(fmt):
    data = _encoded(_gradient((3000, 2000)), fmt)
    image = load_image(data, min_size=(224, 224))
    assert image.mode == "RGB" and min(image.size) >= 224 and max(image.size) < 3000 / 4
    assert image.size[0] / image.size[1] == pytest.approx(1.5, rel=0.02)  # aspect ratio kept
    assert load_image(data).size == (3000, 2000)  # without min_size, the full image


def test_a_reduced_image_looks_like_the_resized_full_image():
    data = _encoded(_gradient((2400, 1600)), "PNG")
    reduced = np.asarray(load_image(data, min_size=(100, 100)).resize((150, 100)), dtype=float)
    full = np.asarray(load_image(data).resize((150, 100), Image.Resampling.BOX), dtype=float)
    assert np.abs(reduced - full).mean() < 2.0  # grey levels out of 255


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_rotation_still_applies_after_reduction(fmt):
    image = Image.new("RGB", (3000, 1000), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    loaded = load_image(_encoded(image, fmt, exif=exif.tobytes()), min_size=(224, 224))
    assert loaded.size[1] > loaded.size[0] and min(loaded.size) >= 224


@pytest.mark.parametrize("mode", ["P", "1", "I;16", "LA", "RGBA"])
def test_every_mode_is_reduced_to_rgb(mode):
    image = Image.new(mode, (1200, 900))
    data = _encoded(image, "PNG")
    loaded = load_image(data, min_size=(224, 224))
    assert loaded.mode == "RGB" and 224 <= min(loaded.size) < 900


def test_one_pixel_limit_with_an_environment_override(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert default_max_pixels() == DEFAULT_MAX_PIXELS == 40_000_000
    data = _encoded(Image.new("L", (200, 100)), "PNG")
    monkeypatch.setenv(MAX_PIXELS_ENV, "10000")
    with pytest.raises(ValueError, match="over the limit of 10,000"):
        load_image(data)
    monkeypatch.setenv(MAX_PIXELS_ENV, "-5")
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV}='-5' is not a positive whole number"):
        load_image(data)
