"""The `rosetta` command: one entry point, a subcommand per task.

Errors a user can cause print one line naming the input and the reason; batch commands go on with
the other inputs and exit non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from rosetta.errors import InputError, RosettaError


def fail(message: str) -> None:
    print(f"rosetta: {message}", file=sys.stderr)


def add_model_args(p: argparse.ArgumentParser, required: bool = True, purpose: str = "",
                   batch_size: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", required=required,
                   help="a preset (vit-b-32, siglip-base-patch16-224, smollm2-135m, tiny, tiny-lm...), a hub repo id, "
                        "or a model directory" + (f"; {purpose}" if purpose else ""))
    g.add_argument("--random-init", action="store_true",
                   help="build the preset with random weights instead of loading a checkpoint (no download)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   help="auto: bf16/fp16 where the hardware is fast at it; elsewhere int8 for embedding models, "
                        "fp32 for the others; int8: int8 linear layers on the CPU (default: auto)")
    if batch_size:
        g.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (default: 32)")


def add_compile_arg(p, what: str = "decoding", faster: str = "most with --dtype int8 on a CPU") -> None:
    """`--compile`, for the commands whose models decode tokens or embed many images (`p`: a parser or an argument
    group)."""
    p.add_argument("--compile", action="store_true",
                   help=f"{what} through torch.compile: the first steps wait for the compilation (seconds for a tiny "
                        f"model, a minute or more for a large one), later ones run faster ({faster})")


def model_from_args(args: argparse.Namespace):
    """The model the arguments name, named as the user typed it (what stores record, beside the fingerprint
    of its weights)."""
    import torch

    from rosetta.models.io import place
    from rosetta.models.registry import create, load

    if getattr(args, "batch_size", 1) < 1:
        raise RosettaError("--batch-size must be at least 1")
    if args.random_init:
        torch.manual_seed(0)  # one preset's random weights are the same in every command: index, search, serve
        model = place(create(args.model), args.device, args.dtype).eval()
    else:
        model = load(args.model, device=args.device, dtype=args.dtype)
    model.name = args.model
    return model


def decoded_inputs(inputs: Sequence[str], batch_size: int, failures: list[str]
                   ) -> Iterator[tuple[str, list[str], list]]:
    """(modality, paths, items) batches of the inputs: images decoded, `batch_size` at a time; sounds and videos
    one file each, as paths (the model decodes them as it embeds). Images that do not decode are reported and
    counted here, sounds and videos by `embedded`."""
    from rosetta.modalities.image import load_image
    from rosetta.modalities.sniff import find_media, modality_of

    paths, images = [], []
    for path in find_media(inputs):
        modality = modality_of(path)
        if modality != "image":
            yield modality, [str(path)], [path]
            continue
        try:
            images.append(load_image(path))
            paths.append(str(path))
        except InputError as e:
            fail(str(e))
            failures.append(str(path))
        if len(images) == batch_size:
            yield "image", paths, images
            paths, images = [], []
    if images:
        yield "image", paths, images


def embedded(model, modality: str, paths: list[str], items: list, batch_size: int, failures: list[str]):
    """The inputs' embeddings, or None (reported and counted) when a sound or video cannot be embedded."""
    try:
        return model.embed(items, modality=modality, batch_size=batch_size)
    except InputError as e:
        fail(str(e) if paths[0] in str(e) else f"{paths[0]}: {e}")
        failures.extend(paths)
        return None


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    out = Path(args.out)
    if out.suffix not in (".npy", ".parquet"):
        raise RosettaError(f"--out {out}: use a .npy or .parquet file")
    model = model_from_args(args)
    failures: list[str] = []
    if args.text:
        names = list(args.inputs)
        vectors = model.embed_texts(names, batch_size=args.batch_size).cpu().numpy()
    else:
        names, chunks = [], []
        for modality, paths, items in decoded_inputs(args.inputs, args.batch_size, failures):
            vectors = embedded(model, modality, paths, items, args.batch_size, failures)
            if vectors is not None:
                names += paths
                chunks.append(vectors.cpu().numpy())
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, model.config.embed_dim), np.float32)
    _write_embeddings(out, names, vectors.astype(np.float32), "text" if args.text else "path")
    print(f"wrote {len(names)} embeddings of dimension {vectors.shape[1]} to {out}", file=sys.stderr)
    return 1 if failures else 0



