"""`rosetta data shard|clean|builtin`: prepare training data from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rosetta.errors import InputError, RosettaError

SOURCE_HELP = ("a folder of images with same-stem .txt/.json captions, a manifest (.csv, .tsv, .jsonl, .parquet), "
               "or a folder of shards written by 'rosetta data shard'")


def register(sub: argparse._SubParsersAction) -> None:
    from rosetta.cli import add_model_args

    data = sub.add_parser(
        "data", help="prepare training data: shard it, clean it, or make a built-in dataset",
        description="Prepare image-text training data. Sources are read the same way everywhere: " + SOURCE_HELP + ".",
    )
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "shard", help="write a source as WebDataset tar shards",
        description="Write SOURCE as WebDataset tar shards (shard-000000.tar, ...) of --size samples each, with "
                    "index.json listing them. Each sample holds the original file bytes, the caption (.txt) and "
                    "the metadata with the record's key (.json). Files that cannot be read are listed and left "
                    "out; the exit status is then 1.",
    )
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--out", "-o", required=True, help="folder for the shards and index.json")
    p.add_argument("--size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.set_defaults(run=cmd_shard)

    p = actions.add_parser(
        "clean", help="filter image-text pairs: corrupt, small, duplicate, badly captioned, mismatched",
        description="Filter SOURCE's image-text pairs and write OUT/clean.jsonl (the kept records, pointing at the "
                    "original files) and OUT/report.json (counts per reason and every rejected key with its "
                    "reason). Checks, in order: caption length in words, unreadable files, exact duplicates "
                    "(sha256), decoding, minimum size, aspect ratio, near-duplicates (perceptual hash), and "
                    "with --model the image-text cosine. Of duplicates the first is kept. Source files are only "
                    "read, never changed.",
    )
    p.add_argument("source", metavar="SOURCE", help="a folder of images with captions, or a manifest")
    p.add_argument("--out", "-o", required=True, help="folder for clean.jsonl and report.json")
    p.add_argument("--min-size", type=int, default=64, help="minimum shorter side in pixels (default: 64)")
    p.add_argument("--max-aspect", type=float, default=3.0,
                   help="maximum longer side / shorter side (default: 3.0)")
    p.add_argument("--min-words", type=int, default=1, help="minimum caption length in words (default: 1)")
    p.add_argument("--max-words", type=int, default=60, help="maximum caption length in words (default: 60)")
    p.add_argument("--near-dup-threshold", type=int, default=4,
                   help="images whose 64-bit perceptual hashes differ in at most this many bits are near-duplicates "
                        "(default: 4; -1 turns the check off)")
    p.add_argument("--min-similarity", type=float, default=0.2,
                   help="with --model: minimum image-text cosine similarity (default: 0.2)")
    add_model_args(p, required=False,
                   purpose="with a model, also drop pairs whose image-text cosine is under --min-similarity")
    p.set_defaults(run=cmd_clean)

    p = actions.add_parser(
        "builtin", help="make a built-in synthetic dataset (no download)",
        description="Make a built-in dataset. 'shapes': PNG images of one or two coloured shapes on varied "
                    "backgrounds with varied captions, split 80/10/10 into OUT/train.jsonl, val.jsonl and "
                    "test.jsonl, with OUT/classes.json for zero-shot classification and, for two-shape images, "
                    "a 'negative' caption with the colours swapped; and questions about each scene for "
                    "vision-language models (colour, shape, count, position; POPE's yes/no object probes, half "
                    "'no'): LLaVA-format conversations in OUT/SPLIT-conversations.jsonl, one question a row in "
                    "OUT/SPLIT-vqa.jsonl and OUT/SPLIT-pope.jsonl. With --spoken, also captions naming a "
                    "class, spoken by espeak-ng (16 kHz WAV, OUT/spoken-SPLIT.jsonl), and with --videos, clips "
                    "of one shape moving left, right, up or down, with captions that say which (H.264 MP4, "
                    "OUT/videos-SPLIT.jsonl), split the same way. 'speech': sentences spoken by espeak-ng in "
                    "several voices, speeds and pitches (every third over background noise), with their texts, "
                    "split the same way. 'invoices': invoices and receipts in varied layouts, fonts and sizes, "
                    "slightly rotated and noisy, with their fields (OUT/test.jsonl) and a JSON Schema "
                    "(OUT/schema.json). The same seed gives the same data.",
    )
    p.add_argument("name", choices=["shapes", "speech", "invoices"], help="the dataset")
    p.add_argument("--n", type=int, required=True,
                   help="number of images (shapes; 0 for none with --spoken or --videos), sentences (speech) or "
                        "documents")
    p.add_argument("--spoken", type=int, default=0, metavar="N", help="shapes: also make N spoken captions")
    p.add_argument("--videos", type=int, default=0, metavar="N", help="shapes: also make N videos of moving shapes")
    p.add_argument("--no-noise", dest="noise", action="store_false",
                   help="speech and spoken captions: no background noise")
    p.add_argument("--out", "-o", required=True, help="folder to write into")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--image-size", type=int, default=64,
                   help="image and video side in pixels (default: 64; even for videos)")
    p.set_defaults(run=cmd_builtin)


def cmd_shard(args: argparse.Namespace) -> int:
    from rosetta.cli import fail
    from rosetta.data.records import read_records
    from rosetta.data.shard import write_shards

    failures: list[InputError] = []

    def on_error(e: InputError) -> None:
        fail(str(e))
        failures.append(e)

    index = write_shards(read_records(args.source), args.out, args.size, on_error=on_error)
    print(f"wrote {index['total']} samples in {len(index['shards'])} shards to {args.out}"
          + (f"; {len(failures)} left out" if failures else ""), file=sys.stderr)
    return 1 if failures else 0


def cmd_clean(args: argparse.Namespace) -> int:
    from rosetta.data.clean import CleanOptions, clean
    from rosetta.data.records import SHARD_INDEX, read_records

    if (Path(args.source) / SHARD_INDEX).is_file():
        raise RosettaError(f"{args.source}: clean reads image files, not shards: clean the source, then shard it")
    options = CleanOptions(
        min_size=args.min_size, max_aspect=args.max_aspect, min_words=args.min_words, max_words=args.max_words,
        near_dup_threshold=args.near_dup_threshold, min_similarity=args.min_similarity,
    )
    records = read_records(args.source)
    model = None
    if args.model:
        from rosetta.cli import model_from_args

        model = model_from_args(args)
    report = clean(records, args.out, options, model=model, batch_size=args.batch_size)
    reasons = ", ".join(f"{reason} {count}" for reason, count in report["counts"].items() if count)
    print(f"kept {report['kept']} of {report['total']}" + (f" (rejected: {reasons})" if reasons else "")
          + f"; wrote {Path(args.out) / 'clean.jsonl'} and {Path(args.out) / 'report.json'}", file=sys.stderr)
    return 0


def cmd_builtin(args: argparse.Namespace) -> int:
    if args.name != "shapes" and (args.spoken or args.videos):
        raise RosettaError(f"--spoken and --videos add to the shapes dataset, not to {args.name}")
    if args.name == "invoices":
        from rosetta.data.invoices import make_invoices

        make_invoices(args.out, args.n, seed=args.seed)
        print(f"wrote {args.n} invoices and receipts, test.jsonl and schema.json to {args.out}", file=sys.stderr)
        return 0
    if args.name == "speech":
        from rosetta.data.speech import make_speech

        made = [(make_speech(args.out, args.n, seed=args.seed, noise=args.noise), "sentences")]
    else:
        made = _make_shapes(args)
    for sizes, what in made:
        print(f"wrote {sum(sizes.values())} {what} ({', '.join(f'{n} {split}' for split, n in sizes.items())}) "
              f"to {args.out}", file=sys.stderr)
    return 0


def _make_shapes(args: argparse.Namespace) -> list[tuple[dict[str, int], str]]:
    """The shapes images, spoken captions and videos asked for, as (split sizes, what they are)."""
    from rosetta.data.builtin import make_shapes
    from rosetta.data.shapes_media import make_shape_videos, make_spoken_captions

    made = []
    if args.n or not (args.spoken or args.videos):  # --n 0 beside --spoken or --videos: those alone
        from rosetta.data.shapes_qa import make_shape_questions

        made.append((make_shapes(args.out, args.n, seed=args.seed, image_size=args.image_size), "images"))
        made.append((make_shape_questions(args.out, seed=args.seed), "questions about them (conversations, VQA, "
                                                                      "POPE)"))
    if args.spoken:
        made.append((make_spoken_captions(args.out, args.spoken, seed=args.seed, noise=args.noise),
                     "spoken captions"))
    if args.videos:
        made.append((make_shape_videos(args.out, args.videos, seed=args.seed, image_size=args.image_size), "videos"))
    return made
