"""OpenAI's audio endpoints on `rosetta serve` with the real tiny.en weights: the `openai` SDK against a real
server on 127.0.0.1, every response format, word timestamps, and 4xx answers to bad uploads."""

from __future__ import annotations

import httpx
import pytest
from conftest import serving
from test_whisper import TINY_EN, espeak

import rosetta
from rosetta.serve import Settings, create_app

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    return espeak(tmp_path_factory.mktemp("spoken") / "museum.wav",
                  "The museum will be closed for renovations until next spring.")


@pytest.fixture(scope="module")
def server():
    with serving(create_app(rosetta.load(TINY_EN), None, Settings(model_name="tiny.en", max_audio_seconds=20))) as url:
        yield url


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_transcription_formats_through_the_openai_sdk(client, spoken):
    expected = rosetta.load(TINY_EN).transcribe(spoken).text
    with open(spoken, "rb") as f:
        assert client.audio.transcriptions.create(model="whisper-1", file=f).text == expected
    with open(spoken, "rb") as f:
        text = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="text")
    assert text.strip() == expected
    with open(spoken, "rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> ") and expected in srt
    with open(spoken, "rb") as f:
        vtt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="vtt")
    assert vtt.startswith("WEBVTT") and expected in vtt


def test_verbose_json_with_word_timestamps(client, spoken):
    with open(spoken, "rb") as f:
        reply = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                   timestamp_granularities=["word", "segment"], language="en")
    assert reply.language == "english" and reply.duration > 2
    assert reply.segments and reply.segments[0].avg_logprob < 0
    words = [w.word.strip() for w in reply.words]
    assert "museum" in words and [w.start for w in reply.words] == sorted(w.start for w in reply.words)


def test_bad_uploads_are_4xx(server, tmp_path):
    url = f"{server}/v1/audio/transcriptions"
    cases = [
        ({"file": ("x.wav", b"not audio at all")}, {}, 422),
        ({"file": ("empty.wav", b"")}, {}, 422),
        ({"file": ("x.wav", b"RIFF")}, {"response_format": "docx"}, 422),
    ]
    for files, data, status in cases:
        r = httpx.post(url, files=files, data=data, timeout=60)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]
    long = espeak(tmp_path / "long.wav", "This sentence is repeated many times. " * 12, speed=120)
    r = httpx.post(url, files={"file": ("long.wav", long.read_bytes())}, timeout=60)
    assert r.status_code == 413 and "longer than the limit" in r.json()["error"]["message"]


def test_translation_needs_a_multilingual_model(client, spoken):
    with open(spoken, "rb") as f, pytest.raises(openai.UnprocessableEntityError, match="English-only"):
        client.audio.translations.create(model="whisper-1", file=f)


def test_info_names_the_capability(server):
    assert httpx.get(f"{server}/v1/info").json()["capabilities"] == ["transcribe"]
