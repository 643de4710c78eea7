"""The Python API, for notebooks: the functions the command line calls, nothing re-implemented.

    from iisan import api

    api.fetch("ml-100k")                                   # the embedded default dataset
    api.extract("minilm-l6", "ml-100k")                    # stage 1: cached title states
    result = api.train("ml-100k", pipeline="text-only", epochs=5)
    result.mean("HR@10", "test"), result.group("test", "cold")
    run = api.load_run(result.run_dir)
    run.recommend([["50", "172", "181"]], k=5)             # top-5 for a history of raw item ids
    ids, vectors = run.item_embeddings()                   # every cached item, [M, d]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iisan.data.dataset import Dataset
from iisan.deploy.run import Recommendation, TrainedRun
from iisan.deploy.run import load_run as _load_run
from iisan.train.result import RunResult, RunSpec

__all__ = ["Dataset", "Recommendation", "RunResult", "RunSpec", "TrainedRun", "fetch", "load_dataset", "extract", "train", "load_run",
           "export"]


def fetch(name: str = "ml-100k", dest: str | Path | None = None, force: bool = False) -> Path:
    """Build a dataset the product fetches itself (`iisan data fetch NAME`, into ./data/NAME by default);
    returns its folder."""
    from iisan.data.fetch import fetch as _fetch

    return _fetch(name, Path(dest) if dest else None, force)[0]


def load_dataset(ref: str | Path, strict: bool = False) -> Dataset:
    """A registered dataset name or a dataset folder (`iisan data stats`)."""
    from iisan.data.dataset import load_dataset as _load

    return _load(ref, strict=strict)


def extract(model: str, dataset: str | Path, **options: Any):
    """Stage 1 (`iisan extract --model MODEL --dataset D`); options are ExtractConfig's fields (layers,
    text_field, out, fmt, device, batch_size, ...). Returns the ExtractResult (its `path` is the store)."""
    from iisan.extract.run import ExtractConfig, run_extraction

    return run_extraction(ExtractConfig(model=model, dataset=str(dataset), progress=False, **options),
                          log=lambda message: None)


def train(dataset: str | Path, log=print, reuse: bool = False, **options: Any) -> RunResult:
    """Stage 2 (`iisan train --dataset D ...`); options are `iisan train`'s (TrainConfig fields: method,
    pipeline, epochs, seeds, ...). Returns the typed `RunResult` (`.run_dir`, `.mean("HR@10", "test")`, seeds,
    warm / cold groups). `reuse`: a run of the same resolved config is reported again or continued."""
    from iisan.train.config import resolve
    from iisan.train.recipe import run

    return run(RunSpec(resolve({"dataset": str(dataset), "progress": False, **options}, log=log), reuse=reuse),
               log=log)


def load_run(run_dir: str | Path, seed: int | None = None) -> TrainedRun:
    """A finished run, every cached item embedded: `.recommend(histories, k)`, `.item_embeddings()`,
    `.embed_items(ids)`, `.dataset_requests(users, split)` + `.rank(...)`."""
    return _load_run(run_dir, seed)


def export(run_dir: str | Path, out: str | Path, faiss: bool = False) -> dict[str, Any]:
    """`iisan export`: embeddings, the user program, meta.json (and FAISS indexes); returns meta.json's content."""
    from iisan.deploy.export import export_run

    return export_run(_load_run(run_dir), Path(out), faiss)
