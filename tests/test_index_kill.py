"""`rosetta index` killed with SIGKILL mid-run keeps every committed batch; a rerun finishes the job with no
duplicates, and the store then equals one built by a clean run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rosetta.cli import main
from rosetta.store import open_store
from rosetta.store.embedded import DB_FILE

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")


def rows(store: Path) -> dict[str, tuple]:
    db = sqlite3.connect(store / DB_FILE)
    try:
        found = db.execute("SELECT id, hash, metadata, vector FROM rows JOIN vectors USING (row)").fetchall()
    finally:
        db.close()
    out = {id_: (hash_, json.loads(meta), np.frombuffer(vector, np.float32)) for id_, hash_, meta, vector in found}
    assert len(out) == len(found)
    return out


def count(store: Path) -> int:
    try:
        db = sqlite3.connect(store / DB_FILE, timeout=10)
        try:
            return db.execute("SELECT count(*) FROM rows").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:  # not created yet
        return 0


def kill_when(command: list[str], store: Path, n: int) -> None:
    """Run `command` until `store` holds at least `n` rows, then SIGKILL it (it must still be running)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while count(store) < n and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def test_sigkill_mid_run_then_rerun_equals_a_clean_run(tmp_path):
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    names = [f"img{i:02d}.jpg" for i in range(8)] + ["blocker.jpg"] + [f"img{i:02d}.jpg" for i in range(8, 12)]
    for name in names:
        if name != "blocker.jpg":
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(photos / name)
    # Reading a named pipe blocks until someone writes to it: the run commits the 8 images listed before it
    # (4 batches of 2) and then waits there, mid-run, to be killed.
    os.mkfifo(photos / "blocker.jpg")
    manifest = photos / "list.jsonl"
    manifest.write_text("".join(json.dumps({"image": name, "n": i}) + "\n" for i, name in enumerate(names)))
    store = tmp_path / "store"
    command = [sys.executable, "-m", "rosetta", "index", str(manifest), "--store", str(store),
               "--model", "tiny", "--random-init", "--device", "cpu", "--batch-size", "2"]
    kill_when(command, store, 8)
    assert count(store) == 8

    killed = rows(store)
    assert sorted(Path(i).name for i in killed) == names[:8]

    (photos / "blocker.jpg").unlink()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(photos / "blocker.jpg")
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "5 new, 0 changed, 8 unchanged" in rerun.stderr

    clean = tmp_path / "clean"
    assert main(["index", str(manifest), "--store", str(clean), "--model", "tiny", "--random-init",
                 "--device", "cpu", "--batch-size", "5"]) == 0
    resumed, expected = rows(store), rows(clean)
    assert resumed.keys() == expected.keys() and len(resumed) == len(names)
    for id_, (hash_, meta, vector) in expected.items():
        assert resumed[id_][:2] == (hash_, meta)
        np.testing.assert_allclose(resumed[id_][2], vector, atol=1e-5)
    for id_, (_, _, vector) in killed.items():  # committed before the kill, kept as they were
        np.testing.assert_array_equal(resumed[id_][2], vector)

    reopened = open_store(store)
    assert len(reopened) == len(names) == reopened._index.ntotal
    hits = reopened.search(np.stack([v for _, _, v in expected.values()]), k=len(names))
    assert all(len({h.id for h in row}) == len(names) for row in hits)
    assert all(row[0].id == id_ for row, id_ in zip(hits, expected))
    reopened.close()


def test_sigkill_during_videos_keeps_whole_videos_only_and_a_rerun_completes(tmp_path, capsys):
    from conftest import hearing_model, write_video

    hearing_model().save_pretrained(tmp_path / "model")  # a video tower: windows of 2 s
    clips = tmp_path / "clips"
    clips.mkdir()
    colours = [(220, 30, 30), (30, 60, 220), (30, 200, 60)]
    names = [f"clip{i}.mp4" for i in range(3)] + ["blocker.mp4"]
    for i, name in enumerate(names[:-1]):
        write_video(clips / name, colours[i:] + colours[:i], seconds_each=4.0, rate=2)  # 6 windows of 2 s
    os.mkfifo(clips / "blocker.mp4")  # the run never gets past it: killed while embedding a video, or there
    manifest = clips / "list.jsonl"
    manifest.write_text("".join(json.dumps({"video": name}) + "\n" for name in names))
    store = tmp_path / "store"
    model = ["--model", str(tmp_path / "model"), "--device", "cpu"]
    command = [sys.executable, "-m", "rosetta", "index", str(manifest), "--store", str(store), *model,
               "--batch-size", "2"]
    kill_when(command, store, 1)  # the first video is in; the next is most likely half embedded

    killed = rows(store)
    by_file: dict[str, list[int]] = {}
    for _, meta, _ in killed.values():
        by_file.setdefault(meta["path"], []).append(meta["segment"])
    assert by_file and all(sorted(segments) == list(range(6)) for segments in by_file.values())  # never a part

    (clips / "blocker.mp4").unlink()
    write_video(clips / "blocker.mp4", colours, seconds_each=2.0, rate=2)
    assert main(command[3:]) == 0  # the rerun, in this process: the kill was the other one's
    assert f"{len(names) - len(by_file)} new, 0 changed, {len(by_file)} unchanged" in capsys.readouterr().err
    clean = tmp_path / "clean"
    assert main(["index", str(manifest), "--store", str(clean), *model]) == 0
    resumed, expected = rows(store), rows(clean)
    assert resumed.keys() == expected.keys() and len(resumed) == 3 * 6 + 3
    for id_, (hash_, meta, vector) in expected.items():
        assert resumed[id_][:2] == (hash_, meta)
        np.testing.assert_allclose(resumed[id_][2], vector, atol=1e-5)
