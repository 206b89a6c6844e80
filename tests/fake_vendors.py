"""Local fake servers on 127.0.0.1 that speak OpenAI's, Anthropic's and Gemini's wire formats, for the tests of
the hosted models: each answers from a script (statuses, Retry-After headers, delays, malformed bodies), then
with a well-formed reply, and records every request it got."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Scripted:
    status: int = 200
    body: Any = None  # None: a well-formed reply of `text`; a dict: sent as it is; bytes: sent raw
    text: str = "a red square on a white background"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (timeouts)
    fields: dict | None = None  # a structured answer (extract)


@dataclass
class Fake:
    vendor: str
    url: str
    script: list[Scripted] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)  # {"path", "headers", "body"}


def reply_body(vendor: str, s: Scripted, request: dict) -> dict:
    text = json.dumps(s.fields) if s.fields is not None else s.text
    if vendor == "openai":
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": request.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1200, "completion_tokens": 30, "total_tokens": 1230}}
    if vendor == "anthropic":
        content = ([{"type": "tool_use", "id": "toolu_1", "name": "record_fields", "input": s.fields}]
                   if s.fields is not None else [{"type": "text", "text": text}])
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": request.get("model"),
                "content": content, "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 1200, "output_tokens": 30}}
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP",
                            "index": 0}],
            "usageMetadata": {"promptTokenCount": 1200, "candidatesTokenCount": 30, "totalTokenCount": 1230}}


@contextlib.contextmanager
def fake_vendor(vendor: str) -> Iterator[Fake]:
    fake = Fake(vendor, "")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
            fake.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                  "body": body})
            s = fake.script.pop(0) if fake.script else Scripted()
            if s.delay:
                time.sleep(s.delay)
            if s.status != 200:
                payload = {"error": {"message": f"scripted {s.status}", "type": "error", "code": s.status}}
            else:
                payload = s.body if s.body is not None else reply_body(vendor, s, body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(s.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in s.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def sent_images(fake: Fake, request: dict) -> list[bytes]:
    """The images a request carried, decoded from the vendor's format."""
    body, found = request["body"], []
    if fake.vendor == "openai":
        for m in body["messages"]:
            for p in m["content"] if isinstance(m["content"], list) else []:
                if p["type"] == "image_url":
                    found.append(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))
    elif fake.vendor == "anthropic":
        for m in body["messages"]:
            found += [base64.b64decode(b["source"]["data"]) for b in m["content"] if b["type"] == "image"]
    else:
        for c in body["contents"]:
            found += [_b64(p["inlineData"]["data"]) for p in c["parts"] if "inlineData" in p]
    return found


def _b64(data: str) -> bytes:  # google-genai sends the URL-safe alphabet, unpadded
    return base64.urlsafe_b64decode(data.replace("+", "-").replace("/", "_") + "=" * (-len(data) % 4))
