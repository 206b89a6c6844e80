"""`rosetta eval` (zero-shot classification, retrieval, compositionality on a dataset) and `rosetta plot`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rosetta.cli import add_model_args, fail, model_from_args
from rosetta.errors import InputError, RosettaError

TASK_CHOICES = ("zeroshot", "retrieval", "compositionality", "asr", "extract", "caption", "vqa", "pope", "all")
MANIFEST_SUFFIXES = (".jsonl", ".parquet", ".csv", ".tsv")  # looked for in this order
# What each task needs in a record, for the error when no record has it.
NEEDS = {"zeroshot": "a label", "retrieval": "a caption (text)", "compositionality": "a hard negative (negative)",
         "asr": "an audio and its text", "extract": "an image and its fields"}
GENERATIVE = ("caption", "vqa", "pope")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="zero-shot classification, retrieval, compositionality, speech recognition, captioning, VQA, "
                     "POPE, extraction on a dataset",
        description="Evaluate a model on a dataset: zero-shot classification (records with a label), image-text "
                    "retrieval recall (records with a caption), compositionality (records with a hard-negative "
                    "caption), or speech recognition (records with an audio and its text: WER and CER after "
                    "Whisper's English normalisation, real-time factor). A vision-language model (local, hosted or "
                    "ocr): caption (BLEU-4, CIDEr-D against records' text or captions), vqa (VQAv2 accuracy on "
                    "records with a question and answers), pope (accuracy, precision, recall, F1, yes-ratio on "
                    "yes/no object questions), extract (field accuracy). Prints a table; --out writes the metrics "
                    "as JSON.")
    p.add_argument("--data", "-d", required=True, metavar="DIR_OR_MANIFEST",
                   help="a dataset directory (reads SPLIT.jsonl, .parquet, .csv or .tsv, and classes.json if there) "
                        "or a manifest file (and classes.json beside it)")
    p.add_argument("--task", "-t", default="all", choices=TASK_CHOICES,
                   help="what to measure (default: all that the records allow)")
    p.add_argument("--split", default="test", help="which split of a dataset directory (default: test)")
    p.add_argument("--templates", default="default",
                   help="zero-shot prompts: 'default' (a photo of a {}.), 'imagenet' (CLIP's 80, ensembled) "
                        "or one prompt with {} for the class name")
    p.add_argument("--schema", metavar="FILE",
                   help="extract: the fields' JSON Schema (default: schema.json beside the manifest)")
    p.add_argument("--out", "-o", metavar="JSON", help="also write the results to this JSON file")
    add_model_args(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("plot", help="draw a training run's curves to PNG",
                       description="Draw RUN_DIR/metrics.jsonl (loss, learning rate, throughput, validation metrics) "
                                   "into RUN_DIR/plots/*.png and print the files' paths.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's directory (holding metrics.jsonl)")
    p.set_defaults(run=cmd_plot)


def dataset_files(data: Path, split: str, task: str = "all") -> tuple[Path, list[str] | None]:
    """The manifest to read and the class names (classes.json beside it), for a directory or a manifest. In a
    directory, a task's own manifest of the split comes first (test-vqa.jsonl, test-pope.jsonl)."""
    if data.is_dir():
        manifests = [data / f"{name}{suffix}" for name in (f"{split}-{task}", split) for suffix in MANIFEST_SUFFIXES]
        manifest = next((m for m in manifests if m.is_file()), None)
        if manifest is None:
            names = ", ".join(f"{split}{suffix}" for suffix in MANIFEST_SUFFIXES)
            raise RosettaError(f"{data}: none of {names} (choose the split with --split)")
    elif data.is_file():
        manifest = data
    else:
        raise RosettaError(f"{data}: no such file or directory")
    path = manifest.parent / "classes.json"
    if not path.is_file():
        return manifest, None
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RosettaError(f"{path}: cannot read ({e})") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise RosettaError(f"{path}: expected a JSON list of class names")
    return manifest, classes


def cmd_eval(args: argparse.Namespace) -> int:
    from rosetta.data.records import read_records
    from rosetta.eval import EMBEDDING_TASKS, ImageEmbeddings, evaluate

    manifest, classes = dataset_files(Path(args.data), args.split, args.task)
    records = list(read_records(manifest))
    if not records:
        raise RosettaError(f"{manifest}: no records")
    model = model_from_args(args)
    if args.task == "extract":
        return _eval_extract(args, model, manifest, records)
    if args.task in GENERATIVE:
        return _eval_generative(args, model, records)
    transcribes = callable(getattr(model, "transcribe", None))
    tasks = (("asr",) if transcribes else EMBEDDING_TASKS) if args.task == "all" else (args.task,)
    if ("asr" in tasks) != transcribes:
        raise RosettaError(f"--task {args.task}: {args.model} " + ("transcribes speech: use --task asr" if transcribes
                           else "does not transcribe speech"))
    skip = Skipped()
    images = ImageEmbeddings(model, args.batch_size, on_error=skip)
    results = evaluate(model, records, tasks, classes, args.templates, args.batch_size, images)
    if not results:
        needs = " or ".join(NEEDS[task] for task in tasks)
        raise RosettaError(f"{manifest}: no record has {needs} to evaluate {args.task}")
    meta = {"dataset": str(args.data), "model": args.model, "templates": args.templates}
    if Path(args.data).is_dir():
        meta["split"] = args.split
    return _report(args, results, meta, skip)


def _eval_extract(args: argparse.Namespace, model, manifest: Path, records: list[dict]) -> int:
    from rosetta.eval.extract import extraction

    if not callable(getattr(model, "extract", None)):
        raise RosettaError(f"--task extract: {args.model} does not read documents (a vision-language model, a "
                           "hosted one, or ocr)")
    path = Path(args.schema) if args.schema else manifest.parent / "schema.json"
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RosettaError(f"--schema {path}: cannot read a JSON Schema ({e})") from None
    skip = Skipped()
    results = {"extract": extraction(model, records, schema, on_error=skip)}
    return _report(args, results, {"dataset": str(args.data), "model": args.model}, skip)


def _eval_generative(args: argparse.Namespace, model, records: list[dict]) -> int:
    from rosetta.eval.generative import GENERATIVE_TASKS

    if not callable(getattr(model, "reply", None)):
        raise RosettaError(f"--task {args.task}: {args.model} does not answer about images (a vision-language "
                           "model, a hosted one, or ocr)")
    skip = Skipped()
    try:
        metrics = GENERATIVE_TASKS[args.task](model, records, batch_size=args.batch_size, on_error=skip)
    except InputError as e:
        raise RosettaError(str(e)) from None
    results = {args.task: metrics}
    return _report(args, results, {"dataset": str(args.data), "model": args.model}, skip)


class Skipped:
    """`on_error` of an evaluation: each input that fails is one line on stderr, and the exit status says so."""

    def __init__(self):
        self.errors: list[str] = []

    def __call__(self, error: Exception) -> None:
        fail(str(error))
        self.errors.append(str(error))


def _report(args: argparse.Namespace, results: dict, meta: dict, skipped: Skipped) -> int:
    """The table on stdout, the JSON with --out; exit status 1 if an input failed."""
    from rosetta.eval import format_table, write_results

    print(format_table(results), flush=True)
    if args.out:
        print(f"wrote {write_results(args.out, results, meta)}", file=sys.stderr)
    return 1 if skipped.errors else 0


def cmd_plot(args: argparse.Namespace) -> int:
    from rosetta.eval.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0
