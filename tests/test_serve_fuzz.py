"""Robustness: schemathesis against the app's own OpenAPI spec, and fuzzed uploads. Always 4xx, never 5xx."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image

import rosetta
from rosetta.serve import Settings, create_app

KEY = "fuzz-key"


def make_app(directory):
    from rosetta.store import open_store

    store = open_store(directory / "store", model="tiny", dim=64)
    app = create_app(rosetta.create("tiny").eval(), store,
                     Settings(api_key=KEY, max_items=8, max_body_bytes=200_000, max_pixels=1_000_000))
    return app, store


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app, store = make_app(tmp_path_factory.mktemp("fuzz"))
    with TestClient(app, headers={"X-API-Key": KEY}) as c:
        # A few stored images, so that searches and thumbnails have something to find.
        files = [("files", (f"{i}.png", _png(i))) for i in range(3)]
        assert c.post("/v1/index", files=files).status_code == 200
        yield c
    store.close()


def _png(seed: int, size=(24, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_schemathesis_finds_no_server_errors_and_no_spec_mismatch(tmp_path):
    """Every operation, positive and negative cases, checked by schemathesis's checks: no 5xx, statuses,
    content types, bodies and headers as the spec declares them, auth enforced."""
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import negative_data_rejection

    config = SchemathesisConfig.from_dict({"checks": {
        # 413 (too many items, body too large) is how this API rejects some invalid requests.
        "negative_data_rejection": {"expected-statuses": ["400", "401", "404", "405", "413", "415", "422"]},
        # The spec cannot say "these bytes must decode as an image": schema-valid junk is rightly a 422.
        "positive_data_acceptance": {"enabled": False},
    }})
    app, store = make_app(tmp_path)
    with TestClient(app, headers={"X-API-Key": KEY}) as c:
        assert c.post("/v1/index", files=[("files", (f"{i}.png", _png(i))) for i in range(3)]).status_code == 200
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    failures, operations = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=20, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                # Multipart carries every value as a string: a "negative" boolean or number arrives as the
                # valid string "true" or "5". Negative cases there are still checked for everything else.
                multipart = "multipart" in (case.media_type or "")
                case.call_and_validate(headers={"X-API-Key": KEY},
                                       excluded_checks=[negative_data_rejection] if multipart else None)

            try:
                check()
            except Unsatisfiable:  # no way to make a negative case (an operation without inputs)
                pass
            except Exception as e:  # noqa: BLE001 - collect every operation's failures, then report them all
                failures.append(f"{operation.label} ({mode}): {str(e)[:2000]}")
    store.close()
    assert operations >= 8
    assert not failures, "\n\n".join(failures)


def _assert_client_error(r) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body["error"]) == {"code", "message"}


@given(data=st.binary(max_size=4096))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_bytes_are_4xx(client, data):
    for path, field in (("/v1/embed", "images"), ("/v1/classify", "image"), ("/v1/index", "files")):
        _assert_client_error(client.post(path, data={"labels": "a,b"}, files=[(field, ("fuzz.jpg", data))]))


@given(seed=st.integers(0, 3), fraction=st.floats(0.0, 0.9), jpeg=st.booleans())
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_truncated_images_are_4xx(client, seed, fraction, jpeg):
    whole = _jpeg(seed) if jpeg else _png(seed)
    cut = whole[: int(len(whole) * fraction)]
    _assert_client_error(client.post("/v1/embed", files=[("images", ("cut.img", cut))]))


@given(seed=st.integers(0, 3), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8))
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_corrupted_images_are_answered_or_4xx_never_5xx(client, seed, flips):
    data = bytearray(_png(seed))
    for position, value in flips:
        data[position % len(data)] = value
    r = client.post("/v1/embed", files=[("images", ("flipped.png", bytes(data)))])
    if r.status_code != 200:
        _assert_client_error(r)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes that claims width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _gif_header(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b","
            + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02D\x01\x00;")


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + b"\0" * 16


def _jpeg_header(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose frame header is rewritten to claim width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("name, data", [
    ("wide.png", _png_header(100_000, 100_000)),
    ("tall.png", _png_header(1, 2**31 - 1)),
    ("huge.gif", _gif_header(65_535, 65_535)),
    ("huge.bmp", _bmp_header(60_000, 60_000)),
    ("huge.jpg", _jpeg_header(65_000, 65_000)),
    ("over-limit.png", _png_header(1001, 1000)),  # just over this server's 1 Mpx
])
def test_huge_claimed_dimensions_are_413_before_decoding(client, name, data):
    for path, field in (("/v1/embed", "images"), ("/v1/classify", "image"), ("/v1/index", "files"),
                        ("/v1/search", "image")):
        r = client.post(path, data={"labels": "a"}, files=[(field, (name, data))])
        assert r.status_code == 413, (path, r.text)
        assert r.json()["error"]["code"] == "image_too_large" and name in r.json()["error"]["message"]


def test_a_real_bomb_is_413(client):
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, "PNG")  # 16 Mpx of zeros: ~16 kB compressed
    r = client.post("/v1/embed", files=[("images", ("bomb.png", bomb.getvalue()))])
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
