"""Built-in synthetic datasets: made on the spot, deterministic, no download.

`shapes`: small PNG images of one or two coloured shapes on light, dark or noisy backgrounds,
captioned in varied sentences. Half the images hold one shape and carry a class label
("red circle") for zero-shot classification; the two-shape ones carry a `negative` caption that
swaps the colours between the shapes ("a red circle and a blue square" -> "a blue circle and a red
square"), so image-text matching can be scored on attribute binding, as ARO and SugarCrepe do. Spoken
captions and videos of the same classes are made by `rosetta.data.shapes_media`.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from rosetta.data.records import write_manifest
from rosetta.errors import RosettaError
from rosetta.files import write_json

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 25),
    "purple": (140, 55, 185),
    "orange": (245, 130, 20),
}
# Background name -> base grey level; "noisy" is grey with per-pixel noise.
BACKGROUNDS = {"white": 245, "light grey": 195, "grey": 128, "dark grey": 65, "black": 12, "noisy": 128}
CLASSES = sorted(f"{color} {shape}" for color in COLORS for shape in SHAPES)
SPLITS = ("train", "val", "test")

SINGLE_CAPTIONS = (
    "{x}",
    "a photo of {x}",
    "{x} on a {bg} background",
    "a picture of {x} on a {bg} background",
    "there is {x} in the image",
    "{x} in the {where} of the image",
    "an image showing {sized}",
)
PAIR_CAPTIONS = (
    "{x} and {y}",
    "a photo of {x} and {y}",
    "there is {x} and {y}",
    "{x} and {y} on a {bg} background",
    "{x} next to {y}",
    "two shapes: {x} and {y}",
)
_WHERE = (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right"))
SINGLE_SIDES = (0.3, 0.65)  # a lone shape's side, as fractions of the image's
_SUPERSAMPLE = 4  # shapes are drawn at 4x and reduced: smooth edges


def split_sizes(n: int) -> dict[str, int]:
    """80/10/10: validation and test get a tenth each (rounded down), training the rest."""
    held_out = n // 10
    return {"train": n - 2 * held_out, "val": held_out, "test": held_out}


def default_workers(n: int, per_worker: int) -> int:
    """One process per `per_worker` jobs, up to the CPU count or 8: a pool costs more than a few jobs take."""
    return min(os.cpu_count() or 1, 8, max(1, n // per_worker))


def map_jobs(work: Callable[[Any], Any], jobs: list, workers: int, desc: str, unit: str) -> list:
    """`work(job)` for every job, in order, over `workers` forked processes (in this one if 1), with a progress bar."""
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=None) as progress:
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                return [progress.update() or r for r in pool.imap(work, jobs, chunksize=64)]
        return [progress.update() or work(job) for job in jobs]


def make_shapes(out: str | os.PathLike, n: int, seed: int = 0, image_size: int = 64,
                workers: int | None = None) -> dict[str, int]:
    """Write the shapes dataset to `out`: images/<split>/*.png, <split>.jsonl, classes.json. Returns split sizes.

    Same arguments, same bytes: each image draws from its own generator, seeded by (seed, split,
    position), so the work spreads over `workers` processes (default: one per 500 images, up to the
    CPU count or 8) without changing the result. Within a split, even positions hold one shape,
    cycling through the classes so each class gets as many single-shape images as any other; odd
    positions hold two. Images are written first, the manifests last and atomically.
    """
    if n < 1:
        raise RosettaError(f"--n {n}: need at least 1 image")
    if image_size < 16:
        raise RosettaError(f"--image-size {image_size}: need at least 16 pixels")
    out = Path(out)
    sizes = split_sizes(n)
    jobs = []
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(out, seed, image_size, split, i) for i in range(sizes[split])]
    records = map_jobs(_write_sample, jobs, default_workers(n, 500) if workers is None else workers, "shapes", "image")
    for split in SPLITS:
        write_manifest((r for r in records if r["key"].startswith(f"{split}-")), out / f"{split}.jsonl")
    write_json(out / "classes.json", CLASSES)
    return sizes


def _write_sample(job: tuple[Path, int, int, str, int]) -> dict[str, Any]:
    out, seed, image_size, split, i = job
    rng = np.random.default_rng([seed, SPLITS.index(split), i])
    key = f"{split}-{i:06d}"
    label = CLASSES[(i // 2) % len(CLASSES)] if i % 2 == 0 else None
    image, record = _sample(rng, image_size, label)
    image.save(out / "images" / split / f"{key}.png", format="PNG", compress_level=1)
    return {"key": key, "image": f"images/{split}/{key}.png", **record}


def _sample(rng: np.random.Generator, size: int, label: str | None) -> tuple[Image.Image, dict[str, Any]]:
    bg = str(rng.choice(list(BACKGROUNDS)))
    image = _background(rng, bg, size)
    if label is not None:
        color, shape = label.split(" ")
        shapes = _place(rng, size, [(shape, color)], *SINGLE_SIDES)
    else:  # two different shapes in two different colours, so swapping the colours changes the caption
        shape_pair = rng.choice(len(SHAPES), 2, replace=False)
        color_pair = rng.choice(len(COLORS), 2, replace=False)
        kinds = [(SHAPES[s], list(COLORS)[c]) for s, c in zip(shape_pair, color_pair)]
        shapes = _place(rng, size, kinds, 0.22, 0.4)
    for spec in shapes:
        _draw(image, spec, rng)
    text, negative = _captions(rng, shapes, bg, size)
    record: dict[str, Any] = {"text": text}
    if negative is not None:
        record["negative"] = negative
    record.update(label=label, shapes=shapes, background=bg)
    return image, record


def _background(rng: np.random.Generator, name: str, size: int) -> Image.Image:
    level = BACKGROUNDS[name] + rng.integers(-8, 9, 3)  # a faint tint, so no two backgrounds are equal
    if name == "noisy":
        pixels = level + rng.normal(0, 32, (size, size, 1))
    else:
        pixels = np.broadcast_to(level, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _place(rng: np.random.Generator, size: int, kinds: list[tuple[str, str]], low: float, high: float,
           tries: int = 64) -> list[dict[str, Any]]:
    """(shape, colour)s of side `low`..`high` x size at random spots inside the image, apart from each other.

    Draws `tries` layouts at once and keeps the first in which no two bounding boxes touch.
    """
    sides = rng.integers(int(low * size), int(high * size) + 1, len(kinds))
    spots = [rng.integers(side // 2 + 1, size - side // 2 - 1, (tries, 2), endpoint=True) for side in sides]
    clear = np.ones(tries, dtype=bool)
    for i in range(len(kinds)):
        for j in range(i):
            clear &= np.abs(spots[i] - spots[j]).max(axis=1) > (sides[i] + sides[j]) / 2 + 1
    layout = int(np.argmax(clear))
    return [{"shape": shape, "color": color, "x": int(spot[layout, 0]), "y": int(spot[layout, 1]), "size": int(side)}
            for (shape, color), side, spot in zip(kinds, sides, spots)]


def _draw(image: Image.Image, spec: dict[str, Any], rng: np.random.Generator) -> None:
    _paint(image, spec, *_style(spec, rng))


def _style(spec: dict[str, Any], rng: np.random.Generator) -> tuple[float, tuple[int, int, int]]:
    """A random tilt (none for circles) and the shape's colour, jittered a little."""
    angle = float(rng.uniform(-15, 15)) if spec["shape"] != "circle" else 0.0
    jitter = rng.integers(-12, 13, 3)
    color = tuple(int(c) for c in np.clip(np.asarray(COLORS[spec["color"]]) + jitter, 0, 255))
    return angle, color


def _paint(image: Image.Image, spec: dict[str, Any], angle: float, color: tuple[int, int, int]) -> None:
    """Paint the shape `spec` describes (its centre may fall between pixels) onto `image`, anti-aliased."""
    k = _SUPERSAMPLE
    mask = Image.new("L", (image.width * k, image.height * k), 0)
    draw = ImageDraw.Draw(mask)
    x, y, r = spec["x"] * k, spec["y"] * k, spec["size"] * k / 2
    if spec["shape"] == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif spec["shape"] == "square":
        draw.regular_polygon((x, y, r * 0.9 * 2**0.5), 4, rotation=angle, fill=255)
    elif spec["shape"] == "triangle":
        draw.regular_polygon((x, y + r * 0.15, r * 1.1), 3, rotation=angle, fill=255)
    else:  # star: five points, alternating outer and inner radius
        angles = np.deg2rad(angle - 90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon(list(zip(x + radii * np.cos(angles), y + radii * np.sin(angles))), fill=255)
    image.paste(color, (0, 0, image.width, image.height), mask.reduce(k))


def _noun(color: str, shape: str, size_word: str = "") -> str:
    words = " ".join(w for w in (size_word, color, shape) if w)
    return ("an " if words[0] in "aeiou" else "a ") + words


def _captions(rng: np.random.Generator, shapes: list[dict[str, Any]], bg: str, size: int) -> tuple[str, str | None]:
    """A caption in one of several forms, and for two shapes the same sentence with their colours swapped."""
    if len(shapes) == 1:
        s = shapes[0]
        form = SINGLE_CAPTIONS[int(rng.integers(len(SINGLE_CAPTIONS)))]
        size_word = "small" if s["size"] < 0.4 * size else "large" if s["size"] > 0.55 * size else ""
        where = _WHERE[min(3 * s["y"] // size, 2)][min(3 * s["x"] // size, 2)]
        text = form.format(x=_noun(s["color"], s["shape"]), sized=_noun(s["color"], s["shape"], size_word),
                           bg=bg, where=where)
        return text, None
    first, second = shapes if rng.integers(2) == 0 else shapes[::-1]
    form = PAIR_CAPTIONS[int(rng.integers(len(PAIR_CAPTIONS)))]
    text = form.format(x=_noun(first["color"], first["shape"]), y=_noun(second["color"], second["shape"]), bg=bg)
    negative = form.format(x=_noun(second["color"], first["shape"]), y=_noun(first["color"], second["shape"]), bg=bg)
    return text, negative
