"""`rosetta serve` with a model that answers by itself — a hosted one (against the fake vendors of
tests/fake_vendors.py) or OCR: OpenAI's chat completions (text and data: URL images, streamed or not, through
the `openai` SDK), /v1/caption, /v1/ask and /v1/extract through the model, and the vendor's failures (429s,
500s, timeouts, malformed replies, a refused or missing key) as JSON errors, never a crash."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import serving
from fake_vendors import Scripted, fake_vendor, sent_images
from PIL import Image, ImageDraw

from rosetta.hosted import load_hosted
from rosetta.serve import Settings, create_app

openai = pytest.importorskip("openai")
pytest.importorskip("anthropic")
pytest.importorskip("google.genai")

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash"}
KEY = "sk-secret-test-key-123"
REPLY = "a red square on a white background"
SCHEMA = {"type": "object", "properties": {"total": {"type": "number"}, "vendor": {"type": "string"}},
          "required": ["total", "vendor"], "additionalProperties": False}


def png(colour=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(blob: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(blob).decode()


def image_message(text: str, blob: bytes | None = None) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(blob or png())}},
                                        {"type": "text", "text": text}]}


@pytest.fixture()
def hosted_server(request, tmp_path):
    """(fake vendor, server URL) for `vendor` (default openai); retries sleep for nothing."""
    vendor = getattr(request, "param", "openai")
    with fake_vendor(vendor) as fake:
        base_url = f"{fake.url}/v1" if vendor == "openai" else fake.url
        model = load_hosted(f"{vendor}:{MODELS[vendor]}", api_key=KEY, base_url=base_url, cache=tmp_path / "cache",
                            timeout=0.5, max_retries=2, sleep=lambda seconds: None)
        with serving(create_app(model, None, Settings(max_new_tokens=512))) as url:
            yield fake, url


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)


@pytest.mark.parametrize("hosted_server", list(MODELS), indirect=True)
def test_chat_completions_go_to_the_vendor_with_their_images(hosted_server):
    fake, url = hosted_server
    reply = client(url).chat.completions.create(
        model="ignored", messages=[{"role": "system", "content": "Be brief."}, image_message("Describe it.")],
        max_tokens=40, temperature=0)
    assert reply.choices[0].message.content == REPLY and reply.choices[0].finish_reason == "stop"
    assert reply.model == f"{fake.vendor}:{MODELS[fake.vendor]}"
    assert reply.usage.prompt_tokens == 1200 and reply.usage.completion_tokens == 30
    (sent,) = fake.requests
    assert "Be brief." in str(sent["body"]) and "Describe it." in str(sent["body"])
    assert sent["body"].get("generationConfig", sent["body"])["temperature"] == 0  # Gemini's sits in its config
    (image,) = sent_images(fake, sent)
    assert Image.open(io.BytesIO(image)).getpixel((5, 5)) == (255, 0, 0)
    models = client(url).models.list()
    assert [m.id for m in models.data] == [f"{fake.vendor}:{MODELS[fake.vendor]}"]


def test_text_chat_streams_the_whole_reply(hosted_server):
    fake, url = hosted_server
    chunks = list(client(url).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say something."}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens == 1200
    assert fake.requests[0]["body"]["messages"][-1]["content"][-1]["text"] == "Say something."


def test_structured_output_through_chat_and_extract(hosted_server):
    fake, url = hosted_server
    fake.script = [Scripted(fields={"total": 12.5, "vendor": "ACME"})]
    reply = client(url).chat.completions.create(
        model="gpt-4o", messages=[image_message("Read it.")],
        response_format={"type": "json_schema", "json_schema": {"name": "fields", "schema": SCHEMA}})
    assert reply.choices[0].message.content == '{"total": 12.5, "vendor": "ACME"}'
    assert fake.requests[-1]["body"]["response_format"]["json_schema"]["schema"] == SCHEMA
    fake.script = [Scripted(fields={"total": "twelve"}), Scripted(fields={"total": 3.0, "vendor": "Shop"})]
    got = httpx.post(f"{url}/v1/extract", json={"images": [data_url(png())], "schema": SCHEMA}, timeout=30)
    assert got.status_code == 200, got.text
    assert got.json()["fields"] == [{"total": 3.0, "vendor": "Shop"}]  # the reply that did not validate: asked again


def test_caption_and_ask_go_to_the_vendor(hosted_server):
    fake, url = hosted_server
    got = httpx.post(f"{url}/v1/caption", json={"images": [data_url(png()), data_url(png((0, 0, 255)))]},
                     timeout=30)
    assert got.status_code == 200, got.text
    assert got.json()["captions"] == [REPLY, REPLY] and len(fake.requests) == 2
    got = httpx.post(f"{url}/v1/ask", json={"images": [data_url(png())], "question": "Which colour?"}, timeout=30)
    assert got.status_code == 200 and got.json()["answer"] == REPLY
    assert "Which colour?" in str(fake.requests[-1]["body"])


@pytest.mark.parametrize("script, words", [
    ([Scripted(status=429, headers={"Retry-After": "0"})] * 3, "429"),
    ([Scripted(status=500)] * 3, "gave up after 3 tries"),
    ([Scripted(delay=2.0)] * 3, "timed out"),
    ([Scripted(body=b"<html>oops</html>")] * 3, "malformed"),
    ([Scripted(status=401)], "API key was refused"),
], ids=["429-storm", "500s", "timeouts", "malformed", "refused-key"])
def test_vendor_failures_are_json_errors(hosted_server, script, words):
    fake, url = hosted_server
    for path, body in (("/v1/chat/completions", {"messages": [image_message("Colour?")]}),
                       ("/v1/ask", {"images": [data_url(png())], "question": "Colour?"})):
        fake.script = list(script)
        got = httpx.post(f"{url}{path}", json=body, timeout=30)
        assert got.status_code == 502, got.text
        error = got.json()["error"]
        assert error["code"] == "upstream_error" and words in error["message"] and KEY not in error["message"]


def test_a_vendor_error_retried_away_is_an_answer(hosted_server):
    fake, url = hosted_server
    fake.script = [Scripted(status=503), Scripted(status=429)]
    got = httpx.post(f"{url}/v1/chat/completions", json={"messages": [image_message("Colour?")]}, timeout=30)
    assert got.status_code == 200 and got.json()["choices"][0]["message"]["content"] == REPLY
    assert len(fake.requests) == 3


@pytest.mark.parametrize("body, status, words", [
    ({"messages": [image_message("?", b"not an image")]}, 422, "image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x"}},
                                                {"type": "text", "text": "?"}]}]}, 422, "data: URLs"),
    ({"messages": [image_message("?")], "n": 2}, 422, "n=2"),
    ({"messages": [image_message("?")], "max_tokens": 100_000}, 422, "limit"),
    ({"messages": [image_message("?")], "response_format": {"type": "json_schema",
                                                            "json_schema": {"schema": {"type": "nonsense"}}}},
     422, "schema"),
])
def test_bad_requests_are_4xx_and_reach_no_vendor(hosted_server, body, status, words):
    fake, url = hosted_server
    got = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert got.status_code == status, got.text
    assert words in got.json()["error"]["message"]
    assert not fake.requests


def test_the_page_is_served_and_offers_the_image_panel(hosted_server):
    _, url = hosted_server
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and 'id="vision-card"' in page.text
    assert httpx.get(f"{url}/v1/info", timeout=30).json()["capabilities"] == ["see"]
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hi"}, timeout=30).status_code == 404


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs Debian's tesseract-ocr")
def test_ocr_answers_through_the_server():
    from rosetta.vlm.ocr import OcrModel

    page = Image.new("RGB", (360, 80), "white")
    ImageDraw.Draw(page).text((10, 30), "Total 12.50", fill="black", font_size=28)
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")
    image = data_url(buffer.getvalue())
    with serving(create_app(OcrModel(), None, Settings())) as url:
        got = httpx.post(f"{url}/v1/caption", json={"images": [image]}, timeout=60)
        assert got.status_code == 200, got.text
        assert "Total" in got.json()["captions"][0]
        got = httpx.post(f"{url}/v1/ask", json={"images": [image], "question": "What is the total?"}, timeout=60)
        assert got.status_code == 200 and "12" in got.json()["answer"]
        got = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]},
                         timeout=60)
        assert got.status_code == 422 and "no image" in got.json()["error"]["message"]


def test_rosetta_serve_a_hosted_model(tmp_path):
    """The command itself: the key and base URL from the vendor's variables; without a key, one line."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ROSETTA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "rosetta", "serve", "--model", "openai:gpt-4o", "--port", "0"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "OPENAI_API_KEY" in done.stderr
    with fake_vendor("openai") as fake:
        env |= {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": f"{fake.url}/v1"}
        proc = subprocess.Popen([sys.executable, "-m", "rosetta", "serve", "--model", "openai:gpt-4o", "--port", "0"],
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        try:
            line = proc.stderr.readline()
            match = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            assert match, line
            reply = client(match.group(1)).chat.completions.create(model="gpt-4o", messages=[image_message("Hi")])
            assert reply.choices[0].message.content == REPLY
            assert fake.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
        finally:
            proc.kill()
            proc.wait(30)
    assert os.listdir(tmp_path / "cache" / "hosted")  # the reply was cached where ROSETTA_CACHE says
