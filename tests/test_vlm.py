"""Vision-language tasks on a tiny untrained model: caption, ask, chat (OpenAI content parts), extract; several
images and videos in a prompt; video frame sampling; bad input; and the caption / ask / extract commands."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import rosetta
from rosetta.errors import InputError
from rosetta.modalities.video import frame_times, sample_frames
from rosetta.models.vlm import user

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return rosetta.create("tiny-vlm").eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, colour in enumerate(COLOURS[:3]):
        image = Image.new("RGB", (48 + 16 * i, 40), colour)
        image.paste((255, 255, 255), (8, 8, 24, 24))
        paths.append(root / f"im{i}.png")
        image.save(paths[-1])
    return paths


def write_video(path, seconds: int, fps: int = 5, size: int = 32, audio_only: bool = False):
    """A video whose frames are one colour per second (COLOURS in turn)."""
    import av

    with av.open(str(path), "w") as out:
        if audio_only:
            stream = out.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.rate = 16000
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
            return path
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.gop_size = fps  # a keyframe a second: seeking has somewhere to land
        for i in range(seconds * fps):
            pixels = np.full((size, size, 3), COLOURS[(i // fps) % len(COLOURS)], np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _colour(image: Image.Image) -> int:
    mean = np.asarray(image.convert("RGB"), np.float32).mean(axis=(0, 1))
    return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in COLOURS]))


def test_caption_ask_and_batches_equal_one_at_a_time(vlm, images):
    captions = vlm.caption(images, max_new_tokens=12)
    assert isinstance(captions, list) and len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captions == [vlm.caption(path, max_new_tokens=12) for path in images]
    assert isinstance(vlm.ask(images[0], "What colour is it?", max_new_tokens=8), str)


def test_the_image_changes_the_answer(vlm, images):
    """The image really reaches the language model: different pixels, different next-token distributions."""
    from rosetta.modalities.image import preprocess

    ids, _ = vlm.prompt([user(images[0], "Colour?")])
    pixels = [preprocess(Image.open(p).convert("RGB"), 32, vlm.config.image)[None] for p in images[:2]]
    with torch.no_grad():
        logits = [vlm(torch.tensor([ids]), px)[0, -1] for px in pixels]
    assert not torch.allclose(logits[0], logits[1])


def test_several_images_in_one_prompt(vlm, images):
    ids, found = vlm.prompt([user(images, "Which two are alike?")])
    assert len(found) == 3 and ids.count(vlm.config.image_token_id) == 3 * vlm.config.image_tokens
    assert isinstance(vlm.ask(images, "Which two are alike?", max_new_tokens=6), str)


def test_openai_content_parts_with_data_urls_equal_paths(vlm, images):
    url = "data:image/png;base64," + base64.b64encode(images[1].read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe it."}]}]
    assert vlm.chat(messages, max_new_tokens=10) == vlm.ask(images[1], "Describe it.", max_new_tokens=10)


@pytest.mark.parametrize("url, reason", [
    ("https://example.com/cat.png", "only data: URLs"), ("data:image/png,abc", "base64"),
    ("data:image/png;base64,@@@", "not valid base64"),
])
def test_remote_and_broken_image_urls_are_refused(vlm, url, reason):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(InputError, match=reason):
        vlm.chat(messages)


def test_bad_images_and_too_many_images_are_clear_errors(vlm, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.png"):
        vlm.ask(broken, "What is it?")
    with pytest.raises(InputError, match="context window"):
        vlm.ask([images[0]] * 40, "Which is different?")  # 40 x 16 tokens > 512
    with pytest.raises(InputError, match="unknown content part"):
        vlm.chat([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}])


def test_extract_always_validates_against_the_schema(vlm, images):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"total": {"type": "number"}, "vendor": {"type": "string",
                                                                                         "maxLength": 12}},
              "required": ["total", "vendor"], "additionalProperties": False}
    for seed in range(3):
        fields = vlm.extract(images[0], schema, temperature=1.0, seed=seed, max_new_tokens=64)
        jsonschema.validate(fields, schema)


def test_frame_times_are_steady_and_capped():
    assert frame_times(3.0) == [0.5, 1.5, 2.5]
    assert frame_times(0.2) == [0.5]
    spread = frame_times(600.0, max_frames=4)
    assert spread == [75.0, 225.0, 375.0, 525.0]
    with pytest.raises(InputError):
        frame_times(3.0, fps=0)


def test_video_frames_are_sampled_at_their_times(tmp_path):
    video = write_video(tmp_path / "colours.mp4", seconds=6)
    frames = sample_frames(video)
    assert [_colour(f) for f in frames] == [0, 1, 2, 3, 4, 5]
    assert [_colour(f) for f in sample_frames(video, max_frames=3)] == [1, 3, 5]  # at 1, 3, 5 s
    assert len(sample_frames(video.read_bytes(), fps=2.0)) == 12


def test_a_long_video_is_sampled_by_seeking(tmp_path):
    video = write_video(tmp_path / "long.mp4", seconds=60, fps=2)
    frames = sample_frames(video, max_frames=5)  # at 6, 18, 30, 42, 54 s: far apart, reached by seeking
    assert [_colour(f) for f in frames] == [t % len(COLOURS) for t in (6, 18, 30, 42, 54)]


def test_videos_without_frames_or_that_do_not_decode_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="no video stream"):
        sample_frames(write_video(tmp_path / "sound.m4a", 1, audio_only=True))
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(InputError, match="junk.mp4"):
        sample_frames(tmp_path / "junk.mp4")


def test_a_video_is_a_sequence_of_frames_in_the_prompt(vlm, tmp_path):
    video = write_video(tmp_path / "clip.mp4", seconds=3)
    ids, frames = vlm.prompt([user(str(video), "What happens?")])
    assert len(frames) == 3 and ids.count(vlm.config.image_token_id) == 3 * vlm.config.image_tokens
    assert isinstance(vlm.ask(str(video), "What happens?", max_new_tokens=6), str)


def test_save_and_load_round_trip(vlm, images, tmp_path):
    vlm.save_pretrained(tmp_path / "vlm")
    again = rosetta.load(tmp_path / "vlm")
    assert again.caption(images[0], max_new_tokens=8) == vlm.caption(images[0], max_new_tokens=8)


# The commands.

def _rosetta(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rosetta", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(vlm, tmp_path_factory):
    return str(vlm.save_pretrained(tmp_path_factory.mktemp("cli") / "tiny-vlm"))


def test_caption_prints_a_json_line_per_image_and_names_the_broken_one(model_dir, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    done = _rosetta("caption", "--model", model_dir, *map(str, images), str(broken), "--max-new-tokens", "6",
                    "--batch-size", "2")
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["path"] for line in lines] == list(map(str, images))
    assert all(isinstance(line["caption"], str) for line in lines)
    errors = [line for line in done.stderr.splitlines() if line.startswith("rosetta:")]
    assert len(errors) == 1 and "broken.jpg" in errors[0]


def test_caption_compiled_prints_the_eager_captions(model_dir, images):
    # fp32: in bf16 the fused kernels keep fp32 between ops where eager rounds after each, so tokens may differ
    eager, compiled = (_rosetta("caption", "--model", model_dir, *map(str, images[:2]), "--max-new-tokens", "6",
                                "--dtype", "fp32", *flag) for flag in ([], ["--compile"]))
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and len(compiled.stdout.splitlines()) == 2


def test_ask_one_per_image_and_together(model_dir, images, tmp_path):
    done = _rosetta("ask", "--model", model_dir, str(images[0]), str(images[1]), "Is it red?", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["path"], line["question"]) for line in lines] == [(str(images[0]), "Is it red?"),
                                                                     (str(images[1]), "Is it red?")]
    video = write_video(tmp_path / "v.mp4", seconds=2)
    done = _rosetta("ask", "--model", model_dir, str(images[0]), str(video), "Same?", "--together",
                    "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert line["paths"] == [str(images[0]), str(video)] and isinstance(line["answer"], str)


def test_extract_writes_fields_that_validate(model_dir, images, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"date": {"type": "string", "maxLength": 10},
                                               "paid": {"type": "boolean"}}, "required": ["date", "paid"],
              "additionalProperties": False}  # bounded: a random model may write digits forever
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    done = _rosetta("extract", "--model", model_dir, "--schema", str(tmp_path / "schema.json"), str(images[0]),
                    "--max-new-tokens", "96")
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(line) for line in done.stdout.splitlines()]
    jsonschema.validate(line["fields"], schema)


@pytest.mark.parametrize("schema, reason", [("{not json", "not valid JSON"), ('{"type": "nonsense"}', "schema")])
def test_a_bad_schema_is_one_line(model_dir, images, tmp_path, schema, reason):
    (tmp_path / "schema.json").write_text(schema)
    done = _rosetta("extract", "--model", model_dir, "--schema", str(tmp_path / "schema.json"), str(images[0]))
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("rosetta: --schema") and reason in line


def test_a_model_that_does_not_see_is_refused(images):
    done = _rosetta("caption", "--model", "tiny-lm", "--random-init", str(images[0]))
    assert done.returncode == 2 and "does not read images" in done.stderr


def test_an_8_megapixel_photo_costs_a_bounded_number_of_tiles():
    from rosetta.models.vlm import Tiling, split_into_tiles

    tiles, rows, cols = split_into_tiles(Image.new("RGB", (3264, 2448), (9, 9, 9)), Tiling(longest_edge=2048, tile=512))
    assert (rows, cols) == (3, 4) and len(tiles) == 13 and all(t.size == (512, 512) for t in tiles)
    tiles, rows, cols = split_into_tiles(Image.new("RGB", (200, 3000)), Tiling(longest_edge=1024, tile=512))
    assert (rows, cols) == (2, 1) and len(tiles) == 3  # a strip: as many tiles as its length needs, no more
    smol = rosetta.presets()["smolvlm-256m"]
    assert smol.image_tokens == 64 and (rows * cols + 1) * smol.image_tokens < smol.text.context_length