def _write_embeddings(out: Path, names: list[str], vectors, key: str) -> None:
    import io

    import numpy as np

    from rosetta.files import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        atomic_write(out, lambda f: f.write(buffer.getvalue()))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    table = pa.table({key: pa.array(names, pa.string()), "embedding": embedding})
    atomic_write(out, lambda f: pq.write_table(table, f))


def cmd_classify(args: argparse.Namespace) -> int:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise RosettaError("--labels: give at least one label, e.g. --labels 'dog,cat,car'")
    model = model_from_args(args)
    templates = args.template or args.templates
    classifiers = {}  # per modality: images are "a photo of a {}", sounds and videos their labels as they are
    failures: list[str] = []
    for modality, paths, items in decoded_inputs(args.images, args.batch_size, failures):
        vectors = embedded(model, modality, paths, items, args.batch_size, failures)
        if vectors is None:
            continue
        if modality not in classifiers:
            classifiers[modality] = model.classifier(labels, templates, modality)
        probs = model.probabilities(vectors, classifiers[modality], modality)
        for path, row in zip(paths, probs.tolist()):
            best = max(range(len(labels)), key=row.__getitem__)
            line = {"path": path, "label": labels[best], "score": round(row[best], 6),
                    "probs": {label: round(p, 6) for label, p in zip(labels, row)}}
            print(json.dumps(line), flush=True)
    return 1 if failures else 0


# Modules that add their subcommands with `register(subparsers)`; each imports heavy things lazily.
COMMAND_MODULES: list[str] = ["rosetta.generation.commands", "rosetta.speech.commands", "rosetta.eval.commands",
                              "rosetta.train.commands", "rosetta.serve.commands", "rosetta.store.commands",
                              "rosetta.data.commands", "rosetta.vlm.commands"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from rosetta import __version__

    parser = argparse.ArgumentParser(
        prog="rosetta",
        description="Multimodal foundation models: embed, classify and compare images and text in one space; "
                    "generate and chat with language models.",
        epilog="Run 'rosetta COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"rosetta {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("embed", help="embed images, sounds, videos or texts into the shared space",
                       description="Embed images, sounds and videos (files or directories, recursively; sounds need a "
                                   "model with an audio tower) or, with --text, strings. Writes L2-normalised vectors "
                                   "to a .npy array or a .parquet table with the inputs.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories; strings with --text")
    p.add_argument("--text", action="store_true", help="the inputs are strings to embed, not file paths")
    p.add_argument("--out", "-o", required=True, help="output: .npy (array [N, D]) or .parquet (input + embedding)")
    add_model_args(p)
    p.set_defaults(run=cmd_embed)

    p = sub.add_parser("classify", help="zero-shot classify images, sounds or videos against labels you type",
                       description="Zero-shot classification: prints one JSON line per image, sound or video with "
                                   "path, label, score and the probability of every label.")
    p.add_argument("images", nargs="+", metavar="INPUT", help="image, sound or video files, or directories (recursive)")
    p.add_argument("--labels", "-l", required=True, help="comma-separated labels, e.g. 'dog,cat,car'")
    p.add_argument("--templates", default=None,
                   help="prompt set: 'default' (a photo of a {}.) or 'imagenet' (CLIP's 80 prompts, ensembled); "
                        "unset: 'default' for images, the label itself for sounds and videos")
    p.add_argument("--template", action="append",
                   help="a custom prompt with {} for the label; repeat to ensemble (overrides --templates)")
    add_model_args(p)
    p.set_defaults(run=cmd_classify)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only `train` takes free --key=value overrides
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from rosetta.models.io import keep_freed_memory

    keep_freed_memory()  # the command owns the process: its batches reuse memory rather than fault in new pages
    try:
        return args.run(args)
    except RosettaError as e:
        fail(str(e))
        return 2
    except ValueError as e:  # bad option values caught by the library (templates, presets)
        fail(str(e))
        return 2
    except KeyboardInterrupt:
        fail("interrupted")
        return 130
