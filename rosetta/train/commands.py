"""`rosetta train` and `rosetta quickstart`."""

from __future__ import annotations

import argparse
import os


def cmd_train(args: argparse.Namespace) -> int:
    from rosetta.train.config import load_config
    from rosetta.train.trainer import train

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    final = train(load_config(args.config, overrides), resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"model saved to {final} (open it with rosetta.load or --model {final})")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from rosetta.train.quickstart import bind_quickstart, quickstart, vlm_quickstart

    if args.task == "vlm":
        vlm_quickstart(args.out, epochs=args.epochs, resume=args.resume)
    elif args.task == "bind":
        bind_quickstart(args.out, spoken=args.spoken, videos=args.videos, epochs=args.epochs, resume=args.resume)
    else:
        quickstart(args.out, n=args.n, epochs=args.epochs, resume=args.resume)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train or fine-tune a contrastive or vision-language model from a YAML recipe",
        description="Train a CLIP/SigLIP-style model, or (task: vlm) a LLaVA-style vision-language model, from a "
                    "recipe (see configs/). Any setting can be overridden "
                    "as key=value, with dots reaching into groups: rosetta train configs/shapes.yaml --lr=1e-3 "
                    "--data.train=my/manifest.jsonl. Run under torchrun for several processes "
                    "(torchrun --nproc_per_node=2 -m rosetta train ...).",
    )
    p.add_argument("config", help="a YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings that replace the recipe's")
    p.add_argument("--out", help="run directory (checkpoints, metrics, final model); same as out=DIR")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's newest checkpoint")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser(
        "quickstart", help="build the built-in dataset, train a small model, evaluate it (a few minutes on a CPU)",
        description="The whole lifecycle on this machine: generates the built-in shapes dataset, trains a small "
                    "CLIP on it, evaluates zero-shot accuracy, retrieval and compositionality on the test split, "
                    "prints the results and leaves a model directory that rosetta.load and 'rosetta classify' open. "
                    "--task bind then binds audio and video towers to that model's space (ImageBind's recipe) on "
                    "spoken captions and videos of moving shapes, and scores spoken caption -> image retrieval, "
                    "a pairing never seen in training. --task vlm makes a vision-language model of that model's "
                    "image tower and a small language model, trains it on questions about the shapes (colour, "
                    "shape, count, position, yes/no) and scores its answers (VQA accuracy, POPE); 'rosetta ask' "
                    "opens it.",
    )
    p.add_argument("--task", choices=["clip", "bind", "vlm"], default="clip",
                   help="clip: the image-text model (default); bind: audio and video towers bound to it; vlm: a "
                        "vision-language model on its image tower")
    p.add_argument("--out", default="runs/quickstart", help="where data, run and model go (default: runs/quickstart)")
    p.add_argument("--n", type=int, default=None, help="images to generate (default: the recipe's)")
    p.add_argument("--spoken", type=int, default=None, help="bind: spoken captions to generate (default: 2400)")
    p.add_argument("--videos", type=int, default=None, help="bind: videos to generate (default: 960)")
    p.add_argument("--epochs", type=float, default=None, help="training epochs (default: the recipe's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted quickstart")
    p.set_defaults(run=cmd_quickstart)
