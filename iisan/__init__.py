"""IISAN-Versa: cached side-adapted multimodal foundation models for sequential recommendation.

The stage folders of the repository are installed under this namespace: `iisan.extract`,
`iisan.cache_store`, `iisan.train`, `iisan.evaluate`. The data layer lives in `iisan.data`.
"""

__version__ = "0.1.0"
