"""Server throughput with dynamic micro-batching on vs off: single-image embed requests from concurrent clients.

    python benchmarks/serve.py                    # random-init ViT-B/32, 32 clients, 2 x 30 s per mode
    python benchmarks/serve.py --tiny --duration 10
    python benchmarks/serve.py --clients 64 --max-batch 64 --device cuda

Starts `rosetta serve --random-init` on 127.0.0.1 in a subprocess, once with batching and once with
`--no-batching` (the cache off both times, and every request a different image, so every request
costs a forward pass). Clients are asyncio tasks sharing one httpx connection pool, each sending its
next request as soon as the last returns. Prints requests/s, latency percentiles and the mean batch
size the server reports, then the ratio on/off, and the same ratio per CPU-second the server used (steadier
than wall-clock numbers on a machine shared with other work).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np


def images(n: int, size: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def start(args: argparse.Namespace, batching: bool) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "rosetta", "serve", "--model", "tiny" if args.tiny else "vit-b-32",
               "--random-init", "--device", args.device, "--host", "127.0.0.1", "--port", "0",
               "--cache-size", "0", "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    if not batching:
        command.append("--no-batching")
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if match := re.search(r"on (http://127\.0\.0\.1:\d+)/", line):
            return proc, match.group(1)
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux), or NaN where /proc is not there."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, pid: int, pool: list[bytes], clients: int, warmup: float,
               duration: float) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        for _ in range(600):  # wait for the model to load
            try:
                if (await client.get("/healthz")).status_code == 200:
                    break
            except httpx.TransportError:
                await asyncio.sleep(0.2)
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + duration

        async def mark_cpu() -> tuple[float, float]:
            await asyncio.sleep(warmup)
            first = cpu_seconds(pid)
            await asyncio.sleep(duration)
            return first, cpu_seconds(pid)

        async def client_loop() -> None:
            nonlocal errors, counter
            while (now := time.perf_counter()) < stop_at:
                counter += 1
                image = pool[counter % len(pool)]
                r = await client.post("/v1/embed", files=[("images", ("x.jpg", image, "image/jpeg"))])
                done = time.perf_counter()
                if r.status_code != 200:
                    errors += 1
                elif measure_from <= done <= stop_at:  # throughput: completions inside the window
                    latencies.append(done - now)

        cpu, *_ = await asyncio.gather(mark_cpu(), *(client_loop() for _ in range(clients)))
        metrics = (await client.get("/metrics")).text
    count = _sample(metrics, "rosetta_batch_size_count", "image")
    total = _sample(metrics, "rosetta_batch_size_sum", "image")
    lat = np.asarray(latencies) * 1000
    return {"rps": len(latencies) / duration, "per_cpu_s": len(latencies) / (cpu[1] - cpu[0]), "errors": errors,
            "p50": np.percentile(lat, 50),
            "p95": np.percentile(lat, 95), "p99": np.percentile(lat, 99), "batch": total / max(count, 1)}


def _sample(text: str, name: str, modality: str) -> float:
    match = re.search(rf'^{name}{{modality="{modality}"}} ([\d.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny 32px model instead of ViT-B/32")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per mode and round")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2, help="on/off pairs, alternated to even out drift")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    pool = images(max(256, 4 * args.clients), 32 if args.tiny else 224)
    print(f"model: {'tiny' if args.tiny else 'vit-b-32'} (random init), device: {args.device}, clients: "
          f"{args.clients}, single-image /v1/embed requests, cache off, {args.rounds} rounds of "
          f"{args.duration:.0f} s per mode")
    totals = {True: 0.0, False: 0.0}
    per_cpu = {True: 0.0, False: 0.0}
    for round_ in range(args.rounds):
        for batching in (True, False):
            proc, url = start(args, batching)
            try:
                r = asyncio.run(load(url, proc.pid, pool, args.clients, args.warmup, args.duration))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
            totals[batching] += r["rps"]
            per_cpu[batching] += r["per_cpu_s"]
            print(f"round {round_ + 1} batching {'on ' if batching else 'off'}: {r['rps']:7.1f} req/s   "
                  f"p50 {r['p50']:6.0f} ms   p95 {r['p95']:6.0f} ms   p99 {r['p99']:6.0f} ms   "
                  f"mean batch {r['batch']:5.1f}   {r['per_cpu_s']:5.2f} req per server CPU-s   errors {r['errors']}",
                  flush=True)
    on, off = totals[True] / args.rounds, totals[False] / args.rounds
    print(f"mean: batching on {on:.1f} req/s, off {off:.1f} req/s; throughput ratio on/off: x{on / max(off, 1e-9):.2f}")
    # On a shared machine wall-clock throughput follows the neighbours' load; work per CPU-second does not.
    print(f"requests per server CPU-second, ratio on/off: x{per_cpu[True] / max(per_cpu[False], 1e-9):.2f}")


if __name__ == "__main__":
    main()
