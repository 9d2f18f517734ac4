import io
import zlib

import numpy as np
import pytest
from PIL import Image

from resmemnet.data.images import ImageLoadError, load_image
from tests.conftest import make_photo, write_png


def _png_header_only(path, width, height):
    """A PNG whose header claims a huge size: the guard must refuse it before decoding."""
    return write_png(path, width, height, zlib.compress(b"\0" * 10))


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (30, 60)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "1", "I;16", "I"])
def test_every_common_mode_becomes_8bit_rgb(tmp_path, mode):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    base = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    elif mode == "I":
        img = Image.fromarray(arr[..., 0].astype(np.int32) * 257)
    else:
        img = base.convert(mode)
    suffix = ".tif" if mode in ("CMYK", "I") else ".png"
    img.save(tmp_path / f"x{suffix}")
    out = load_image(tmp_path / f"x{suffix}")
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode in ("I;16", "I"):  # 16-bit values are scaled down, not clipped to white
        assert np.array_equal(np.asarray(out)[..., 0], arr[..., 0])


def test_transparent_pixels_are_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png")).min() == 255


def test_large_jpeg_is_decoded_at_reduced_scale_when_allowed(tmp_path):
    make_photo(tmp_path / "big.jpg", size=(2000, 1600))
    # JPEG decodes at 1/2, 1/4 or 1/8 scale; 1/4 is the smallest that still covers 224x224
    assert load_image(tmp_path / "big.jpg", min_size=(224, 224)).size == (500, 400)
    assert load_image(tmp_path / "big.jpg").size == (2000, 1600)


@pytest.mark.parametrize("name, write, reason", [
    ("empty.jpg", lambda p: p.write_bytes(b""), "empty file"),
    ("text.jpg", lambda p: p.write_text("not an image at all"), "not an image"),
    ("garbage.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50), "not an image|corrupt"),
])
def test_bad_files_name_the_file_and_the_reason(tmp_path, name, write, reason):
    path = tmp_path / name
    write(path)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg_is_an_error_not_a_grey_image(tmp_path):
    data = make_photo(tmp_path / "ok.jpg", size=(300, 300)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg: truncated or corrupt"):
        load_image(tmp_path / "cut.jpg")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = _png_header_only(tmp_path / "bomb.png", 50_000, 50_000)
    with pytest.raises(ImageLoadError, match="decompression-bomb guard"):
        load_image(path)
    make_photo(tmp_path / "small.png", size=(100, 100))
    with pytest.raises(ImageLoadError, match="over the limit of 5,000"):
        load_image(tmp_path / "small.png", max_pixels=5_000)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


def test_bytes_and_file_objects_are_accepted(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (5, 7)).save(buf, format="PNG")
    assert load_image(buf.getvalue()).size == (5, 7)
    buf.seek(0)
    assert load_image(buf).size == (5, 7)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")


def test_broken_links_say_what_is_wrong(tmp_path):
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    with pytest.raises(ImageLoadError, match="dangling symbolic link"):
        load_image(tmp_path / "dangling.jpg")
    with pytest.raises(ImageLoadError, match="symbolic link loop"):
        load_image(tmp_path / "loop.jpg")
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "absent.jpg")
