"""The HTTP API with sounds and videos: embedding, classification and search by upload, results that say where in
a recording the match is and a URL to play it from, and a one-line 4xx for every bad upload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import hearing_model, write_tones, write_video
from fastapi.testclient import TestClient
from test_serve import error_of, png

import rosetta
from rosetta.serve import Settings, create_app
from rosetta.store import open_store
from rosetta.store.index import file_rows, index_source, model_name, quote, segment_id

LOW, HIGH = 300, 1500


@pytest.fixture(scope="module")
def hearing(one_thread):
    return hearing_model()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-media")
    return {
        "long.wav": write_tones(root / "long.wav", (LOW, 1.44), (HIGH, 1.44)),
        "short.wav": write_tones(root / "short.wav", (HIGH, 0.5)),
        "colours.mp4": write_video(root / "colours.mp4", [(220, 30, 30), (30, 60, 220)]),
        "loud.mp4": write_video(root / "loud.mp4", [(30, 200, 60)], tone=LOW),
    }


@pytest.fixture(scope="module")
def client(hearing, media, tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("served-store") / "store", model=model_name(hearing), dim=64)
    index_source(hearing, store, next(iter(media.values())).parent, progress=False)
    settings = Settings(max_items=8, max_body_bytes=2_000_000, max_audio_seconds=3.0)
    with TestClient(create_app(hearing, store, settings)) as c:
        yield c
    store.close()


def upload(media, name: str, field: str):
    return (field, (name, media[name].read_bytes()))


def test_embed_sounds_and_videos_match_the_model(client, hearing, media):
    r = client.post("/v1/embed", data={"texts": ["a low tone"]},
                    files=[upload(media, "long.wav", "audio"), upload(media, "short.wav", "audio"),
                           upload(media, "loud.mp4", "videos")])
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["audio_embeddings"],
                               hearing.embed_audio([media["long.wav"], media["short.wav"]]).numpy(), atol=1e-5)
    np.testing.assert_allclose(body["video_embeddings"], hearing.embed_videos([media["loud.mp4"]]).numpy(),
                               atol=1e-5)
    assert len(body["text_embeddings"]) == 1 and body["image_embeddings"] == []
    assert client.get("/v1/info").json()["modalities"] == ["audio", "image", "text", "video"]


def test_classify_a_sound_or_a_video(client, media):
    for field, name in (("audio", "short.wav"), ("video", "loud.mp4")):
        r = client.post("/v1/classify", data={"labels": ["a low tone", "a high tone"]},
                        files=[upload(media, name, field)])
        assert r.status_code == 200, r.text
        assert sum(r.json()["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    r = client.post("/v1/classify", data={"labels": ["x"]},
                    files=[upload(media, "short.wav", "audio"), upload(media, "loud.mp4", "video")])
    assert r.status_code == 422 and "audio and video" in error_of(r)["message"]


def test_search_by_sound_gives_the_window_and_a_playable_url(client, media, tmp_path):
    # The second window of the long recording, exactly: that file first, at that window.
    samples = 23_040  # 1.44 s at 16 kHz: the audio tower's window
    query = write_tones(tmp_path / "query.wav", (HIGH, 1.44))  # not beside the indexed files: others index them
    r = client.post("/v1/search", data={"k": "4"}, files={"audio": ("query.wav", query.read_bytes())})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len({h["id"] for h in hits}) == len(hits) == 4  # one hit per file
    best = hits[0]
    assert best["id"] == str(media["long.wav"]) and best["score"] == pytest.approx(1.0, abs=1e-4)
    assert (best["start"], best["end"]) == pytest.approx((samples / 16_000, 2 * samples / 16_000))
    assert best["thumbnail"] is None and best["media"].startswith("/v1/media/")
    video = next(h for h in hits if h["id"] == str(media["colours.mp4"]))
    played = client.get(video["media"], headers={"Range": "bytes=0-99"})
    assert played.status_code == 206 and played.content == media["colours.mp4"].read_bytes()[:100]
    assert played.headers["content-type"] == "video/mp4"
    assert client.get(video["media"]).content == media["colours.mp4"].read_bytes()
    assert error_of(client.get("/v1/media/nothing/here.mp4"))["code"] == "not_found"

    r = client.post("/v1/search", data={"text": "a high tone", "weights": ["0.2", "0.8"], "k": "2"},
                    files={"audio": ("query.wav", query.read_bytes())})
    assert r.status_code == 200 and r.json()["hits"][0]["id"] == str(media["long.wav"])


@pytest.mark.parametrize(("field", "blob", "status", "code", "reason"), [
    ("audio", b"RIFF....WAVEnot really", 422, "invalid_audio", "bad.bin: "),
    ("videos", b"\x00\x00\x00\x18ftypmp42 garbage", 422, "invalid_video", "bad.bin: not a video that decodes"),
    ("audio", "colours.mp4", 422, "invalid_audio", "bad.bin: has no audio track"),
    ("audio", "long_over_limit", 413, "audio_too_long", "longer than the limit of 3 s"),
    ("videos", "colours.mp4", 413, "video_too_long", "longer than the limit of 3 s"),
])
def test_bad_uploads_are_a_one_line_4xx(client, media, field, blob, status, code, reason, tmp_path):
    if blob == "long_over_limit":
        blob = write_tones(tmp_path / "over.wav", (LOW, 3.5)).read_bytes()
    elif isinstance(blob, str):
        blob = media[blob].read_bytes()
    r = client.post("/v1/embed", files=[(field, ("bad.bin", blob)), upload(media, "short.wav", "audio")])
    error = error_of(r)
    assert (r.status_code, error["code"]) == (status, code) and reason in error["message"], error
    assert "\n" not in error["message"]
    search_field = "video" if field == "videos" else field
    r = client.post("/v1/search", files={search_field: ("bad.bin", blob)})
    assert (r.status_code, error_of(r)["code"]) == (status, code)


def test_a_model_without_an_audio_tower_refuses_sounds_and_still_watches_videos(model, media):
    with TestClient(create_app(model, None, Settings(model_name="tiny"))) as client:
        r = client.post("/v1/embed", files=[upload(media, "short.wav", "audio")])
        assert (r.status_code, error_of(r)["code"]) == (422, "unsupported_input")
        assert error_of(r)["message"] == "this model has no audio tower: it cannot embed sounds"
        r = client.post("/v1/classify", data={"labels": ["x", "y"]}, files=[upload(media, "short.wav", "audio")])
        assert (r.status_code, error_of(r)["code"]) == (422, "unsupported_input")
        r = client.post("/v1/embed", files=[upload(media, "colours.mp4", "videos")])
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["video_embeddings"], model.embed_videos([media["colours.mp4"]]).numpy(),
                                   atol=1e-5)


def test_a_model_of_sounds_only_is_served_and_indexed(media, tmp_path):
    clap = rosetta.create("tiny-clap").eval()
    store = open_store(tmp_path / "store", model=model_name(clap), dim=32)
    report = index_source(clap, store, media["long.wav"].parent)
    assert sorted(report.ids) == sorted(str(media[n]) for n in ("long.wav", "short.wav"))  # one row each, whole
    assert sorted(line.split(": ", 1)[1] for line in report.failed) == ["this model does not embed videos"] * 2
    with TestClient(create_app(clap, store, Settings(model_name=model_name(clap)))) as client:
        assert client.get("/v1/info").json()["modalities"] == ["audio", "text"]
        r = client.post("/v1/search", files=[upload(media, "short.wav", "audio")], data={"k": "2"})
        assert r.status_code == 200, r.text
        best = r.json()["hits"][0]
        assert best["id"] == str(media["short.wav"]) and (best["start"], best["end"]) == (0.0, 0.5)  # one window
        r = client.post("/v1/classify", data={"labels": ["a dog", "a bell"]},
                        files=[upload(media, "short.wav", "audio")])
        assert r.status_code == 200 and sum(r.json()["probs"].values()) == pytest.approx(1.0, abs=1e-4)
        r = client.post("/v1/embed", files={"images": ("p.png", png(0))})
        assert (r.status_code, error_of(r)["message"]) == (422, "this model does not embed images")
        # Uploaded for indexing: a sound in CLAP's windows; a video refused, naming why.
        r = client.post("/v1/index", files=[upload(media, "long.wav", "files")])
        assert r.status_code == 200, r.text
        uploaded = r.json()["indexed"][0]["id"]
        assert [m["end"] for m in store.metadata(file_rows(store.hashes(), uploaded)).values()] == [2.88]
        r = client.post("/v1/index", files=[upload(media, "loud.mp4", "files")])
        assert (r.status_code, error_of(r)["message"]) == (422, "this model does not embed videos")
    store.close()


def _windows(store, file: str) -> list[tuple[float, float]]:
    rows = store.metadata(file_rows(store.hashes(), file))
    return [(rows[row]["start"], rows[row]["end"]) for row in file_rows(rows, file)]


def test_index_takes_sounds_and_videos_stored_window_by_window_as_the_cli_stores_them(hearing, media, tmp_path):
    store = open_store(tmp_path / "store", model=model_name(hearing), dim=64)
    settings = Settings(max_items=8, max_body_bytes=2_000_000, max_audio_seconds=3.0)
    with TestClient(create_app(hearing, store, settings)) as client:
        unnamed = ("files", ("clip", media["short.wav"].read_bytes()))  # told apart by its bytes
        r = client.post("/v1/index", files=[upload(media, "long.wav", "files"), upload(media, "loud.mp4", "files"),
                                            ("files", ("p.png", png(0))), unnamed])
        assert r.status_code == 200, r.text
        saved = {item["filename"]: Path(item["path"]) for item in r.json()["indexed"]}
        assert [saved[n].suffix for n in ("long.wav", "loud.mp4", "p.png", "clip")] == [".wav", ".mp4", ".png", ".wav"]
        assert r.json()["count"] == len(store)

        # The rows, and the vectors, of the model's own windows.
        for name, segments in (("long.wav", hearing.embed_audio_segments(media["long.wav"])),
                               ("loud.mp4", hearing.embed_video_segments(media["loud.mp4"]))):
            file = str(saved[name])
            assert _windows(store, file) == [(round(s, 3), round(e, 3)) for s, e, _ in segments]
            found = store.search(np.stack([v.numpy() for _, _, v in segments]), k=1, where=f"path = {quote(file)}")
            assert [hits[0].id for hits in found] == [segment_id(file, i) for i in range(len(segments))]
            assert all(hits[0].score == pytest.approx(1.0, abs=1e-5) for hits in found)
        assert 'modality="audio_segments"' in client.get("/metrics").text  # on the model's thread

        # Past the server's limits, or not decodable: a 4xx naming the upload, and nothing saved.
        before = sorted(saved["p.png"].parent.iterdir())
        over = write_tones(tmp_path / "over.wav", (LOW, 3.5)).read_bytes()
        for files, status, code, reason in (
            ([("files", ("over.wav", over))], 413, "audio_too_long", "over.wav: longer than the limit of 3 s"),
            ([upload(media, "colours.mp4", "files")], 413, "video_too_long", "colours.mp4: longer than the limit"),
            ([("files", ("bad.mp4", b"\x00\x00\x00\x18ftypmp42 garbage"))], 422, "invalid_video", "bad.mp4: "),
            ([upload(media, "short.wav", "files")] * 9, 413, "too_many_items", "the limit is 8"),
        ):
            r = client.post("/v1/index", files=[*files, ("files", ("q.png", png(1)))])
            assert (r.status_code, error_of(r)["code"]) == (status, code) and reason in error_of(r)["message"], r.text
        assert sorted(saved["p.png"].parent.iterdir()) == before
    store.close()


def test_index_by_a_model_without_an_audio_tower_refuses_a_sound_and_takes_a_video(model, media, tmp_path):
    store = open_store(tmp_path / "store", model=model_name(model), dim=64)
    with TestClient(create_app(model, store, Settings(model_name="tiny"))) as client:
        r = client.post("/v1/index", files=[("files", ("p.png", png(0))), upload(media, "short.wav", "files")])
        assert (r.status_code, error_of(r)["code"]) == (422, "unsupported_input")
        assert error_of(r)["message"] == "this model has no audio tower: it cannot embed sounds"
        assert len(store) == 0
        r = client.post("/v1/index", files=[upload(media, "colours.mp4", "files")])
        assert r.status_code == 200, r.text
        windows = [(round(s, 3), round(e, 3)) for s, e, _ in model.embed_video_segments(media["colours.mp4"])]
        assert _windows(store, r.json()["indexed"][0]["id"]) == windows and len(windows) == 1  # a CLIP watches
    store.close()
