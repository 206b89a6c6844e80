"""`rosetta serve`: the HTTP API and web page for one model (and optionally a store) with uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from rosetta.cli import add_compile_arg, add_model_args, model_from_args
from rosetta.errors import RosettaError


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve embeddings, classification and search over HTTP, with a web page",
        description="An HTTP API (its OpenAPI spec at /openapi.json) and a web page at / for one model. "
                    "An embedding model: POST /v1/embed, /v1/classify, /v1/search (texts, images, sounds, videos), "
                    "/v1/index; GET /v1/media for stored sounds and videos. A language model: "
                    "OpenAI's POST /v1/chat/completions and /v1/completions (continuous batching; stream: true "
                    "for server-sent events). A model that reads images (a vision-language model, vendor:model "
                    "such as openai:gpt-4o, ocr): POST /v1/caption, /v1/ask, /v1/extract and /v1/chat/completions, "
                    "and an image panel on the page. All: GET /healthz, /metrics, /v1/info. "
                    "Listens on 127.0.0.1 unless --host says otherwise.")
    add_model_args(p)
    p.add_argument("--store", metavar="DIR", help="a store directory to search and to index uploads into")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require this key (X-API-Key or Authorization: Bearer) on /v1 and /metrics "
                        "(default: $ROSETTA_API_KEY; none: open)")
    p.add_argument("--max-batch", type=int, default=32, help="most inputs per model call (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its model call (default: 5)")
    p.add_argument("--no-batching", action="store_true", help="run every request's inputs in a model call of its own")
    p.add_argument("--cors-origin", metavar="ORIGIN", nargs="+", action="extend", default=[],
                   help="allow browsers on these origins to call the API (default: none, CORS off)")
    p.add_argument("--cache-size", type=int, default=10_000,
                   help="embeddings kept in the LRU cache; 0 turns it off (default: 10000)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default: 32)")
    p.add_argument("--max-items", type=int, default=64,
                   help="most texts, images, labels or files in one request (default: 64)")
    p.add_argument("--max-new-tokens", type=int, default=4096,
                   help="the most tokens one completion may ask for (language models; default: 4096)")
    p.add_argument("--max-sequences", type=int, default=8,
                   help="sequences a language model decodes together (default: 8)")
    add_compile_arg(p, "a language model's or a speech recogniser's decoding, an embedding model's image batches,")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs named in requests (off by default: a server that fetches any "
                        "URL it is sent can be turned against its own network)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish after SIGTERM/Ctrl-C (default: 30)")
    p.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rosetta.serve.app import Settings, create_app

    for name in ("max_batch", "max_items", "port", "cache_size", "max_new_tokens", "max_sequences"):
        value = getattr(args, name)
        if value < (0 if name in ("port", "cache_size") else 1):
            raise RosettaError(f"--{name.replace('_', '-')} {value}: out of range")
    if args.max_wait_ms < 0 or args.max_body_mb <= 0 or args.graceful_timeout < 0:
        raise RosettaError("--max-wait-ms, --max-body-mb and --graceful-timeout must be positive")
    settings = Settings(
        api_key=args.api_key or os.environ.get("ROSETTA_API_KEY") or None,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, batching=not args.no_batching,
        cors_origins=tuple(args.cors_origin), cache_size=args.cache_size,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_items=args.max_items,
        max_new_tokens=args.max_new_tokens, max_sequences=args.max_sequences, compile=args.compile,
        allow_remote_images=args.allow_remote_images,
    )
    sock = _listen(args.host, args.port)  # bound before the model loads: a busy port fails fast
    model = model_from_args(args)
    store = None
    if args.store:
        from rosetta.serve.app import capabilities
        from rosetta.store import open_store
        from rosetta.store.index import model_name

        if "embed" not in capabilities(model):
            raise RosettaError(f"--store: {args.model} does not embed images or sounds, so it cannot search a store")
        store = open_store(args.store, model=model_name(model), dim=model.config.embed_dim)
    app = create_app(model, store, settings)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"rosetta serve: {args.model} on http://{shown}:{port}/ "
          f"(API key {'required' if settings.api_key else 'off'}, batching {'on' if settings.batching else 'off'})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.graceful_timeout,
                            access_log=False)
    # The model thread releases the GIL inside every torch op and needs it back between ops; with request
    # handling threads busy in Python, the default 5 ms switch interval makes it wait up to that long each time.
    sys.setswitchinterval(0.001)
    # On SIGTERM or Ctrl-C uvicorn stops accepting, lets the requests in flight finish (the model thread
    # answers every queued input), then re-raises the signal to the handler it found. Ours ignores it, so
    # that the store is closed and the exit status says the shutdown went as asked (0).
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if store is not None:
            store.close()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise RosettaError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
