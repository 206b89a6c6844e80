"""Paired records as a map-style torch Dataset: decoding and tokenizing run in DataLoader workers."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch.utils.data import Dataset

from rosetta.data.records import Record, ShardMember, read_records
from rosetta.errors import InputError
from rosetta.modalities.image import load_image, preprocess
from rosetta.modalities.text import TextTokenizer
from rosetta.models.config import AudioConfig, ImageConfig, VideoConfig


class PairDataset(Dataset):
    """One tensor per modality of `modalities` for each record: pixels float32 [3, H, W] for "image", token
    ids long [L] for "text", a log-mel window [n_mels, frames] for "audio", frames [T, 3, H, W] for "video".

    `records` is a list of records, or any source `read_records` reads. Everything here pickles, so
    DataLoader workers can be started with any method. A sample that cannot be used raises
    InputError naming its key and file.
    """

    def __init__(self, records: Iterable[Record] | str | os.PathLike, image_size: int, image_config: ImageConfig,
                 tokenizer: TextTokenizer, modalities: tuple[str, str] = ("image", "text"),
                 audio: AudioConfig | None = None, video: VideoConfig | None = None):
        if isinstance(records, (str, os.PathLike)):
            records = read_records(records)
        self.records = list(records)
        self.image_size = image_size
        self.image_config = image_config
        self.tokenizer = tokenizer
        self.modalities = modalities
        self.audio, self.video = audio, video
        if "audio" in modalities and audio is None:
            raise ValueError("audio samples need the model's audio config")

    @classmethod
    def from_model(cls, records: Iterable[Record] | str | os.PathLike, model,
                   modalities: tuple[str, str] = ("image", "text")) -> PairDataset:
        """Preprocess as `model` (a ContrastiveModel) expects: its image size and config, tokenizer, audio and
        video settings."""
        return cls(records, model.config.vision.image_size, model.config.image, model.tokenizer, modalities,
                   model.config.audio, model.video_config)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        record = self.records[index]
        key = record.get("key", index)
        return tuple(self._load(record, modality, key) for modality in self.modalities)

    def _load(self, record: Record, modality: str, key) -> torch.Tensor:
        from rosetta.models.contrastive import audio_windows, video_pixels

        source = record.get(modality)
        if source is None:
            raise InputError(f"sample {key!r}: no {modality}")
        if modality == "text":
            return self.tokenizer([source])[0]
        try:
            data = source.read() if isinstance(source, ShardMember) else source
            if modality == "image":
                return preprocess(load_image(data), self.image_size, self.image_config)
            if modality == "audio":
                return audio_windows(data, self.audio)[0][0]
            return video_pixels(data, self.video, self.image_size, self.image_config)
        except InputError as e:
            raise InputError(f"sample {key!r}: {e}") from None
