"""Images: preprocessing parity with transformers' processors on real photos, RGB conversion, and bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import rosetta
from rosetta.modalities.image import load_image, preprocess
from rosetta.models.config import HALF, ImageConfig

transformers = pytest.importorskip("transformers")

# Real photos in every shape the resize and crop have to handle: square, landscape, portrait, odd sizes
# (where the centre crop's rounding shows), smaller than the model input (upscaling), and a thin strip.
PHOTOS = {
    "astronaut": lambda: skimage.data.astronaut(),  # 512x512
    "coffee": lambda: skimage.data.coffee(),  # 400x600 landscape
    "chelsea": lambda: skimage.data.chelsea(),  # 300x451
    "rocket": lambda: skimage.data.rocket(),  # 427x640
    "portrait": lambda: skimage.data.astronaut()[:, 100:341],  # 512x241
    "odd": lambda: skimage.data.coffee()[3:304, 7:458],  # 301x451
    "small": lambda: skimage.data.chelsea()[:27, :19],  # 27x19, upscaled
    "strip": lambda: skimage.data.rocket()[200:261],  # 61x640
}
SIZES = [224, 33]

# transformers' PIL processors resize with Pillow on 8-bit RGB exactly as Rosetta does: the only difference
# left is float32 rounding in rescale and normalise.
PIL_TOLERANCE = 1e-5
# The torchvision-backed CLIPImageProcessor resizes a uint8 tensor with torch's antialiased bicubic, which
# rounds differently from Pillow: pixels differ by up to 3 of 255 levels (0.045 after normalising by
# CLIP's std of ~0.26), and on average by under a quarter of a level (measured: max 0.045, mean 0.0027).
TORCHVISION_TOLERANCE = 4 / 255 / min(ImageConfig().std)
TORCHVISION_MEAN_TOLERANCE = 4e-3


@pytest.fixture(scope="module", params=list(PHOTOS))
def photo(request) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(PHOTOS[request.param]()))


def _hf_pixels(processor, image: Image.Image) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor(image, return_tensors="np")["pixel_values"][0]))


@pytest.mark.parametrize("size", SIZES)
def test_clip_preprocess_matches_transformers_pil(photo, size):
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    ours = preprocess(load_image(photo), size, ImageConfig())
    theirs = _hf_pixels(processor, photo)
    assert ours.shape == theirs.shape == (3, size, size)
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= PIL_TOLERANCE


@pytest.mark.parametrize("size", SIZES)
def test_siglip_preprocess_matches_transformers_pil(photo, size):
    processor = transformers.SiglipImageProcessorPil(size={"height": size, "width": size})
    ours = preprocess(load_image(photo), size, ImageConfig(resize="squash", mean=HALF, std=HALF))
    theirs = _hf_pixels(processor, photo)
    assert ours.shape == theirs.shape == (3, size, size)
    assert (ours - theirs).abs().max().item() <= PIL_TOLERANCE


@pytest.mark.parametrize("size", SIZES)
def test_clip_preprocess_close_to_torchvision_processor(photo, size):
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ours = preprocess(load_image(photo), size, ImageConfig())
    theirs = processor(photo, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()
    assert diff.max().item() <= TORCHVISION_TOLERANCE
    assert diff.mean().item() <= TORCHVISION_MEAN_TOLERANCE


def test_preprocess_is_deterministic_and_normalised():
    image = load_image(Image.fromarray(skimage.data.coffee()))
    a, b = preprocess(image, 64, ImageConfig()), preprocess(image, 64, ImageConfig())
    assert torch.equal(a, b)
    # White and black land where the normalisation puts them.
    white = preprocess(Image.new("RGB", (50, 40), (255, 255, 255)), 16, ImageConfig())
    expected = (1 - torch.tensor(ImageConfig().mean)) / torch.tensor(ImageConfig().std)
    assert torch.allclose(white, expected[:, None, None].expand(3, 16, 16), atol=1e-6)


# RGB conversion: every mode people's files come in ends as 8-bit RGB.


def _encode(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int16)


def test_rgba_transparency_composited_on_white():
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[:, :4, 3] = 0  # left half fully transparent
    rgba[:, 4:, 3] = 255  # right half opaque
    rgba[0, 4, 3] = 128  # one half-transparent pixel
    out = _rgb(load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (out[:, :4] == 255).all()  # transparent -> white, not black
    assert (out[1:, 4:] == [200, 0, 0]).all()
    assert np.abs(out[0, 4] - [228, 127, 127]).max() <= 1  # 50% red over white
    # transformers composites on white the same way.
    hf = transformers.image_transforms.convert_to_rgb(Image.fromarray(rgba, "RGBA"))
    assert np.array_equal(out, _rgb(hf))


def test_palette_with_transparency():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.paste(1, (4, 0, 8, 8))
    palette.info["transparency"] = 0  # colour 0 (blue) is transparent
    decoded = Image.open(io.BytesIO(_encode(palette, "PNG", transparency=0)))
    assert decoded.mode == "P" and "transparency" in decoded.info
    out = _rgb(load_image(decoded))
    assert (out[:, :4] == 255).all()
    assert (out[:, 4:] == [0, 255, 0]).all()


def test_la_grayscale_with_alpha():
    la = np.stack([np.full((4, 4), 60, np.uint8), np.zeros((4, 4), np.uint8)], axis=-1)
    la[:, 2:, 1] = 255
    out = _rgb(load_image(_encode(Image.fromarray(la, "LA"), "PNG")))
    assert (out[:, :2] == 255).all()
    assert (out[:, 2:] == 60).all()


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    data = _encode(cmyk, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.mode == "CMYK"
    out = _rgb(load_image(data))
    assert np.abs(out - [255, 0, 0]).max() <= 3


def test_16_bit_grayscale_png(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 16).astype(np.uint16).reshape(16, 32)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")
    out = _rgb(load_image(path))
    expected = np.rint(ramp / 257).astype(np.int16)
    assert np.abs(out[..., 0] - expected).max() <= 1
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out.min() == 0 and out.max() == 255  # full range kept, not clipped to white


def test_one_bit_image():
    bits = Image.new("1", (8, 4), 0)
    bits.paste(1, (0, 0, 4, 4))
    out = _rgb(load_image(_encode(bits, "PNG")))
    assert (out[:, :4] == 255).all() and (out[:, 4:] == 0).all()
    # The same pixels as a boolean array.
    assert np.array_equal(_rgb(load_image(np.asarray(bits))), out)


def test_exif_orientation_is_applied(tmp_path):
    # A wide image with a red top-left corner, stored sideways with orientation 6 ("rotate 90° clockwise").
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:20, :20] = [255, 0, 0]
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    out = _rgb(load_image(path))
    assert out.shape == (80, 40, 3)  # upright: taller than wide
    expected = np.rot90(pixels, k=-1).astype(np.int16)
    assert np.abs(out - expected).mean() < 4  # JPEG noise only
    assert out[5, 35, 0] > 200 and out[5, 5, 0] < 50  # the red corner went to the top right


# Arrays and bytes.


def test_numpy_inputs():
    hwc = skimage.data.chelsea()[:30, :40]
    reference = _rgb(load_image(Image.fromarray(hwc)))
    assert np.array_equal(_rgb(load_image(hwc)), reference)
    assert np.array_equal(_rgb(load_image(hwc.transpose(2, 0, 1).copy())), reference)  # CHW
    assert np.array_equal(_rgb(load_image(hwc.astype(np.float32) / 255)), reference)  # float in [0, 1]
    assert np.array_equal(_rgb(load_image(hwc.astype(np.float64) / 255)), reference)
    gray = hwc[..., 0]
    out = _rgb(load_image(gray))
    assert out.shape == (30, 40, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    assert np.array_equal(_rgb(load_image(gray[..., None])), out)  # HxWx1
    rgba = np.concatenate([hwc, np.full((30, 40, 1), 255, np.uint8)], axis=-1)
    assert np.array_equal(_rgb(load_image(rgba)), reference)


def test_bytes_and_path_inputs(tmp_path):
    photo = Image.fromarray(skimage.data.astronaut()[::8, ::8])
    data = _encode(photo, "PNG")
    path = tmp_path / "astronaut.png"
    path.write_bytes(data)
    expected = _rgb(photo)
    assert np.array_equal(_rgb(load_image(data)), expected)
    assert np.array_equal(_rgb(load_image(path)), expected)
    assert np.array_equal(_rgb(load_image(str(path))), expected)


# Bad input: each raises InputError naming the input.


def _assert_input_error(source, name: str, **kwargs) -> str:
    with pytest.raises(rosetta.InputError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert name in message
    return message


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((5, 5, 2), np.uint8),  # two channels
        np.zeros((2, 3, 4, 4), np.uint8),  # a batch
        np.zeros(5, np.uint8),  # a vector
        np.zeros((0, 0, 3), np.uint8),  # empty
        np.zeros((3, 0, 5), np.float32),  # empty, CHW
        np.full((4, 4), np.nan),  # not a number
    ],
    ids=["two-channels", "batch", "vector", "empty", "empty-chw", "nan"],
)
def test_bad_arrays(bad):
    _assert_input_error(bad, f"<array {bad.shape}>")


def test_truncated_jpeg(tmp_path):
    data = _encode(Image.fromarray(skimage.data.coffee()), "JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    _assert_input_error(path, str(path))
    _assert_input_error(data[: len(data) // 2], f"<{len(data) // 2} bytes>")


def test_random_bytes_and_text_file(tmp_path):
    noise = np.random.default_rng(0).bytes(4096)
    _assert_input_error(noise, "<4096 bytes>")
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    assert "not an image" in _assert_input_error(path, str(path))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _assert_input_error(empty, str(empty))


def test_missing_path_and_directory(tmp_path):
    missing = tmp_path / "nowhere.jpg"
    assert "no such file" in _assert_input_error(missing, str(missing))
    assert "directory" in _assert_input_error(tmp_path, str(tmp_path))


def test_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 80)).save(path)
    assert "exceeds" in _assert_input_error(path, str(path), max_pixels=100 * 80 - 1)
    assert load_image(path, max_pixels=100 * 80).size == (100, 80)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels but carries (almost) no data: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# 10k x 10k is over Rosetta's limit (64M pixels) but under the one where Pillow refuses by itself (2 x 89M);
# 100k x 100k is over both.
@pytest.mark.parametrize("side", [10_000, 100_000])
def test_decompression_bomb_header(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(side, side))
    message = _assert_input_error(path, str(path))
    assert "decompression bomb" in message
    assert ("exceeds the limit" in message) == (side * side <= 2 * Image.MAX_IMAGE_PIXELS)
    data = path.read_bytes()
    _assert_input_error(data, f"<{len(data)} bytes>")


def test_unsupported_type():
    with pytest.raises(rosetta.InputError, match="int"):
        load_image(42)  # type: ignore[arg-type]
