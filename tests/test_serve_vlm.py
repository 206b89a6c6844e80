"""`rosetta serve` with a vision-language model: images in OpenAI's chat completions (through the `openai` SDK),
/v1/caption, /v1/ask and /v1/extract, answers equal to the model's own, remote image URLs refused unless
allowed, and the 4xx answers to bad images and schemas."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import httpx
import jsonschema
import pytest
import torch
from conftest import serving
from PIL import Image

import rosetta
from rosetta.models.vlm import user
from rosetta.serve import Settings, create_app

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread")


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))


def data_url(blob: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(blob).decode()


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return rosetta.create("tiny-vlm").eval()


@pytest.fixture(scope="module")
def server(vlm):
    with serving(create_app(vlm, None, Settings(model_name="tiny-vlm", max_sequences=4))) as url:
        yield url


@pytest.fixture(scope="module")
def image_host():
    """A local web server with one image on it, for the remote-URL cases."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(BLUE)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/blue.png"
    httpd.shutdown()


def test_chat_completions_read_images_like_the_model(server, vlm):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)
    content = [{"type": "image_url", "image_url": {"url": data_url(RED)}}, {"type": "text", "text": "Colour?"}]
    reply = client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": content}],
                                           max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == vlm.ask(Image.open(io.BytesIO(RED)), "Colour?", max_new_tokens=12)
    ids, _ = vlm.prompt([user(Image.open(io.BytesIO(RED)), "Colour?")])
    assert reply.usage.prompt_tokens == len(ids)  # the image's tokens count


def test_streaming_with_images(server, vlm):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)
    content = [{"type": "image_url", "image_url": {"url": data_url(BLUE)}}, {"type": "text", "text": "Colour?"}]
    chunks = client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": content}],
                                            max_tokens=10, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == vlm.ask(Image.open(io.BytesIO(BLUE)), "Colour?", max_new_tokens=10)


def test_caption_ask_and_extract_endpoints(server, vlm):
    red, blue = Image.open(io.BytesIO(RED)), Image.open(io.BytesIO(BLUE))
    got = httpx.post(f"{server}/v1/caption", json={"images": [data_url(RED), base64.b64encode(BLUE).decode()],
                                                   "max_tokens": 8}, timeout=60)
    assert got.status_code == 200, got.text
    assert got.json()["captions"] == vlm.caption([red, blue], max_new_tokens=8)
    got = httpx.post(f"{server}/v1/ask", json={"images": [data_url(RED), data_url(BLUE)], "question": "Same?",
                                               "max_tokens": 6}, timeout=60)
    assert got.status_code == 200 and got.json()["answer"] == vlm.ask([red, blue], "Same?", max_new_tokens=6)
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}, "shapes": {"type": "boolean"}},
              "required": ["colour", "shapes"], "additionalProperties": False}
    got = httpx.post(f"{server}/v1/extract", json={"images": [data_url(RED)], "schema": schema, "max_tokens": 64},
                     timeout=60)
    assert got.status_code == 200, got.text
    (fields,) = got.json()["fields"]
    jsonschema.validate(fields, schema)


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/caption", {"images": ["bm90IGFuIGltYWdl"]}, 422, "image"),  # base64 of "not an image"
    ("/v1/caption", {"images": []}, 422, "images"),
    ("/v1/ask", {"images": [data_url(RED)] * 40, "question": "?"}, 422, "context window"),
    ("/v1/extract", {"images": [data_url(RED)], "schema": {"type": "nonsense"}}, 422, "schema"),
    ("/v1/ask", {"images": ["http://127.0.0.1:9/x.png"], "question": "?"}, 422, "data: URLs"),
])
def test_bad_requests_are_4xx_json(server, path, body, status, words):
    got = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert got.status_code == status, got.text
    assert words in got.json()["error"]["message"]


def test_remote_image_urls_are_refused_unless_allowed(vlm, image_host):
    content = [{"type": "image_url", "image_url": {"url": image_host}}, {"type": "text", "text": "Colour?"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}
    with serving(create_app(vlm, None, Settings())) as url:
        got = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert got.status_code == 422 and "data: URLs" in got.json()["error"]["message"]
    with serving(create_app(vlm, None, Settings(allow_remote_images=True))) as url:
        got = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert got.status_code == 200, got.text
        expected = vlm.ask(Image.open(io.BytesIO(BLUE)), "Colour?", max_new_tokens=6)
        assert got.json()["choices"][0]["message"]["content"] == expected


def test_a_text_model_refuses_images():
    torch.manual_seed(0)
    with serving(create_app(rosetta.create("tiny-lm").eval(), None, Settings())) as url:
        content = [{"type": "image_url", "image_url": {"url": data_url(RED)}}, {"type": "text", "text": "Hi"}]
        got = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]},
                         timeout=60)
        assert got.status_code == 422 and "does not read images" in got.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/caption", json={"images": [data_url(RED)]}, timeout=60).status_code == 404
