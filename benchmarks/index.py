"""Indexing throughput: `index_files` into an embedded store vs `embed_images` alone, same files, one process.

    python benchmarks/index.py [--images 256] [--model vit-b-32] [--batch-size 32] [--repeats 2]

Writes N JPEGs (random crops and resizes of scikit-image's sample photos) to a temporary folder,
then times, alternately: `model.embed_images(paths)` (decode, preprocess, forward) and
`index_files(model, store, paths)` into a fresh store (the same, plus sha256 of every file, its
metadata, and committing vectors + metadata + hashes per batch). The model has random weights (no
download). Prints images/s for both (best of --repeats) and the indexing overhead in percent.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import rosetta
from rosetta.models.io import cpu_isa, cpuinfo
from rosetta.store import open_store
from rosetta.store.index import index_files

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def write_jpegs(folder: Path, n: int) -> list[Path]:
    import skimage.data

    rng = np.random.default_rng(0)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(h // 3, h + 1)), int(rng.integers(w // 3, w + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(photo[top : top + ch, left : left + cw])
        scale = float(rng.uniform(0.5, 1.5))
        crop = crop.resize((max(32, int(cw * scale)), max(32, int(ch * scale))), Image.Resampling.BILINEAR)
        path = folder / f"{i:04d}.jpg"
        crop.save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="vit-b-32", help="a preset, built with random weights")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = rosetta.create(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        print(f"cpu: {cpuinfo('model name') or '?'} ({cpu_isa()})")
        print(f"{len(paths)} JPEGs ({megabytes:.1f} MB), model {args.model} (random init, fp32, "
              f"{torch.get_num_threads()} threads), batch size {args.batch_size}")
        model.embed_images(paths[: args.batch_size], batch_size=args.batch_size)  # warm-up
        embed, index = [], []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            model.embed_images(paths, batch_size=args.batch_size)
            embed.append(time.perf_counter() - start)

            store = open_store(Path(tmp) / f"store{repeat}", model=args.model, dim=model.config.embed_dim)
            start = time.perf_counter()
            report = index_files(model, store, paths, batch_size=args.batch_size, progress=False)
            store.close()
            index.append(time.perf_counter() - start)
            assert report.added == len(paths) and not report.failed
    best_embed, best_index = min(embed), min(index)
    print(f"embed_images:  {len(paths) / best_embed:8.1f} images/s  ({', '.join(f'{t:.1f}' for t in embed)} s)")
    print(f"index_files:   {len(paths) / best_index:8.1f} images/s  ({', '.join(f'{t:.1f}' for t in index)} s)")
    print(f"indexing overhead: {100 * (best_index / best_embed - 1):+.1f}% (target <= 15%)")


if __name__ == "__main__":
    main()
