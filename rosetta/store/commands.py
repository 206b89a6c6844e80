"""`rosetta index` and `rosetta search`: build a store from images, query it with text and/or an image."""

from __future__ import annotations

import argparse
import json
import sys

from rosetta.cli import add_model_args, fail, model_from_args
from rosetta.errors import RosettaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index", help="embed a folder or manifest of images into a store",
        description="Embed images into a store (created on first use). SOURCE is a folder (searched recursively) "
                    "or a manifest (.jsonl, .csv, .tsv, .parquet) with an 'image' column; its other columns are "
                    "stored as metadata. Incremental: a rerun embeds only new or changed files (by sha256) and "
                    "removes the source's deleted files. Each batch is committed at once, so an interrupted run "
                    "loses nothing and a rerun resumes.")
    p.add_argument("source", metavar="SOURCE", help="a folder of images, or a manifest with an 'image' column")
    p.add_argument("--store", "-s", required=True,
                   help="the store: a directory (embedded, created if missing) or milvus://host:port/collection")
    add_model_args(p)
    p.set_defaults(run=cmd_index)

    p = sub.add_parser(
        "search", help="search a store with a text, an image, or both",
        description="Print the nearest stored items, one JSON line each (id, path, score, metadata), best first. "
                    "With a text and an image, the query is their weighted sum (--weights TEXT,IMAGE).")
    p.add_argument("text", nargs="?", help="a text query, e.g. 'a dog on a beach'")
    p.add_argument("--image", "-i", help="an image query (a file)")
    p.add_argument("--weights", help="with a text and an image: their weights, e.g. 0.3,0.7 (default 0.5,0.5)")
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

    if args.text is None and args.image is None:
        raise RosettaError("search: give a text query, --image, or both")
    weights = _weights(args.weights)
    if args.where:
        parse_where(args.where)
    store = open_store(args.store)  # the model is checked once loaded: by its weights, not the name typed
    try:
        args.model = args.model or split_model(store.model)[0]
        model = model_from_args(args)
        hits = search(model, store, text=args.text, image=args.image, weights=weights, k=args.k, where=args.where)
    finally:
        store.close()
    for hit in hits:
        line = {"id": hit.id, "path": hit.metadata.get("path"), "score": round(hit.score, 6), "metadata": hit.metadata}
        print(json.dumps(line, ensure_ascii=False), flush=True)
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
