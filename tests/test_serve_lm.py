"""`rosetta serve` with a language model: OpenAI's chat and text completions through the `openai` SDK against
a real server on 127.0.0.1, streaming, JSON-schema response formats, continuous batching, a client that
disconnects mid-stream, API keys, metrics, and the 4xx answers to bad requests.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
import torch
from conftest import serving

import rosetta
from rosetta.serve import Settings, create_app

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return rosetta.create("tiny-lm").eval()


@pytest.fixture(scope="module")
def server(lm):
    """A real uvicorn server in a thread, on a free port of 127.0.0.1."""
    app = create_app(lm, None, Settings(model_name="tiny-lm", api_key=KEY, max_new_tokens=300, max_sequences=4))
    with serving(app) as url:
        yield url


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def metric(server: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server}/metrics", headers={"X-API-Key": KEY}).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_chat_completion_equals_the_models_own_reply(client, lm):
    reply = client.chat.completions.create(model="tiny-lm", messages=MESSAGES, max_tokens=24, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == lm.chat(MESSAGES, 24, temperature=0)
    assert reply.usage.prompt_tokens == len(lm.chat_prompt(MESSAGES))
    assert reply.usage.completion_tokens == 24 and choice.finish_reason == "length"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24
    assert reply.model == "tiny-lm" and reply.id.startswith("chatcmpl-")


def test_streamed_chat_is_the_same_text_and_ends_with_usage(client, lm, server):
    chunks = list(client.chat.completions.create(model="tiny-lm", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == lm.chat(MESSAGES, 24, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    raw = httpx.post(f"{server}/v1/chat/completions", headers={"X-API-Key": KEY},
                     json={"messages": MESSAGES, "max_tokens": 4, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")
    assert all(line.startswith("data: ") for line in raw.splitlines() if line)


def test_text_completions_with_n_seeds_and_echo(client, lm):
    reply = client.completions.create(model="tiny-lm", prompt="Once", max_tokens=12, temperature=1.0, seed=5, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    again = client.completions.create(model="tiny-lm", prompt="Once", max_tokens=12, temperature=1.0, seed=5, n=2)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]
    assert reply.usage.completion_tokens == 24
    greedy = client.completions.create(model="tiny-lm", prompt="Once", max_tokens=10, temperature=0, echo=True)
    assert greedy.choices[0].text == "Once" + lm.generate("Once", 10, temperature=0)
    streamed = client.completions.create(model="tiny-lm", prompt="Once", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == lm.generate("Once", 10, temperature=0)


def test_json_schema_response_format_gives_valid_json(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10**7}},
              "required": ["city", "population"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="tiny-lm", messages=MESSAGES, max_tokens=200, temperature=1.0, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_concurrent_requests_share_the_decode_loop_and_each_gets_its_own_answer(client, lm, server):
    prompts = [f"prompt number {i}" for i in range(6)]
    expected = [lm.generate(p, 16, temperature=0, ignore_eos=True) for p in prompts]
    before = metric(server, "rosetta_batch_size_count", modality="generation")
    shared = metric(server, "rosetta_batch_size_bucket", modality="generation", le="1.0")

    def ask(prompt: str) -> str:
        response = httpx.post(f"{server}/v1/completions", headers={"X-API-Key": KEY}, timeout=60,
                              json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, prompts))
    steps = metric(server, "rosetta_batch_size_count", modality="generation") - before
    alone = metric(server, "rosetta_batch_size_bucket", modality="generation", le="1.0") - shared
    assert answers == expected
    assert alone < steps  # some decode steps ran several sequences at once


def test_a_client_that_disconnects_mid_stream_stops_its_sequence(server):
    before = metric(server, "rosetta_sequences_finished_total", reason="cancelled")
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers={"X-API-Key": KEY}, timeout=60,
                      json={"messages": MESSAGES, "max_tokens": 300, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 20
    while metric(server, "rosetta_sequences_finished_total", reason="cancelled") == before:
        assert time.monotonic() < deadline, "the sequence of a departed client kept decoding"
        time.sleep(0.1)
    assert metric(server, "rosetta_sequences_running") == 0


def test_the_api_key_is_required(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_models_and_info(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-lm"]
    info = httpx.get(f"{server}/v1/info", headers={"X-API-Key": KEY}).json()
    assert info["capabilities"] == ["generate"] and info["context_length"] == 512
    assert httpx.post(f"{server}/v1/embed", headers={"X-API-Key": KEY}, json={"texts": ["x"]}).status_code == 404


def test_generation_metrics(client, server):
    client.chat.completions.create(model="tiny-lm", messages=MESSAGES, max_tokens=8)
    assert metric(server, "rosetta_generated_tokens_total") >= 8
    assert metric(server, "rosetta_time_to_first_token_seconds_count") >= 1
    assert metric(server, "rosetta_decode_tokens_per_second_count") >= 1


@pytest.mark.parametrize("body, status, code", [
    ({"messages": []}, 422, "invalid_request"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "invalid_request"),
    ({"messages": [{"content": "no role"}]}, 422, "invalid_request"),
    ({"messages": "not a list"}, 422, "invalid_request"),
    ({"messages": MESSAGES, "max_tokens": 10_000}, 422, "max_tokens_too_large"),
    ({"messages": MESSAGES, "max_tokens": 0}, 422, "invalid_request"),
    ({"messages": [{"role": "user", "content": "x" * 2000}]}, 400, "context_length_exceeded"),
    ({"messages": MESSAGES, "temperature": -1}, 422, "invalid_request"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     422, "invalid_schema"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema"}}, 422, "invalid_request"),
    ({"messages": MESSAGES, "logprobs": True}, 422, "invalid_request"),
    ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_request"),
])
def test_bad_chat_requests_are_4xx_with_a_reason(server, body, status, code):
    r = httpx.post(f"{server}/v1/chat/completions", headers={"X-API-Key": KEY}, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_bad_completion_requests_are_4xx(server):
    for body in ({"prompt": []}, {"prompt": [10**9]}, {"prompt": "x", "suffix": "y"}, {"prompt": "x", "n": 100}):
        r = httpx.post(f"{server}/v1/completions", headers={"X-API-Key": KEY}, json=body, timeout=30)
        assert 400 <= r.status_code < 500, (body, r.text)
    r = httpx.post(f"{server}/v1/completions", headers={"X-API-Key": KEY, "Content-Type": "application/json"},
                   content=b"{not json")
    assert r.status_code == 422


def test_content_parts_are_joined_into_text(client, lm):
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "something."}]
    reply = client.chat.completions.create(model="tiny-lm", messages=[{"role": "user", "content": parts}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == lm.chat([{"role": "user", "content": "Say\nsomething."}], 8,
                                                       temperature=0)


def test_the_chat_page_is_served(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "chat.js" in page.text
    assert httpx.get(f"{server}/static/chat.js").status_code == 200


def test_review_regressions_are_4xx_not_500(server):
    for body in ({"messages": MESSAGES, "seed": 2**70, "temperature": 1.0},
                 {"messages": MESSAGES, "seed": -1}):
        r = httpx.post(f"{server}/v1/chat/completions", headers={"X-API-Key": KEY}, json=body, timeout=30)
        assert r.status_code == 422, r.text
    r = httpx.post(f"{server}/v1/completions", headers={"X-API-Key": KEY}, timeout=30,
                   json={"prompt": "", "stream": True})
    assert r.status_code == 422 and "empty" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", headers={"X-API-Key": KEY}, timeout=30,
                   json={"messages": MESSAGES, "temperature": 1e-39, "max_tokens": 4})
    assert r.status_code == 200
