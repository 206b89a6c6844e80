"""The HTTP API in-process (FastAPI's TestClient): endpoints, batching, cache, auth, limits, errors, OpenAPI."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rosetta.serve import Settings, create_app


def png(seed: int, size: tuple[int, int] = (40, 56)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, None, Settings(model_name="tiny", max_items=8, max_body_bytes=200_000,
                                                     max_pixels=1_000_000))) as c:
        yield c


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    return body["error"]


def metric(client: TestClient, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# Endpoints


def test_embed_texts_as_json_matches_the_model(client, model):
    r = client.post("/v1/embed", json={"texts": ["a dog", "a cat"]})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "tiny" and body["dim"] == 64 and body["image_embeddings"] == []
    got = np.asarray(body["text_embeddings"])
    np.testing.assert_allclose(got, model.embed_texts(["a dog", "a cat"]).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_embed_images_and_texts_as_multipart(client, model):
    images = [png(1), png(2, (80, 30))]
    r = client.post("/v1/embed", data={"texts": ["a dog"]},
                    files=[("images", ("one.png", images[0], "image/png")), ("images", ("two.png", images[1]))])
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["image_embeddings"], model.embed_images(images).numpy(), atol=1e-5)
    np.testing.assert_allclose(body["text_embeddings"], model.embed_texts(["a dog"]).numpy(), atol=1e-5)


def test_classify_returns_the_best_label_and_the_models_probabilities(client, model):
    image = png(3)
    r = client.post("/v1/classify", data={"labels": ["dog, cat", "car"]},
                    files={"image": ("x.png", image, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["probs"]) == ["dog", "cat", "car"]
    expected = model.classify([image], ["dog", "cat", "car"])[0].tolist()
    np.testing.assert_allclose(list(body["probs"].values()), expected, atol=1e-5)
    assert body["label"] == ["dog", "cat", "car"][int(np.argmax(expected))]
    assert body["score"] == pytest.approx(max(expected), abs=1e-5)


def test_classify_with_templates(client, model):
    image = png(4)
    for templates in ("imagenet", ["a {}.", "art of a {}"]):
        r = client.post("/v1/classify", data={"labels": "red,green", "templates": templates},
                        files={"image": ("x.png", image)})
        assert r.status_code == 200, r.text
        expected = model.classify([image], ["red", "green"], templates=templates)[0].tolist()
        np.testing.assert_allclose(list(r.json()["probs"].values()), expected, atol=1e-5)
    r = client.post("/v1/classify", data={"labels": "a", "templates": "nonsense"}, files={"image": ("x.png", image)})
    assert r.status_code == 422 and error_of(r)["code"] == "invalid_templates"


def test_healthz_and_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="query-text"' in page.text and 'id="classify-btn"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text  # works with no internet


def test_info(client):
    body = client.get("/v1/info").json()
    assert body["model"] == "tiny" and body["dim"] == 64 and body["store"] is None
    assert body["batching"]["enabled"] is True and body["limits"]["max_items"] == 8


def test_search_and_index_without_a_store_are_503(client):
    r = client.post("/v1/search", json={"text": "a dog"})
    assert r.status_code == 503 and error_of(r)["code"] == "no_store"
    r = client.post("/v1/index", files=[("files", ("a.png", png(1)))])
    assert r.status_code == 503 and error_of(r)["code"] == "no_store"
    r = client.get("/v1/thumbnail/anything")
    assert r.status_code == 503


# Batching and the cache, seen from the API


def test_concurrent_requests_are_answered_from_one_model_call(model):
    # A batch leaves when it is full, and the wait is an hour: four single-image requests can only
    # be answered if they shared one call.
    settings = Settings(model_name="tiny", max_batch=4, max_wait_ms=3_600_000, cache_size=0)
    images = [png(10 + i) for i in range(4)]
    with TestClient(create_app(model, None, settings)) as c:
        results: dict[int, list] = {}

        def send(i: int) -> None:
            r = c.post("/v1/embed", files=[("images", (f"{i}.png", images[i]))])
            results[i] = r.json()["image_embeddings"][0]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(results) == [0, 1, 2, 3]
        expected = model.embed_images(images).numpy()
        for i in range(4):  # each request got its own image's embedding back
            np.testing.assert_allclose(results[i], expected[i], atol=1e-5)
        assert metric(c, "rosetta_batch_size_count", modality="image") == 1
        assert metric(c, "rosetta_batch_size_sum", modality="image") == 4


def test_repeated_inputs_come_from_the_cache(model):
    with TestClient(create_app(model, None, Settings(model_name="tiny"))) as c:
        image = png(20)
        first = c.post("/v1/embed", files=[("images", ("a.png", image))]).json()
        calls = metric(c, "rosetta_batch_size_count", modality="image")
        again = c.post("/v1/embed", files=[("images", ("renamed.png", image))]).json()  # same bytes, other name
        assert again["image_embeddings"] == first["image_embeddings"]
        assert metric(c, "rosetta_batch_size_count", modality="image") == calls  # no model call
        assert metric(c, "rosetta_cache_hits_total", modality="image") == 1
        assert metric(c, "rosetta_cache_misses_total", modality="image") == 1
        c.post("/v1/embed", json={"texts": ["x", "x", "y"]})
        c.post("/v1/embed", json={"texts": ["y"]})
        assert metric(c, "rosetta_cache_hits_total", modality="text") == 1
        assert metric(c, "rosetta_cache_misses_total", modality="text") == 3


def test_without_batching_each_request_is_its_own_call(model):
    with TestClient(create_app(model, None, Settings(model_name="tiny", batching=False, cache_size=0))) as c:
        for i in range(3):
            assert c.post("/v1/embed", json={"texts": [f"t{i}", "u"]}).status_code == 200
        assert metric(c, "rosetta_batch_size_count", modality="text") == 3
        assert metric(c, "rosetta_batch_size_sum", modality="text") == 6


def test_metrics_count_requests_per_endpoint_and_status(client):
    before = metric(client, "rosetta_requests_total", endpoint="/v1/embed", status="200")
    client.post("/v1/embed", json={"texts": ["metrics"]})
    client.post("/v1/embed", json={"texts": 5})
    assert metric(client, "rosetta_requests_total", endpoint="/v1/embed", status="200") == before + 1
    assert metric(client, "rosetta_requests_total", endpoint="/v1/embed", status="422") >= 1
    assert metric(client, "rosetta_request_seconds_count", endpoint="/v1/embed") >= 2
    assert metric(client, "rosetta_items_total", endpoint="/v1/embed", modality="text") >= 1
    client.get("/v1/thumbnail/some/id")
    text = client.get("/metrics").text
    assert 'endpoint="/v1/thumbnail/{id}"' in text and "some/id" not in text  # route templates, not raw paths


# Auth


def test_api_key(model):
    with TestClient(create_app(model, None, Settings(model_name="tiny", api_key="s3cret"))) as c:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cret "}):
            r = c.post("/v1/embed", json={"texts": ["a"]}, headers=headers)
            assert r.status_code == 401 and error_of(r)["code"] == "unauthorized"
        assert c.get("/metrics").status_code == 401
        assert c.get("/v1/info").status_code == 401
        for headers in ({"X-API-Key": "s3cret"}, {"Authorization": "Bearer s3cret"}):
            assert c.post("/v1/embed", json={"texts": ["a"]}, headers=headers).status_code == 200
            assert c.get("/metrics", headers=headers).status_code == 200
        assert c.get("/healthz").status_code == 200  # open
        assert c.get("/").status_code == 200  # the page is open; it asks for the key
        # Auth comes before the body is looked at: a bad body without a key is still 401.
        assert c.post("/v1/classify", content=b"junk", headers={"content-type": "text/plain"}).status_code == 401


def test_cors_is_off_by_default_and_on_for_named_origins(model, client):
    preflight = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key"}
    r = client.options("/v1/embed", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = client.post("/v1/embed", json={"texts": ["a"]}, headers={"Origin": "https://example.org"})
    assert "access-control-allow-origin" not in r.headers
    settings = Settings(model_name="tiny", cors_origins=("https://example.org",))
    with TestClient(create_app(model, None, settings)) as c:
        r = c.options("/v1/embed", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://example.org"
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        r = c.post("/v1/embed", json={"texts": ["a"]}, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


# Limits and errors: always 4xx with {"error": {"code", "message"}}


def test_body_over_the_limit_is_413_from_content_length(client):
    r = client.post("/v1/embed", content=b"x" * 300_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"


def test_body_over_the_limit_is_413_while_streaming(client):
    def chunks():  # no Content-Length: chunked transfer
        for _ in range(40):
            yield b"y" * 10_000

    r = client.post("/v1/embed", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"


def test_too_many_items_is_413(client):
    r = client.post("/v1/embed", json={"texts": ["a"] * 9})
    assert r.status_code == 413 and error_of(r)["code"] == "too_many_items"
    r = client.post("/v1/embed", files=[("images", (f"{i}.png", png(1, (8, 8)))) for i in range(9)])
    assert r.status_code == 413
    r = client.post("/v1/classify", data={"labels": ",".join(f"l{i}" for i in range(9))},
                    files={"image": ("x.png", png(1))})
    assert r.status_code == 413 and error_of(r)["code"] == "too_many_items"
    r = client.post("/v1/embed", json={"texts": ["a" * 10_001]})
    assert r.status_code == 413 and error_of(r)["code"] == "text_too_long"


def test_images_over_the_pixel_limit_are_413(client):
    bomb = io.BytesIO()
    Image.new("1", (2000, 1000)).save(bomb, "PNG")  # 2 Mpx in a few hundred bytes; the limit here is 1 Mpx
    r = client.post("/v1/embed", files=[("images", ("bomb.png", bomb.getvalue()))])
    assert r.status_code == 413
    error = error_of(r)
    assert error["code"] == "image_too_large" and "bomb.png" in error["message"]


@pytest.mark.parametrize("name, data, code", [
    ("noise.jpg", b"\x00\x01garbage" * 50, "invalid_image"),
    ("truncated.png", png(5)[:150], "invalid_image"),
    ("empty.png", b"", "invalid_image"),
])
def test_bad_images_are_422_naming_the_upload(client, name, data, code):
    for path, field in (("/v1/embed", "images"), ("/v1/classify", "image")):
        r = client.post(path, data={"labels": "a,b"}, files=[(field, (name, data))])
        assert r.status_code == 422, (path, r.text)
        error = error_of(r)
        assert error["code"] == code and name in error["message"]


@pytest.mark.parametrize("kwargs, status", [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
    ({"json": [1, 2]}, 422),
    ({"json": {"texts": [1, None]}}, 422),
    ({"json": {}}, 422),
    ({"json": {"texts": []}}, 422),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    ({"content": b"hello"}, 415),
    ({"content": b"--b\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=b"}}, 422),
    ({"data": {"other": "x"}}, 422),
])
def test_malformed_requests_are_4xx(client, kwargs, status):
    r = client.post("/v1/embed", **kwargs)
    assert r.status_code == status, r.text
    error_of(r)


def test_classify_needs_an_image_and_labels(client):
    for kwargs in ({"data": {"labels": "a"}}, {"files": {"image": ("x.png", png(1))}},
                   {"data": {"labels": " , "}, "files": {"image": ("x.png", png(1))}}):
        r = client.post("/v1/classify", **kwargs)
        assert r.status_code == 422, r.text
        error_of(r)


def test_unknown_routes_and_methods_have_json_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = client.get("/v1/embed")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed" and "POST" in r.headers["allow"]


# OpenAPI


def test_openapi_declares_every_error_response(model):
    with TestClient(create_app(model, None, Settings(model_name="tiny", api_key="k"))) as c:
        spec = c.get("/openapi.json").json()
    assert "ErrorBody" in spec["components"]["schemas"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's default 422 shape is not ours
    for path in ("/v1/embed", "/v1/classify", "/v1/search", "/v1/index"):
        operation = spec["paths"][path]["post"]
        for status in ("401", "413", "415", "422", "503"):
            assert operation["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"}, (path, status)
        assert operation.get("security"), path
    content = spec["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert spec["paths"]["/v1/thumbnail/{id}"]["get"]["responses"]["200"]["content"] == {"image/jpeg": {}}


# Search, indexing and thumbnails with a real store


@pytest.fixture()
def stored(model, tmp_path):
    """An app over an empty embedded store, and a few distinct images to upload."""
    from rosetta.store import open_store

    store = open_store(tmp_path / "store", model="tiny", dim=64)
    images = {f"img{i}.png": png(100 + i, (32 + 8 * i, 40)) for i in range(4)}
    with TestClient(create_app(model, store, Settings(max_items=8))) as c:
        yield c, store, images
    store.close()


def test_index_saves_uploads_in_the_store_and_search_finds_them(stored, model):
    c, store, images = stored
    r = c.post("/v1/index", files=[("files", (name, data, "image/png")) for name, data in images.items()])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 4 == len(store)
    uploads = store.path / "uploads"
    for item, (name, data) in zip(body["indexed"], images.items()):
        saved = Path(item["path"])
        assert saved.parent == uploads and saved.read_bytes() == data and item["filename"] == name
        assert saved.suffix == ".png"

    # An image query finds that very image first, with cosine 1.
    name, data = "img2.png", images["img2.png"]
    r = c.post("/v1/search", data={"k": "3"}, files={"image": ("q.png", data)})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 3 and hits[0]["path"].endswith("-img2.png") and hits[0]["score"] == pytest.approx(1, abs=1e-4)
    assert hits[0]["metadata"]["height"] == 48 and hits[0]["thumbnail"].startswith("/v1/thumbnail/")

    # A text query ranks the store as the model does.
    r = c.post("/v1/search", json={"text": "a photo", "k": 10})
    hits = r.json()["hits"]
    text = model.embed_texts(["a photo"])[0].numpy()
    expected = sorted((float(model.embed_images([d])[0].numpy() @ text), n) for n, d in images.items())[::-1]
    assert [Path(h["path"]).name.split("-", 1)[1] for h in hits] == [n for _, n in expected]
    np.testing.assert_allclose([h["score"] for h in hits], [s for s, _ in expected], atol=1e-4)

    # Both at once, weighted; and a metadata filter.
    r = c.post("/v1/search", data={"text": "a photo", "weights": ["0.2", "0.8"], "k": "2"},
               files={"image": ("q.png", data)})
    assert r.status_code == 200, r.text
    mixed = 0.2 * text + 0.8 * model.embed_images([data])[0].numpy()
    best = max(images, key=lambda n: float(model.embed_images([images[n]])[0].numpy() @ mixed))
    assert [Path(h["path"]).name.split("-", 1)[1] for h in r.json()["hits"]][0] == best
    r = c.post("/v1/search", json={"text": "a photo", "where": "height > 40"})
    assert sorted(h["metadata"]["height"] for h in r.json()["hits"]) == [48, 56]


def test_index_refuses_a_batch_with_a_bad_image_and_saves_nothing(stored):
    c, store, images = stored
    r = c.post("/v1/index", files=[("files", ("good.png", images["img0.png"])), ("files", ("bad.png", b"nope"))])
    assert r.status_code == 422 and "bad.png" in error_of(r)["message"]
    assert len(store) == 0 and not any((store.path / "uploads").glob("*"))


def test_thumbnails_are_served_only_for_stored_images(stored, tmp_path):
    c, store, images = stored
    indexed = c.post("/v1/index", files=[("files", ("a.png", images["img3.png"]))]).json()["indexed"][0]
    hit = c.post("/v1/search", json={"text": "x", "k": 1}).json()["hits"][0]
    r = c.get(hit["thumbnail"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    secret = tmp_path / "secret.png"
    secret.write_bytes(images["img0.png"])
    for id_ in (str(secret), "../../../etc/passwd", indexed["path"] + "x", "nothing"):
        r = c.get(f"/v1/thumbnail/{id_}")
        assert r.status_code == 404 and error_of(r)["code"] == "not_found", id_


@pytest.mark.parametrize("body, code", [
    ({"text": "a", "where": "width >"}, "invalid_query"),
    ({"text": "a", "k": 0}, "invalid_request"),
    ({"text": "a", "k": 10_000}, "too_many_items"),
    ({"text": "a", "weights": [1, 1]}, "invalid_query"),  # weights need both a text and an image
    ({"text": "a", "weights": [1]}, "invalid_request"),
    ({}, "empty_request"),
])
def test_bad_searches_are_4xx(stored, body, code):
    c, _, _ = stored
    r = c.post("/v1/search", json=body)
    assert 400 <= r.status_code < 500 and error_of(r)["code"] == code, r.text
