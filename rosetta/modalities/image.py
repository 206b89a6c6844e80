"""Images: load from anything a user holds, turn into RGB, preprocess into normalised pixels.

Resizing uses Pillow's bicubic filter on 8-bit RGB, as the CLIP and SigLIP checkpoints were
trained with (and as transformers' PIL image processors and open_clip do), so pixels match them.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from rosetta.errors import InputError
from rosetta.models.config import ImageConfig

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray

# Images above this many pixels are refused before decoding (decompression bombs).
MAX_PIXELS = 64 * 1024 * 1024

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def describe(source: ImageInput) -> str:
    """A short name for an input in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {tuple(source.shape)}>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `source` into an RGB PIL image, or raise InputError naming it and the reason."""
    name = describe(source)
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source, name))
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"{name}: no such file")
        if path.is_dir():
            raise InputError(f"{name}: is a directory")
        opened = path
    elif isinstance(source, bytes):
        opened = io.BytesIO(source)
    else:
        raise InputError(f"{name}: not an image (expected a path, bytes, PIL image or array)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(opened)
            try:
                if image.width * image.height > max_pixels:
                    raise InputError(
                        f"{name}: {image.width}x{image.height} pixels exceeds the limit of {max_pixels} "
                        "(possible decompression bomb)"
                    )
                image.load()
            except BaseException:
                image.close()  # do not leak the open file
                raise
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: too many pixels (possible decompression bomb): {e}") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{name}: not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: corrupt or truncated image ({e})") from None
    return to_rgb(image)


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"{name}: expected an HxW, HxWx3 or HxWx4 array")
    if array.size == 0:
        raise InputError(f"{name}: empty image")
    if array.dtype != np.uint8:
        if array.dtype == np.bool_:
            array = array * 255.0  # a mask: True is white
        elif np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise InputError(f"{name}: NaN or infinite pixel values")
            array = np.clip(array, 0.0, 1.0) * 255.0  # float images are taken to lie in [0, 1]
        elif array.dtype == np.uint16:
            array = array / 257.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB upright as the camera saw it: EXIF orientation applied, transparency on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    if image.mode != "F":
        array = array / 257  # 16-bit samples
    elif array.max(initial=0.0) <= 1.0:
        array = array * 255  # float samples in [0, 1]
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")


def resize_and_crop(image: Image.Image, size: int, cfg: ImageConfig) -> Image.Image:
    """Resize (the shortest side, or both sides, to `cfg.resize_size`, else to `size`), then crop the centre
    `size` x `size` unless the processor says not to, as transformers' image processors and open_clip do."""
    resample = _RESAMPLE[cfg.interpolation]
    target = cfg.resize_size or size
    if cfg.resize == "squash":
        image = image.resize((target, target), resample=resample)
    elif cfg.resize == "shortest":
        width, height = image.size
        if width <= height:
            new_width, new_height = target, int(target * height / width)
        else:
            new_width, new_height = int(target * width / height), target
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), resample=resample)
    else:
        raise ValueError(f"unknown resize mode {cfg.resize!r} (expected shortest or squash)")
    if not cfg.center_crop or image.size == (size, size):
        return image
    margins = (image.size[0] - size, image.size[1] - size)
    if cfg.crop_offset == "round":
        left, top = (round(margin / 2) for margin in margins)
    elif cfg.crop_offset == "floor":
        left, top = (margin // 2 for margin in margins)
    else:
        raise ValueError(f"unknown crop offset {cfg.crop_offset!r} (expected floor or round)")
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, size: int, cfg: ImageConfig) -> torch.Tensor:
    """An RGB image to normalised float32 pixels [3, size, size] ([3, H, W] for a processor that does not crop).

    (x·rescale − mean) / std, the processors' arithmetic, read from the bytes straight into the channel-first
    result and then worked in place: three passes over memory instead of six (0.15 ms against 0.6 for 224 px)."""
    rgb = np.asarray(resize_and_crop(image, size, cfg)).transpose(2, 0, 1)
    pixels = np.multiply(rgb, np.float32(cfg.rescale), out=np.empty(rgb.shape, dtype=np.float32))
    pixels -= np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    pixels /= np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return torch.from_numpy(pixels)


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand directories (recursively, sorted) into the image files they hold; keep files as given."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)
    return found
