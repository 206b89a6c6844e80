"""Video in: frames sampled at a steady rate, decoded with PyAV.

A long video is not decoded whole: between frames that are far apart the decoder seeks to the keyframe
before the next one. `max_frames` caps the count; a video with more frames at `fps` than that is sampled
evenly over its whole length instead.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from rosetta.errors import InputError

VideoInput = str | os.PathLike | bytes
FPS = 1.0  # frames a second, as the VLMs sample video
MAX_FRAMES = 32
SEEK_GAP = 4.0  # seconds: a frame further ahead than this is reached by seeking, not by decoding up to it
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ogv", ".gif"})


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def describe(video: VideoInput) -> str:
    return f"<{len(video)} bytes>" if isinstance(video, bytes) else str(video)


def frame_times(duration: float, fps: float = FPS, max_frames: int = MAX_FRAMES) -> list[float]:
    """When to take frames from a video of `duration` seconds: every 1/fps seconds from the middle of the first
    interval, or `max_frames` spread evenly when that would be more."""
    if fps <= 0 or max_frames < 1:
        raise InputError("fps must be positive and max_frames at least 1")
    count = max(1, int(duration * fps))
    if count > max_frames:
        return [(i + 0.5) * duration / max_frames for i in range(max_frames)]
    return [(i + 0.5) / fps for i in range(count)]


def sample_frames(video: VideoInput, fps: float = FPS, max_frames: int = MAX_FRAMES) -> list[Image.Image]:
    """RGB frames of `video` (a path or the file's bytes) at `fps`, at most `max_frames`."""
    return [frame for _, frame in timed_frames(video, fps, max_frames)]


def timed_frames(video: VideoInput, fps: float = FPS, max_frames: int | None = MAX_FRAMES
                 ) -> Iterator[tuple[float, Image.Image]]:
    """(time in seconds, RGB frame) of `video` at `fps`, decoded as they are consumed: a long video is never held
    whole. `max_frames=None`: every frame at `fps`, however long the video."""
    import av

    name = describe(video)
    source = io.BytesIO(video) if isinstance(video, bytes) else str(Path(video))
    if isinstance(video, (str, os.PathLike)) and not Path(video).is_file():
        raise InputError(f"{name}: {'is a directory' if Path(video).is_dir() else 'no such file'}")
    count = 0
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise InputError(f"{name}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            duration = _duration(container, stream)
            times = frame_times(duration, fps, max_frames if max_frames is not None else 1 << 62)
            for timed in _frames_at(container, stream, times):
                count += 1
                yield timed
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"{name}: not a video that decodes ({type(e).__name__}: {e})") from None
    if not count:
        raise InputError(f"{name}: a video without frames")


def video_duration(video: VideoInput) -> float:
    """How long a video is, in seconds, as its container says (0 when it does not), without decoding it;
    InputError if it does not open as a video."""
    import av

    name = describe(video)
    source = io.BytesIO(video) if isinstance(video, bytes) else str(Path(video))
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise InputError(f"{name}: no video stream")
            return _duration(container, container.streams.video[0])
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"{name}: not a video that decodes ({type(e).__name__}: {e})") from None


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return 0.0  # unknown: the first frame is taken, then frames as they come


def _frames_at(container, stream, times: list[float]) -> Iterator[tuple[float, Image.Image]]:
    """(time shown, the frame on screen) at each of `times`: the last frame shown at or before it (the first
    frame for a time before it, the last frame for times past the end).

    One decoding pass between seeks, read one frame ahead: asked again, a drained decoder would fail.
    """
    decoded = container.decode(stream)
    current = upcoming = image = None
    for target in times:
        shown = _time(current)
        if target - shown > SEEK_GAP and stream.time_base is not None:
            container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
            decoded, current, upcoming = container.decode(stream), None, None
        while True:
            frame = upcoming if upcoming is not None else next(decoded, None)
            upcoming = None
            if frame is None:  # the end: the last frame stays on screen
                break
            if current is not None and _time(frame) > target + 1e-6:
                upcoming = frame
                break
            current, image = frame, None
        if current is None:
            return
        if image is None:
            image = _image(current, _time(current))
        yield _time(current), image


def _time(frame) -> float:
    return float(frame.time) if frame is not None and frame.time is not None else 0.0


def _image(frame, time: float) -> Image.Image:
    """The frame as a PIL image that says it is one (`info["frame_time"]`): a tiling VLM takes a frame whole."""
    image = frame.to_image()
    image.info["frame_time"] = time
    return image
