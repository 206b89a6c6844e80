"""Image-text pairs as a map-style torch Dataset: decoding and tokenizing run in DataLoader workers."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch.utils.data import Dataset

from rosetta.data.records import Record, ShardMember, read_records
from rosetta.errors import InputError
from rosetta.modalities.image import load_image, preprocess
from rosetta.modalities.text import TextTokenizer
from rosetta.models.config import ImageConfig


class PairDataset(Dataset):
    """(pixels float32 [3, H, W], token ids long [L]) per record with an "image" and a "text".

    `records` is a list of records, or any source `read_records` reads. Everything here pickles, so
    DataLoader workers can be started with any method. A sample that cannot be used raises
    InputError naming its key and file.
    """

    def __init__(self, records: Iterable[Record] | str | os.PathLike, image_size: int, image_config: ImageConfig,
                 tokenizer: TextTokenizer):
        if isinstance(records, (str, os.PathLike)):
            records = read_records(records)
        self.records = list(records)
        self.image_size = image_size
        self.image_config = image_config
        self.tokenizer = tokenizer

    @classmethod
    def from_model(cls, records: Iterable[Record] | str | os.PathLike, model) -> PairDataset:
        """Preprocess as `model` (a ContrastiveModel) expects: its image size, image config and tokenizer."""
        return cls(records, model.config.vision.image_size, model.config.image, model.tokenizer)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.records[index]
        key = record.get("key", index)
        if record.get("image") is None:
            raise InputError(f"sample {key!r}: no image")
        if record.get("text") is None:
            raise InputError(f"sample {key!r}: no text")
        try:
            source = record["image"]
            image = load_image(source.read() if isinstance(source, ShardMember) else source)
        except InputError as e:
            raise InputError(f"sample {key!r}: {e}") from None
        return preprocess(image, self.image_size, self.image_config), self.tokenizer([record["text"]])[0]
