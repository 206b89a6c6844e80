"""`rosetta index` and `rosetta search`: build a store from images, sounds and videos; query it with a text, an
image, a sound or a video (or a text and one of those)."""

from __future__ import annotations

import argparse
import json
import sys

from rosetta.cli import add_compile_arg, add_model_args, fail, model_from_args
from rosetta.errors import RosettaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index", help="embed a folder or manifest of images, sounds and videos into a store",
        description="Embed images, sounds and videos into a store (created on first use). SOURCE is a folder "
                    "(searched recursively) or a manifest (.jsonl, .csv, .tsv, .parquet) with an 'image', 'audio' "
                    "or 'video' column; its other columns are stored as metadata. A sound or a video is stored "
                    "window by window (its start and end seconds in the metadata), so that a search finds the "
                    "moment that matches; sounds need a model with an audio tower. Incremental: a rerun embeds "
                    "only new or changed files (by sha256) and removes the source's deleted files. Each batch of "
                    "images and each sound or video is committed at once, so an interrupted run loses nothing and "
                    "a rerun resumes.")
    p.add_argument("source", metavar="SOURCE",
                   help="a folder of images, sounds and videos, or a manifest with an 'image', 'audio' or 'video' "
                        "column")
    p.add_argument("--store", "-s", required=True,
                   help="the store: a directory (embedded, created if missing) or milvus://host:port/collection")
    add_model_args(p)
    add_compile_arg(p, "image batches", faster="bf16 ViT-B/32 on an AMX CPU: 4-10%% more images/s")
    p.set_defaults(run=cmd_index)

    p = sub.add_parser(
        "search", help="search a store with a text, an image, a sound or a video",
        description="Print the nearest stored files, one JSON line each (id, path, score, metadata), best first; "
                    "a sound or a video with the start and end seconds of its best-matching window. With a text "
                    "and an image (sound, video), the query is their weighted sum (--weights TEXT,IMAGE).")
    p.add_argument("text", nargs="?", help="a text query, e.g. 'a dog on a beach'")
    p.add_argument("--image", "-i", help="an image query (a file)")
    p.add_argument("--audio", "-a", help="a sound query (a file; needs a model with an audio tower)")
    p.add_argument("--video", help="a video query (a file)")
    p.add_argument("--weights",
                   help="with a text and an image (sound, video): their weights, e.g. 0.3,0.7 (default 0.5,0.5)")
    p.add_argument("--k", "-k", type=int, default=10, help="how many results (default: 10)")
    p.add_argument("--where", "-w",
                   help="a metadata filter, e.g. \"width > 512 and (format = 'jpeg' or format = 'png')\"")
    p.add_argument("--store", "-s", required=True, help="the store to search (a directory or milvus://...)")
    add_model_args(p)
    for action in p._actions:  # the store knows its model: --model only overrides it
        if action.dest == "model":
            action.required = False
            action.help = "the model (default: the one that built the store; another one is refused)"
    p.set_defaults(run=cmd_search)


def cmd_index(args: argparse.Namespace) -> int:
    from rosetta.store import open_store
    from rosetta.store.index import index_source, model_name

    model = model_from_args(args)
    if args.compile:
        from rosetta.models.compiled import compile_image_tower

        compile_image_tower(model)
    store = open_store(args.store, model=model_name(model), dim=model.config.embed_dim)
    try:
        report = index_source(model, store, args.source, batch_size=args.batch_size)
    finally:
        store.close()
    for line in report.failed:
        fail(line)
    print(f"rosetta index: {args.store}: {report.summary()}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_search(args: argparse.Namespace) -> int:
    from rosetta.search import search
    from rosetta.store import open_store, parse_where
    from rosetta.store.base import split_model

    if args.text is None and args.image is None and args.audio is None and args.video is None:
        raise RosettaError("search: give a text query, --image, --audio or --video")
    weights = _weights(args.weights)
    if args.where:
        parse_where(args.where)
    store = open_store(args.store)  # the model is checked once loaded: by its weights, not the name typed
    try:
        args.model = args.model or split_model(store.model)[0]
        model = model_from_args(args)
        hits = search(model, store, text=args.text, image=args.image, weights=weights, k=args.k, where=args.where,
                      audio=args.audio, video=args.video)
    finally:
        store.close()
    for hit in hits:
        line = {"id": hit.id, "path": hit.metadata.get("path"), "score": round(hit.score, 6)}
        if "start" in hit.metadata:  # a sound's or video's best window
            line |= {"start": hit.metadata["start"], "end": hit.metadata["end"]}
        print(json.dumps(line | {"metadata": hit.metadata}, ensure_ascii=False), flush=True)
    return 0


def _weights(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 2:
        raise RosettaError(f"--weights {text}: expected two numbers TEXT,IMAGE such as 0.3,0.7")
    return weights
