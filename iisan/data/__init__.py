"""The data layer: IISAN TSV readers, image lookup, the docs/method.md §1.2 protocol, built-in fetchers."""

from iisan.data.dataset import Dataset, DatasetStats, content_fingerprint, dataset_stats, load_dataset
from iisan.data.protocol import ProtocolConfig, SplitData, apply_protocol

__all__ = ["Dataset", "DatasetStats", "content_fingerprint", "dataset_stats", "load_dataset", "ProtocolConfig",
           "SplitData", "apply_protocol"]
