"""Video in: frames sampled at a steady rate, decoded with PyAV.

A video is not decoded whole. Between frames that are far apart the decoder seeks to the keyframe before
the next one ("far": a keyframe is due before it, by the keyframe interval seen so far). Non-reference
frames (the B-frames no other frame is predicted from: a third to a half of a typical H.264 stream) are
skipped unless they start shortly before a wanted time. `max_frames` caps the count; a video with more
frames at `fps` than that is sampled evenly over its whole length instead.
"""

from __future__ import annotations

import io
import os
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from rosetta.errors import InputError

VideoInput = str | os.PathLike | bytes
FPS = 1.0  # frames a second, as the VLMs sample video
MAX_FRAMES = 32
SEEK_GAP = 4.0  # seconds: until two keyframes have been seen, a frame further ahead is reached by seeking
GUARD_FRAMES = 2  # frame intervals before a wanted time in which every frame is decoded
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
    """(time shown, the frame on screen) at each of `times` (ascending): the last frame shown at or before it
    (the first frame for a time before it, the last frame for times past the end).

    Every frame starting within GUARD_FRAMES frame intervals before a time is decoded, so the frame taken is
    the one on screen whenever one starts that close (any steady-rate video); a variable-rate video that
    shows a frame longer than that may give the last reference frame before it instead.
    One decoding pass between seeks, read one frame ahead: asked again, a drained decoder would fail.
    """
    rate = float(stream.average_rate or 0)
    guard = GUARD_FRAMES / rate if rate > 0 else 0.1

    def near_a_time(t: float) -> bool:
        i = bisect_left(times, t - 1e-6)
        return i < len(times) and times[i] - t <= guard

    decoded = _decode(container, stream, near_a_time)
    current = upcoming = image = None
    keyframes: list[float] = []  # times of the last two keyframes decoded
    for target in times:
        shown = _time(current)
        if _keyframe_before(target, shown, keyframes) and stream.time_base is not None:
            # A little before the time: containers index keyframes by decoding time, up to a few frames ahead.
            container.seek(int(max(0.0, target - guard) / stream.time_base), stream=stream, backward=True,
                           any_frame=False)
            decoded, current, upcoming = _decode(container, stream, near_a_time), None, None
        while True:
            frame = upcoming if upcoming is not None else next(decoded, None)
            upcoming = None
            if frame is None:  # the end: the last frame stays on screen
                break
            if frame.key_frame and (not keyframes or _time(frame) > keyframes[-1]):
                keyframes = [*keyframes[-1:], _time(frame)]
            if current is not None and _time(frame) > target + 1e-6:
                upcoming = frame
                break
            current, image = frame, None
        if current is None:
            return
        if image is None:
            image = _image(current, _time(current))
        yield _time(current), image


def _keyframe_before(target: float, shown: float, keyframes: list[float]) -> bool:
    """Whether a keyframe is due after the frame on screen at `shown` and by `target`: then seeking to it skips
    decoding the frames between. Keyframes are taken to keep the interval between the last two seen (the
    encoder's GOP); before two are seen, a target more than SEEK_GAP ahead is taken to have one."""
    if len(keyframes) < 2 or keyframes[1] <= keyframes[0]:
        return target - shown > SEEK_GAP
    last, interval = keyframes[1], keyframes[1] - keyframes[0]
    due = last + interval * ((shown - last) // interval + 1)
    return due <= target


def _decode(container, stream, wanted) -> Iterator:
    """The frames of `stream` from where the container stands, packet by packet: a non-reference frame is
    skipped unless `wanted(its time)`. (FFmpeg reads `skip_frame` as each packet is sent, threads or not.)"""
    context = stream.codec_context
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:  # the last, flushing packet has no time
            context.skip_frame = "DEFAULT" if wanted(float(packet.pts * packet.time_base)) else "NONREF"
        yield from packet.decode()


def _time(frame) -> float:
    return float(frame.time) if frame is not None and frame.time is not None else 0.0


def _image(frame, time: float) -> Image.Image:
    """The frame as a PIL image that says it is one (`info["frame_time"]`): a tiling VLM takes a frame whole."""
    image = frame.to_image()
    image.info["frame_time"] = time
    return image
