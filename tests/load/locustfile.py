"""Load test of `rosetta serve`: embed (texts, images), classify and search, as a mix of users would.

    .venv/bin/python tests/load/locustfile.py                  # starts a tiny server, 8 users for 30 s
    .venv/bin/python tests/load/locustfile.py --users 16 --run-time 60s
    .venv/bin/python tests/load/locustfile.py --host http://127.0.0.1:8000   # against a running server
    .venv/bin/locust -f tests/load/locustfile.py --host http://127.0.0.1:8000 # locust's own UI/CLI

Run as a script, it starts `rosetta serve --model tiny --random-init` on 127.0.0.1 (a free port)
with a small store, runs locust headless for a bounded time, prints requests, failures, throughput
and p50/p95/p99 latency, and exits 1 if any request failed. The API key, if any, is read from
ROSETTA_API_KEY.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEY_ENV = "ROSETTA_API_KEY"
WORDS = ["dog", "cat", "car", "beach", "forest", "city", "night", "red", "blue", "small", "old", "bird", "boat"]


def _png(seed: int, size: int = 48) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size + seed % 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _start_server(store: Path, key: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "rosetta", "serve", "--model", "tiny", "--random-init", "--device", "cpu",
               "--host", "127.0.0.1", "--port", "0", "--store", str(store)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, KEY_ENV: key})
    for line in proc.stderr:
        if match := re.search(r"on (http://127\.0\.0\.1:\d+)/", line):
            return proc, match.group(1)
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server never became healthy")


def _summary(csv_prefix: str, seconds: float) -> dict[str, float]:
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    return {"requests": int(total["Request Count"]), "failures": int(total["Failure Count"]),
            "rps": int(total["Request Count"]) / seconds, "p50": float(total["50%"]),
            "p95": float(total["95%"]), "p99": float(total["99%"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="a running server (default: start a tiny one on 127.0.0.1)")
    parser.add_argument("--users", "-u", type=int, default=8)
    parser.add_argument("--spawn-rate", "-r", type=float, default=8)
    parser.add_argument("--run-time", "-t", default="30s", help="bounded run time, e.g. 30s, 2m (default: 30s)")
    args = parser.parse_args(argv)

    import httpx

    proc = None
    with tempfile.TemporaryDirectory(prefix="rosetta-load-") as tmp:
        try:
            url = args.host
            if url is None:
                os.environ.setdefault(KEY_ENV, "load-test-key")
                proc, url = _start_server(Path(tmp) / "store", os.environ[KEY_ENV])
                _wait_healthy(url, proc)
                files = [("files", (f"seed{i}.png", _png(1000 + i), "image/png")) for i in range(16)]
                r = httpx.post(f"{url}/v1/index", files=files, headers={"X-API-Key": os.environ[KEY_ENV]}, timeout=120)
                r.raise_for_status()
            prefix = str(Path(tmp) / "locust")
            command = [sys.executable, "-m", "locust", "-f", __file__, "--headless", "-u", str(args.users),
                       "-r", str(args.spawn_rate), "-t", args.run_time, "--host", url, "--csv", prefix,
                       "--only-summary", "--stop-timeout", "10", "--loglevel", "WARNING"]
            started = time.monotonic()
            locust = subprocess.run(command, capture_output=True, text=True, timeout=_seconds(args.run_time) + 120)
            elapsed = time.monotonic() - started
            stats = _summary(prefix, min(elapsed, _seconds(args.run_time)))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if locust.returncode not in (0, 1):
        print(locust.stderr[-4000:], file=sys.stderr)
    print(f"load test ({args.users} users, {args.run_time}): requests {stats['requests']}, "
          f"failures {stats['failures']}, {stats['rps']:.1f} req/s, p50 {stats['p50']:.0f} ms, "
          f"p95 {stats['p95']:.0f} ms, p99 {stats['p99']:.0f} ms")
    if stats["failures"]:
        print(locust.stdout[-4000:], locust.stderr[-4000:], sep="\n", file=sys.stderr)
    return 0 if stats["requests"] > 0 and stats["failures"] == 0 else 1


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", text)) or float(text)


if __name__ == "__main__":  # the runner: never imports locust (which patches the process with gevent)
    sys.exit(main())


# What locust runs (`locust -f` imports this module; the runner above has exited by now when run as a script).

from locust import HttpUser, constant, task  # noqa: E402

IMAGES = [_png(seed) for seed in range(32)]


class RosettaUser(HttpUser):
    wait_time = constant(0)  # closed loop: each user sends its next request as soon as one returns

    def on_start(self) -> None:
        key = os.environ.get(KEY_ENV)
        if key:
            self.client.headers["X-API-Key"] = key

    def _text(self) -> str:
        return " ".join(random.choices(WORDS, k=3))

    @task(4)
    def embed_texts(self) -> None:
        self.client.post("/v1/embed", json={"texts": [self._text() for _ in range(random.randint(1, 4))]})

    @task(4)
    def embed_image(self) -> None:
        self.client.post("/v1/embed", files=[("images", ("q.png", random.choice(IMAGES), "image/png"))])

    @task(2)
    def classify(self) -> None:
        self.client.post("/v1/classify", data={"labels": "dog,cat,car,boat"},
                         files={"image": ("c.png", random.choice(IMAGES), "image/png")})

    @task(2)
    def search_text(self) -> None:
        self.client.post("/v1/search", json={"text": self._text(), "k": 8})

    @task(1)
    def search_image(self) -> None:
        self.client.post("/v1/search", data={"k": "8"}, files={"image": ("s.png", random.choice(IMAGES))})

    @task(1)
    def healthz(self) -> None:
        self.client.get("/healthz")
