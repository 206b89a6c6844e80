"""`rosetta serve` as a real process on 127.0.0.1: flags, startup errors, API key from the environment,
graceful shutdown on SIGTERM, and (slow) the bounded locust load test."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--random-init", "--device", "cpu"]


def start_server(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start `rosetta serve` on a free port of 127.0.0.1; return the process and its base URL once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "rosetta", "serve", *TINY, "--port", "0", *args],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    lines = []
    for line in proc.stderr:  # the first line names the address; uvicorn logs nothing else at level warning
        lines.append(line)
        if match := re.search(r"on (http://127\.0\.0\.1:\d+)/", line):
            url = match.group(1)
            break
    else:
        proc.wait(30)
        raise AssertionError(f"server did not start (exit {proc.returncode}):\n{''.join(lines)}")
    deadline = time.monotonic() + 120
    while True:  # the socket is bound before the model loads: wait until it answers
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server never became healthy: {proc.stderr.read()}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def test_help_names_every_flag():
    out = subprocess.run([sys.executable, "-m", "rosetta", "serve", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0
    for flag in ("--model", "--store", "--host", "--port", "--api-key", "--max-batch", "--max-wait-ms",
                 "--no-batching", "--cors-origin", "--random-init"):
        assert flag in out.stdout, flag
    assert "ROSETTA_API_KEY" in out.stdout


def test_a_busy_port_is_one_line_and_exit_2():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "rosetta", "serve", *TINY, "--port", str(port)],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "cannot listen" in out.stderr and "Traceback" not in out.stderr


def test_sigterm_lets_the_request_in_flight_finish(tmp_path):
    proc, url = start_server("--store", str(tmp_path / "store"), env={"ROSETTA_API_KEY": "from-env"})
    try:
        assert httpx.post(f"{url}/v1/embed", json={"texts": ["a"]}).status_code == 401
        host, port = url.removeprefix("http://").split(":")

        def body():
            yield b'{"texts": ["a dog on a beach", '
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # shutdown has begun once the listening socket is closed
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                except OSError:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the server kept accepting connections after SIGTERM")
            yield b'"a cat"]}'

        r = httpx.post(f"{url}/v1/embed", content=body(), timeout=60,
                       headers={"content-type": "application/json", "X-API-Key": "from-env"})
        assert r.status_code == 200, r.text
        assert len(r.json()["text_embeddings"]) == 2
        assert proc.wait(60) == 0  # and then it exits cleanly
    finally:
        stop(proc)


@pytest.mark.slow
def test_load_test_has_no_errors():
    """locust headless, 8 users for 30 s against a real server: zero failures, and the numbers are printed."""
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "load" / "locustfile.py")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    print(out.stdout[-3000:], out.stderr[-3000:])
    assert out.returncode == 0
    summary = re.search(r"requests (\d+), failures (\d+), ([\d.]+) req/s, p50 (\d+) ms, p95 (\d+) ms, p99 (\d+) ms",
                        out.stdout)
    assert summary, out.stdout
    assert int(summary.group(1)) > 0 and int(summary.group(2)) == 0
