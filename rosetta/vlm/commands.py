"""`rosetta caption`, `rosetta ask` and `rosetta extract`: a vision-language model on image and video files,
one JSON line per input."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rosetta.cli import add_compile_arg, add_model_args, fail, model_from_args
from rosetta.errors import InputError, RosettaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption images (and videos) with a vision-language model",
                       description="Prints one JSON line per input: {\"path\", \"caption\"}. Directories are "
                                   "searched recursively; a video is sampled to frames (1 a second).")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image or video files, or directories of images")
    p.add_argument("--prompt", help="what to ask for (default: a one-sentence description)")
    _add_common(p)
    p.set_defaults(run=cmd_caption)

    p = sub.add_parser("ask", help="ask a vision-language model a question about images (or videos)",
                       description="rosetta ask --model M IMAGE... \"QUESTION\": prints one JSON line per image, "
                                   "{\"path\", \"question\", \"answer\"}; with --together, one answer about all.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image or video files, then the question")
    p.add_argument("--together", action="store_true", help="one question about all the images at once")
    _add_common(p)
    p.set_defaults(run=cmd_ask)

    p = sub.add_parser("extract", help="read images of documents into JSON that validates against a schema",
                       description="Prints one JSON line per image, {\"path\", \"fields\"}: the schema's fields "
                                   "read from the image (decoding is constrained to the schema).")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or directories")
    p.add_argument("--schema", required=True, metavar="FILE", help="a JSON Schema of the fields to read")
    p.add_argument("--prompt", help="the instruction, with {schema} where the schema goes")
    _add_common(p, max_new_tokens=512)
    p.set_defaults(run=cmd_extract)


def _add_common(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"most tokens to generate per answer (default: {max_new_tokens})")
    g.add_argument("--temperature", type=float, help="0 is greedy (default: the checkpoint's, else greedy)")
    g.add_argument("--seed", type=int, help="seed of the sampler")
    add_compile_arg(g, "decoding (local models)")
    add_model_args(p, batch_size=True)
    p.set_defaults(batch_size=8)


def vision_language_model(args: argparse.Namespace):
    model = model_from_args(args)
    if not callable(getattr(model, "caption", None)):
        raise RosettaError(f"--model {args.model}: a {type(model).__name__}, which does not read images "
                           "(use a vision-language model: a LLaVA directory, llava-1.5-7b, tiny-vlm...)")
    if args.compile and getattr(model, "lm", None) is None:
        raise RosettaError(f"--compile: {args.model} does not decode here (only local models compile)")
    return model


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = {name: getattr(args, name) for name in ("temperature", "seed") if getattr(args, name) is not None}
    if args.compile:
        options["compile"] = True
    return {"max_new_tokens": args.max_new_tokens, **options}


def _visuals(paths: list, failures: list[str]) -> Iterator[tuple[str, list]]:
    """(path, images) of each file that decodes: an image, or a video's frames; the others are reported."""
    from rosetta.modalities.image import load_image
    from rosetta.modalities.video import is_video, sample_frames

    for path in paths:
        try:
            yield str(path), sample_frames(path) if is_video(path) else [load_image(path)]
        except InputError as e:
            fail(str(e))
            failures.append(str(path))


def _batches(items: Iterator, size: int, total: int, what: str) -> Iterator[list]:
    from tqdm import tqdm

    batch: list = []
    with tqdm(total=total, desc=what, unit="input", disable=total < 2 or None, file=sys.stderr) as bar:
        for item in items:
            batch.append(item)
            if len(batch) == size:
                yield batch
                bar.update(len(batch))
                batch = []
        if batch:
            yield batch
            bar.update(len(batch))


def _run(model, args: argparse.Namespace, inputs: list[str], question: str | None, line, **extra: Any) -> int:
    from rosetta.modalities.image import find_images
    from rosetta.models.vlm import CAPTION_PROMPT, user

    failures: list[str] = []
    paths = find_images(inputs)
    for batch in _batches(_visuals(paths, failures), args.batch_size, len(paths), "images"):
        conversations = [[user(images, question or CAPTION_PROMPT)] for _, images in batch]
        try:
            answers = model.reply(conversations, **_options(args), **extra)
        except InputError:  # one input the model cannot take (too many frames for its context): find it
            answers = []
            for (path, _), conversation in zip(batch, conversations):
                try:
                    answers.append(model.reply([conversation], **_options(args), **extra)[0])
                except InputError as e:
                    fail(f"{path}: {e}")
                    failures.append(path)
                    answers.append(None)
        for (path, _), answer in zip(batch, answers):
            if answer is None:
                continue
            try:
                print(json.dumps(line(path, answer), ensure_ascii=False), flush=True)
            except ValueError:  # extract: the JSON did not close within --max-new-tokens
                fail(f"{path}: the answer is not complete JSON within {args.max_new_tokens} tokens "
                     "(raise --max-new-tokens)")
                failures.append(path)
    return 1 if failures else 0


def cmd_caption(args: argparse.Namespace) -> int:
    return _run(vision_language_model(args), args, args.inputs, args.prompt,
                lambda path, text: {"path": path, "caption": text})


def cmd_ask(args: argparse.Namespace) -> int:
    if len(args.inputs) < 2:
        raise RosettaError("ask: give one or more images, then the question")
    *inputs, question = args.inputs
    if not args.together:
        return _run(vision_language_model(args), args, inputs, question,
                    lambda path, text: {"path": path, "question": question, "answer": text})
    from rosetta.models.vlm import user

    failures: list[str] = []
    from rosetta.modalities.image import find_images

    visuals = list(_visuals(find_images(inputs), failures))
    if failures:
        return 1
    model = vision_language_model(args)
    images = [image for _, frames in visuals for image in frames]
    answer = model.reply([[user(images, question)]], **_options(args))[0]
    print(json.dumps({"paths": [p for p, _ in visuals], "question": question, "answer": answer},
                     ensure_ascii=False), flush=True)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from rosetta.models.vlm import EXTRACT_PROMPT

    path = Path(args.schema)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RosettaError(f"--schema {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RosettaError(f"--schema {path}: not valid JSON ({e})") from None
    question = (args.prompt or EXTRACT_PROMPT).replace("{schema}", json.dumps(schema))
    model = vision_language_model(args)
    try:
        model.check_schema(schema)
    except InputError as e:
        raise RosettaError(f"--schema {path}: {e}") from None
    return _run(model, args, args.inputs, question, lambda p, text: {"path": p, "fields": json.loads(text)},
                json_schema=schema)
