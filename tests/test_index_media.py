"""Sounds and videos in a store beside images: one row per window, search results per file with the best
window's start and end, incremental reruns, models that cannot hear, `rosetta index` and `rosetta search`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import hearing_model, tones, write_tones, write_video
from PIL import Image

from rosetta.cli import main
from rosetta.modalities.video import sample_frames
from rosetta.search import search
from rosetta.store import open_store
from rosetta.store.index import file_rows, index_source, model_name, segment_id

RED, BLUE, GREEN = (220, 30, 30), (30, 60, 220), (30, 200, 60)
LOW, HIGH, MIDDLE = 300, 1500, 700


@pytest.fixture(scope="module")
def hearing(one_thread):
    return hearing_model()


def media_folder(root: Path) -> dict[str, Path]:
    """Two photos, a long and a short sound, a silent video and one with sound."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for name in ("a.jpg", "b.png"):
        files[name] = root / name
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(files[name])
    files["long.wav"] = write_tones(root / "long.wav", (LOW, 1.5), (HIGH, 1.5), (MIDDLE, 1.0))
    files["short.wav"] = write_tones(root / "short.wav", (MIDDLE, 0.8))
    (root / "clips").mkdir(exist_ok=True)
    files["colours.mp4"] = write_video(root / "clips" / "colours.mp4", [RED, BLUE])
    files["loud.mp4"] = write_video(root / "clips" / "loud.mp4", [GREEN], tone=LOW)
    return files


def test_sounds_and_videos_are_stored_by_window_and_found_by_their_best(tmp_path, hearing):
    files = media_folder(tmp_path / "media")
    store = open_store(tmp_path / "store", model=model_name(hearing), dim=64)
    report = index_source(hearing, store, tmp_path / "media")
    assert report.failed == [] and report.added == len(files) == len(report.ids)

    long_id = str(files["long.wav"])
    assert file_rows(store.hashes(), long_id) == [segment_id(long_id, i) for i in range(3)]
    window = hearing.config.audio.window_samples / 16_000
    meta = store.metadata([segment_id(long_id, 1)])[segment_id(long_id, 1)]
    assert (meta["media"], meta["format"], meta["segment"], meta["segments"]) == ("audio", "wav", 1, 3)
    assert (meta["start"], meta["end"]) == pytest.approx((window, 2 * window), abs=1e-3)
    video_id = str(files["colours.mp4"])
    video = store.metadata([segment_id(video_id, 0), segment_id(video_id, 1)])
    assert [(m["start"], m["end"], m["media"]) for m in video.values()] == [(0.0, 2.0, "video"), (2.0, 4.0, "video")]
    assert len(store) == 2 + 3 + 1 + 2 + 1

    # By sound: the second window of the long recording, cut out exactly, finds that file at that window.
    query = tmp_path / "query.wav"
    samples = hearing.config.audio.window_samples
    sf.write(query, sf.read(files["long.wav"], dtype="float32")[0][samples : 2 * samples], 16_000, subtype="FLOAT")
    hits = search(hearing, store, audio=query, k=len(files))
    assert hits[0].id == long_id and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert (hits[0].metadata["start"], hits[0].metadata["end"]) == pytest.approx((window, 2 * window), abs=1e-3)
    # One hit per file, however many windows each has; images keep their own ids.
    assert sorted(h.id for h in hits) == sorted(map(str, files.values()))

    # By image: a blue frame finds the silent video's second window.
    blue = sample_frames(files["colours.mp4"], fps=1)[3]
    hit = next(h for h in search(hearing, store, image=blue, k=len(files)) if h.id == video_id)
    assert (hit.metadata["start"], hit.metadata["end"], hit.metadata["path"]) == (2.0, 4.0, video_id)
    assert hit.score == pytest.approx(1.0, abs=1e-3)

    # A filter on the window's metadata: only sounds, best first, each file once.
    hits = search(hearing, store, text="a low tone", k=5, where="media = 'audio'")
    assert sorted(h.id for h in hits) == sorted([long_id, str(files["short.wav"])])
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_reruns_embed_only_changes_and_drop_windows_that_are_gone(tmp_path, hearing):
    files = media_folder(tmp_path / "media")
    store = open_store(tmp_path / "store", model=model_name(hearing), dim=64)
    index_source(hearing, store, tmp_path / "media")
    before = len(store)
    report = index_source(hearing, store, tmp_path / "media")
    assert (report.added, report.updated, report.unchanged, report.removed, len(store)) == (0, 0, 6, 0, before)

    write_tones(files["long.wav"], (HIGH, 1.0))  # three windows become one
    files["loud.mp4"].unlink()
    report = index_source(hearing, store, tmp_path / "media")
    assert (report.added, report.updated, report.unchanged, report.removed) == (0, 1, 4, 1)
    assert file_rows(store.hashes(), str(files["long.wav"])) == [segment_id(str(files["long.wav"]), 0)]
    assert file_rows(store.hashes(), str(files["loud.mp4"])) == []
    assert len(store) == before - 2 - 1


