"""Which modality an input is: by a path's suffix, by a file's first bytes, by an array's shape.

One answer for every entry point (the model's `embed` and `classify`, the index, the server), so that
a WAV is heard and an MP4 watched wherever it is handed in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rosetta.modalities.audio import AUDIO_SUFFIXES
from rosetta.modalities.image import IMAGE_SUFFIXES
from rosetta.modalities.video import VIDEO_SUFFIXES

MODALITIES = ("image", "audio", "video")

# File signatures: (offset, bytes) -> modality, and the suffix such a file goes by. MP4/MOV carry "ftyp" at
# byte 4; Matroska and WebM (audio or video: taken as video, which says whether it has an audio track) start
# with EBML's magic. RIFF holds WAV, but also AVI and WebP: its form type (byte 8) tells them apart.
_SIGNATURES = (
    (0, b"RIFF", "audio", ".wav"), (0, b"fLaC", "audio", ".flac"), (0, b"OggS", "audio", ".ogg"),
    (0, b"ID3", "audio", ".mp3"), (0, b"\xff\xfb", "audio", ".mp3"), (0, b"\xff\xf3", "audio", ".mp3"),
    (0, b"\xff\xf1", "audio", ".aac"), (0, b"\xff\xf9", "audio", ".aac"),
    (4, b"ftyp", "video", ".mp4"), (0, b"\x1a\x45\xdf\xa3", "video", ".mkv"),
)
_AUDIO_ONLY_BRANDS = (b"M4A ", b"M4B ", b"dash")  # MP4 containers that hold sound only
_RIFF_FORMS = {b"AVI ": ("video", ".avi"), b"WEBP": ("image", None)}  # any other form is taken as WAV


def modality_of(item) -> str:
    """"image", "audio" or "video" for a path, a file's bytes, a PIL image, an array or a tensor."""
    if isinstance(item, (str, os.PathLike)):
        suffix = Path(item).suffix.lower()
        if suffix in IMAGE_SUFFIXES:  # before the video suffixes: a GIF is embedded as a picture
            return "image"
        if suffix in VIDEO_SUFFIXES:
            return "video"
        return "audio" if suffix in AUDIO_SUFFIXES else "image"
    if isinstance(item, (bytes, bytearray)):
        return _sniff(bytes(item[:16]))
    if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 1:
        return "audio"  # a waveform; images are 2-D or 3-D
    return "image"


def find_media(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Directories expanded (recursively, sorted) into the image, sound and video files they hold; files kept
    as given."""
    suffixes = IMAGE_SUFFIXES | AUDIO_SUFFIXES | VIDEO_SUFFIXES
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes))
        else:
            found.append(path)
    return found


def media_suffix(data: bytes) -> str | None:
    """The suffix a sound or video file of these bytes goes by (".wav", ".m4a", ".mp4"...; None for an image),
    so that saved uploads are read as what they are by a path's suffix (`modality_of`) and served with their
    media type."""
    return _identify(bytes(data[:16]))[1]


def _sniff(head: bytes) -> str:
    return _identify(head)[0]


def _identify(head: bytes) -> tuple[str, str | None]:
    for offset, magic, modality, suffix in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            if magic == b"ftyp" and head[8:12] in _AUDIO_ONLY_BRANDS:
                return "audio", ".m4a"
            if magic == b"RIFF":
                return _RIFF_FORMS.get(head[8:12], (modality, suffix))
            return modality, suffix
    return "image", None
