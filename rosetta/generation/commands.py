"""`rosetta generate` (a prompt's completion, streamed) and `rosetta chat` (a conversation on the terminal)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rosetta.cli import add_compile_arg, add_model_args, model_from_args
from rosetta.errors import RosettaError


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float,
                   help="0 is greedy; higher samples more freely (default: the checkpoint's, else greedy)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability")
    g.add_argument("--min-p", type=float, help="drop tokens less likely than this fraction of the most likely")
    g.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeating tokens")
    g.add_argument("--seed", type=int, help="seed of the sampler: the same seed gives the same text")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text; repeat for several")
    g.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid against this schema")
    add_compile_arg(g)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
        if getattr(args, name) is not None
    }
    if args.stop:
        options["stop"] = args.stop
    if args.compile:
        options["compile"] = True
    if args.json_schema:
        path = Path(args.json_schema)
        try:
            options["json_schema"] = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise RosettaError(f"--json-schema {path}: cannot read it ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RosettaError(f"--json-schema {path}: not valid JSON ({e})") from None
    return options


def language_model(args: argparse.Namespace):
    model = model_from_args(args)
    if not callable(getattr(model, "stream", None)):
        raise RosettaError(f"--model {args.model}: a {type(model).__name__}, which does not generate text "
                           "(use a language model: smollm2-135m, qwen2.5-0.5b, a transformers Llama directory...)")
    return model


def cmd_generate(args: argparse.Namespace) -> int:
    model = language_model(args)
    options = generation_options(args)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    for delta in model.stream(prompt, max_new_tokens=args.max_new_tokens, **options):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = language_model(args)
    options = generation_options(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:
        _reply(model, [*system, {"role": "user", "content": args.message}], args, options)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"rosetta chat: {args.model} (/reset forgets the conversation, Ctrl-D leaves)", file=sys.stderr)
    history = list(system)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history = list(system)
            print("(conversation forgotten)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        history.append({"role": "assistant", "content": _reply(model, history, args, options)})


def _reply(model, messages: list[dict[str, str]], args: argparse.Namespace, options: dict[str, Any]) -> str:
    parts = []
    for delta in model.stream(messages, max_new_tokens=args.max_new_tokens, **options):
        parts.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a language model, streaming the text",
                       description="Stream the completion of PROMPT ('-' reads it from standard input) to standard "
                                   "output. --json-schema constrains the output to JSON valid against a schema.")
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue ('-': read standard input)")
    add_generation_args(p)
    add_model_args(p, batch_size=False)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="chat with a language model on the terminal",
                       description="A multi-turn conversation through the model's chat template: type a message, "
                                   "read the reply as it is written. /reset forgets the conversation; Ctrl-D leaves. "
                                   "With --message, one turn: the reply is printed and the command exits.")
    p.add_argument("--message", metavar="TEXT", help="one user message: print the reply and exit")
    p.add_argument("--system", metavar="TEXT", help="a system prompt for the conversation")
    add_generation_args(p)
    add_model_args(p, batch_size=False)
    p.set_defaults(run=cmd_chat)