def test_a_run_killed_between_new_windows_and_old_ones_leaves_nothing_stale(tmp_path, hearing):
    files = media_folder(tmp_path / "media")
    store = open_store(tmp_path / "store", model=model_name(hearing), dim=64)
    index_source(hearing, store, tmp_path / "media")
    long_id = str(files["long.wav"])
    write_tones(files["long.wav"], (HIGH, 1.0))

    class Killed(Exception):
        pass

    class KilledOnRemove:  # the store, as a process killed right after the new windows' commit leaves it
        def __getattr__(self, name):
            return getattr(store, name)

        def remove(self, ids):
            if ids:
                raise Killed

    with pytest.raises(Killed):
        index_source(hearing, KilledOnRemove(), tmp_path / "media")
    assert file_rows(store.hashes(), long_id) == [segment_id(long_id, i) for i in range(3)]  # 1 new, 2 stale

    class Counting:
        def __init__(self):
            self.embedded = 0

        def __getattr__(self, name):
            return getattr(hearing, name)

        def embed_audio_segments(self, audio):
            self.embedded += 1
            return hearing.embed_audio_segments(audio)

    counting = Counting()
    report = index_source(counting, store, tmp_path / "media")
    assert (counting.embedded, report.unchanged, report.failed) == (0, 6, [])
    assert file_rows(store.hashes(), long_id) == [segment_id(long_id, 0)]
    hits = search(hearing, store, audio=tones((HIGH, 1.0)), k=1)
    assert hits[0].id == long_id and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_a_model_without_an_audio_tower_lists_each_sound_and_indexes_the_rest(tmp_path, model):
    files = media_folder(tmp_path / "media")
    store = open_store(tmp_path / "store", model=model_name(model), dim=64)
    report = index_source(model, store, tmp_path / "media")
    assert sorted(report.failed) == [f"{files[n]}: this model has no audio tower (bind one with `rosetta train`'s "
                                     "pairings)" for n in ("long.wav", "short.wav")]
    assert report.added == 4 and sorted(report.ids) == sorted(str(files[n]) for n in ("a.jpg", "b.png", "colours.mp4",
                                                                                       "loud.mp4"))
    # Every CLIP watches videos: the mean of its frames at 1/s, in windows of 32 (a short clip: one).
    hits = search(model, store, image=sample_frames(files["colours.mp4"], fps=1)[3], k=4)
    hit = next(h for h in hits if h.id == str(files["colours.mp4"]))
    assert (hit.metadata["start"], hit.metadata["segments"]) == (0.0, 1)


def test_cli_index_and_search_by_sound_print_the_window(tmp_path, hearing, capsys):
    files = media_folder(tmp_path / "media")
    hearing.save_pretrained(tmp_path / "model")
    (tmp_path / "media" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    store = str(tmp_path / "store")
    common = ["--store", store, "--model", str(tmp_path / "model"), "--device", "cpu"]
    assert main(["index", str(tmp_path / "media"), *common]) == 1
    err = capsys.readouterr().err
    assert "broken.mp4: not a video that decodes" in err and "6 new" in err and "1 failed" in err
    sf.write(tmp_path / "q.wav", tones((LOW, 1.44)), 16_000, subtype="FLOAT")
    assert main(["search", "--audio", str(tmp_path / "q.wav"), "--k", "3", *common]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["id"] == str(files["long.wav"]) and (lines[0]["start"], lines[0]["end"]) == (0.0, 1.44)
    assert lines[0]["score"] == pytest.approx(1.0, abs=1e-4) and len({line["id"] for line in lines}) == 3
    assert main(["search", "a dog barking", "--k", "10", *common]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(map(str, files.values()))
    assert all(("start" in line) == (Path(line["id"]).suffix in (".wav", ".mp4")) for line in lines)
