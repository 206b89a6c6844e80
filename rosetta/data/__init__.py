"""Training data: one record schema over folders, manifests and WebDataset shards; sharding, cleaning,
built-in datasets, and the torch Dataset that turns records into tensors."""

from rosetta.data.dataset import PairDataset
from rosetta.data.records import MODALITIES, read_records, write_manifest

__all__ = ["MODALITIES", "PairDataset", "read_records", "write_manifest"]
