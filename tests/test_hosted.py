"""Hosted vision-language models (OpenAI, Anthropic, Gemini) through their official SDKs, against local fake
servers speaking each wire format: the same calls as a local model, images sent as the vendor wants them,
structured output validated (and asked again once), the response cache, retries on 429 storms, 500s,
timeouts and malformed replies (Retry-After honoured), usage and cost, the bad-key line, the CLI and server."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import pytest
from fake_vendors import Scripted, fake_vendor, sent_images
from PIL import Image

import rosetta
from rosetta.errors import InputError, RosettaError
from rosetta.hosted import load_hosted

pytest.importorskip("openai")
pytest.importorskip("anthropic")
pytest.importorskip("google.genai")

MODELS = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash"}
KEY = "sk-secret-test-key-123"
SCHEMA = {"type": "object", "properties": {"total": {"type": "number"}, "vendor": {"type": "string"}},
          "required": ["total", "vendor"], "additionalProperties": False}


@pytest.fixture(params=list(MODELS))
def vendor(request):
    with fake_vendor(request.param) as fake:
        yield fake


def base_url(fake) -> str:
    return f"{fake.url}/v1" if fake.vendor == "openai" else fake.url


def hosted(fake, tmp_path, **options):
    slept: list[float] = []
    options = {"cache": tmp_path / "cache", **options}
    model = load_hosted(f"{fake.vendor}:{MODELS[fake.vendor]}", api_key=KEY, base_url=base_url(fake),
                        sleep=slept.append, **options)
    return model, slept


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (255, 0, 0)).save(path)
    return path


def sent_key(fake, request: dict) -> str:
    headers = request["headers"]
    own = {"openai": None, "anthropic": "x-api-key", "gemini": "x-goog-api-key"}[fake.vendor]
    return headers.get(own) or headers["authorization"].removeprefix("Bearer ")  # SDK versions differ


def test_ask_sends_the_image_the_question_and_the_key(vendor, tmp_path, photo):
    model, _ = hosted(vendor, tmp_path)
    assert model.ask(photo, "What colour is the square?") == "a red square on a white background"
    (request,) = vendor.requests
    (image,) = sent_images(vendor, request)
    assert Image.open(io.BytesIO(image)).getpixel((5, 5)) == (255, 0, 0)
    assert "What colour is the square?" in json.dumps(request["body"])
    assert sent_key(vendor, request) == KEY and KEY not in repr(model)
    assert model.last_usage.calls == 1 and model.last_usage.input_tokens == 1200


def test_caption_and_chat_use_the_same_calls(vendor, tmp_path, photo):
    model, _ = hosted(vendor, tmp_path)
    assert model.caption([photo, photo], max_new_tokens=20) == ["a red square on a white background"] * 2
    url = "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe it."}]}]
    assert model.chat(messages) == "a red square on a white background"
    body = json.dumps(vendor.requests[-1]["body"])
    assert "Be brief." in body and "Describe it." in body


def test_the_cache_answers_a_repeat_and_survives_the_process(vendor, tmp_path, photo):
    model, _ = hosted(vendor, tmp_path)
    model.ask(photo, "Colour?")
    model.ask(photo, "Colour?")
    assert len(vendor.requests) == 1 and model.usage.cached == 1
    again, _ = hosted(vendor, tmp_path)  # a new object on the same cache directory: a rerun costs nothing
    again.ask(photo, "Colour?")
    assert len(vendor.requests) == 1
    blue = tmp_path / "blue.png"
    Image.new("RGB", (64, 48), (0, 0, 255)).save(blue)
    again.ask(blue, "Colour?")  # another image's content: another request
    assert len(vendor.requests) == 2


def test_a_429_storm_is_retried_honouring_retry_after(vendor, tmp_path, photo):
    vendor.script = [Scripted(status=429, headers={"Retry-After": "3"}) for _ in range(3)]
    model, slept = hosted(vendor, tmp_path)
    assert model.ask(photo, "Colour?") == "a red square on a white background"
    assert len(vendor.requests) == 4 and model.last_usage.retries == 3
    assert len(slept) == 3 and all(s >= 3 for s in slept)


def test_server_errors_back_off_exponentially_then_give_up(vendor, tmp_path, photo):
    vendor.script = [Scripted(status=500), Scripted(status=503)]
    model, slept = hosted(vendor, tmp_path)
    assert model.ask(photo, "Colour?") == "a red square on a white background"
    assert len(slept) == 2 and slept[1] > slept[0] * 0.6  # jittered, growing
    vendor.script = [Scripted(status=500) for _ in range(10)]
    with pytest.raises(RosettaError, match="gave up after 3 tries"):
        hosted(vendor, tmp_path, max_retries=2, cache=False)[0].ask(photo, "Another?")


def test_timeouts_and_malformed_replies_are_retried(vendor, tmp_path, photo):
    vendor.script = [Scripted(delay=2.0), Scripted(body={"unexpected": True}), Scripted(body=b"<html>oops</html>")]
    model, slept = hosted(vendor, tmp_path, timeout=0.5)
    assert model.ask(photo, "Colour?") == "a red square on a white background"
    assert len(vendor.requests) == 4 and len(slept) == 3


def test_a_refused_key_is_one_line_and_not_retried(vendor, tmp_path, photo):
    vendor.script = [Scripted(status=401)]
    model, slept = hosted(vendor, tmp_path)
    with pytest.raises(RosettaError, match="API key was refused") as e:
        model.ask(photo, "Colour?")
    assert "\n" not in str(e.value) and KEY not in str(e.value)
    assert len(vendor.requests) == 1 and not slept


def test_no_key_names_the_variable(monkeypatch):
    for variable in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    for name, variable in (("openai:gpt-4o", "OPENAI_API_KEY"), ("anthropic:claude-sonnet-4-5", "ANTHROPIC_API_KEY"),
                           ("gemini:gemini-2.5-flash", "GEMINI_API_KEY")):
        with pytest.raises(RosettaError, match=variable):
            rosetta.load(name)


def test_extract_uses_structured_output_and_validates(vendor, tmp_path, photo):
    vendor.script = [Scripted(fields={"total": "twelve"}), Scripted(fields={"total": 12.5, "vendor": "ACME"})]
    model, _ = hosted(vendor, tmp_path)
    assert model.extract(photo, SCHEMA) == {"total": 12.5, "vendor": "ACME"}
    assert len(vendor.requests) == 2  # the first reply did not validate: asked once more
    body = vendor.requests[0]["body"]
    if vendor.vendor == "openai":
        assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    elif vendor.vendor == "anthropic":
        assert body["tools"][0]["input_schema"] == SCHEMA and body["tool_choice"]["type"] == "tool"
    else:
        assert body["generationConfig"]["responseMimeType"] == "application/json"
        assert body["generationConfig"]["responseJsonSchema"] == SCHEMA
    vendor.script = [Scripted(fields={"total": 1}), Scripted(text="not json")]
    with pytest.raises(RosettaError, match="did not validate"):
        model.extract(photo, SCHEMA, prompt="Read it again: {schema}")
    with pytest.raises(InputError, match="not a valid JSON Schema"):
        model.extract(photo, {"type": "nonsense"})


def test_usage_and_cost_per_call_and_per_run(vendor, tmp_path, photo):
    model, _ = hosted(vendor, tmp_path, prices={MODELS[vendor.vendor]: (2.0, 10.0)})
    model.ask(photo, "One?")
    assert model.last_usage.cost_usd == pytest.approx((1200 * 2.0 + 30 * 10.0) / 1e6)
    model.ask(photo, "Two?")
    assert model.usage.calls == 2 and model.usage.cost_usd == pytest.approx(2 * (1200 * 2.0 + 30 * 10.0) / 1e6)
    unknown, _ = hosted(vendor, tmp_path, prices={})
    unknown.model = "a-model-without-a-price"
    unknown.ask(photo, "Three?")
    assert unknown.last_usage.cost_usd is None


def test_the_cli_takes_a_hosted_model(tmp_path, photo):
    with fake_vendor("openai") as fake:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OPENAI_API_KEY": KEY,
               "OPENAI_BASE_URL": f"{fake.url}/v1", "ROSETTA_CACHE": str(tmp_path / "cache")}
        done = subprocess.run([sys.executable, "-m", "rosetta", "ask", "--model", "openai:gpt-4o", str(photo),
                               "Colour?"], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"path": str(photo), "question": "Colour?",
                                           "answer": "a red square on a white background"}
        fake.script = [Scripted(status=401)]
        done = subprocess.run([sys.executable, "-m", "rosetta", "caption", "--model", "openai:gpt-4o", str(photo)],
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "API key was refused" in done.stderr
        assert KEY not in done.stderr


def test_the_server_serves_a_hosted_model(tmp_path, photo):
    from conftest import serving

    from rosetta.serve import Settings, create_app

    with fake_vendor("anthropic") as fake:
        model, _ = hosted(fake, tmp_path)
        with serving(create_app(model, None, Settings())) as url:
            data = "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()
            got = httpx.post(f"{url}/v1/caption", json={"images": [data]}, timeout=60)
            assert got.status_code == 200, got.text
            assert got.json()["captions"] == ["a red square on a white background"]
            assert got.json()["usage"]["prompt_tokens"] == 1200
            fake.script = [Scripted(status=401)]
            got = httpx.post(f"{url}/v1/ask", json={"images": [data], "question": "Again?"}, timeout=60)
            assert got.status_code == 502 and "API key was refused" in got.json()["error"]["message"]
