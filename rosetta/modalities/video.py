"""Video in: frames sampled at a steady rate, decoded with PyAV.

A long video is not decoded whole: between frames that are far apart the decoder seeks to the keyframe
before the next one. `max_frames` caps the count; a video with more frames at `fps` than that is sampled
evenly over its whole length instead.
"""

from __future__ import annotations

import io
import os
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
    import av

    name = describe(video)
    source = io.BytesIO(video) if isinstance(video, bytes) else str(Path(video))
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise InputError(f"{name}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            duration = _duration(container, stream)
            frames = _frames_at(container, stream, frame_times(duration, fps, max_frames))
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"{name}: not a video that decodes ({type(e).__name__}: {e})") from None
    if not frames:
        raise InputError(f"{name}: a video without frames")
    return frames


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return 0.0  # unknown: the first frame is taken, then frames as they come


def _frames_at(container, stream, times: list[float]) -> list[Image.Image]:
    """The first frame at or after each time (the last frame for times past the end)."""
    frames: list[Image.Image] = []
    wanted = iter(times)
    target = next(wanted)
    position = taken = 0.0  # where the decoder is, and the time of the last frame taken
    last = None
    while target is not None:
        if target - position > SEEK_GAP and stream.time_base is not None:
            container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            position = float(frame.time) if frame.time is not None else position
            last = frame
            if position + 1e-6 >= target:
                break
        else:  # the video ends before the target: its last frame stands for the rest
            if last is not None and (not frames or position > taken):
                frames.append(last.to_image())
            return frames
        frames.append(last.to_image())
        taken = position
        target = next(wanted, None)
        while target is not None and target <= position + 1e-6:  # several times on one frame: take it once more
            frames.append(frames[-1])
            target = next(wanted, None)
    return frames
