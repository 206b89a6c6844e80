"""Server throughput with dynamic micro-batching on vs off: single-image embed requests from concurrent clients.

    python benchmarks/serve.py                    # random-init ViT-B/32, 32 clients, 2 x 30 s per mode
    python benchmarks/serve.py --tiny --duration 10
    python benchmarks/serve.py --clients 64 --max-batch 64 --device cuda

Starts `rosetta serve --random-init` on 127.0.0.1 in a subprocess, once with batching and once with
`--no-batching` (the cache off both times, and every request a different image, so every request
costs a forward pass). Clients are asyncio tasks, each on its own kept-alive connection sending prebuilt
HTTP requests, the next as soon as the last response is read: a load generator as light as wrk's, since it
shares the CPU with the server. Prints requests/s, latency percentiles and the mean batch
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


def embed_request(host: str, image: bytes) -> bytes:
    """A whole HTTP/1.1 request posting one image to /v1/embed, built once: the load generator shares the two
    cores with the server, so each request must cost it next to nothing (httpx spends ~1 ms of CPU on one)."""
    boundary = "rosetta-bench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/embed HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on a kept-alive connection; read the whole response; its status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    await reader.readexactly(length)
    return int(head.split(None, 2)[1])


async def load(url: str, pid: int, pool: list[bytes], clients: int, warmup: float,
               duration: float) -> dict[str, float]:
    import httpx

    host = url.removeprefix("http://")
    address, port = host.rsplit(":", 1)
    requests = [embed_request(host, image) for image in pool]
    latencies: list[float] = []
    errors = 0
    counter = 0
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
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
            reader, writer = await asyncio.open_connection(address, int(port))
            try:
                while (now := time.perf_counter()) < stop_at:
                    counter += 1
                    status = await exchange(reader, writer, requests[counter % len(requests)])
                    done = time.perf_counter()
                    if status != 200:
                        errors += 1
                    elif measure_from <= done <= stop_at:  # throughput: completions inside the window
                        latencies.append(done - now)
            finally:
                writer.close()

        cpu, *_ = await asyncio.gather(mark_cpu(), *(client_loop() for _ in range(clients)))
        metrics = (await client.get("/metrics")).text
    count = _sample(metrics, "rosetta_batch_size_count", "image")
    total = _sample(metrics, "rosetta_batch_size_sum", "image")
    lat = np.asarray(latencies) * 1000
    return {"rps": len(latencies) / duration, "per_cpu_s": len(latencies) / (cpu[1] - cpu[0]), "errors": errors,
            "p50": np.percentile(lat, 50),
            "p95": np.percentile(lat, 95), "p99": np.percentile(lat, 99), "batch": total / max(count, 1)}


def embed_baseline(args: argparse.Namespace, pool: list[bytes], seconds: float) -> float:
    """Images/s of `embed_images` at the server's batch size on the same JPEGs (decoding and preprocessing
    included, as in the server), same model and dtype, in this process while no server runs."""
    import torch

    import rosetta
    from rosetta.models.io import place

    rosetta.keep_freed_memory()  # as `rosetta serve` does
    model = place(rosetta.create("tiny" if args.tiny else "vit-b-32").eval(), args.device, "auto")
    batch = min(args.max_batch, len(pool) // 2)
    with torch.inference_mode():
        model.embed_images(pool[:batch], batch_size=batch)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            first = done % (len(pool) - batch + 1)
            model.embed_images(pool[first : first + batch], batch_size=batch)
            done += batch
    return done / (time.perf_counter() - start)


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

    from rosetta.models.io import cpu_isa, cpuinfo

    pool = images(max(256, 4 * args.clients), 32 if args.tiny else 224)
    print(f"cpu: {cpuinfo('model name') or '?'} ({cpu_isa()}), {os.cpu_count()} cores; dtype auto")
    print(f"model: {'tiny' if args.tiny else 'vit-b-32'} (random init), device: {args.device}, clients: "
          f"{args.clients}, single-image /v1/embed requests, cache off, {args.rounds} rounds of "
          f"{args.duration:.0f} s per mode")
    # The baseline before and after the servers, the higher one judged: the VM's speed drifts over minutes.
    baselines = [embed_baseline(args, pool, seconds=args.duration)]
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
    baselines.append(embed_baseline(args, pool, seconds=args.duration))
    baseline = max(baselines)
    print(f"embed_images at batch {args.max_batch} in one process (no server, same JPEGs): "
          f"{' and '.join(f'{b:.1f}' for b in baselines)} images/s before and after the servers; the server with "
          f"batching reaches {on / baseline:.0%} of the higher (target: >= 85% on a CPU)")


if __name__ == "__main__":
    main()
