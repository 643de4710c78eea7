"""`make demo` / `iisan demo`: the whole main job on the embedded default, MovieLens-100K.

Fetch the dataset and the offline encoders, extract (title with MiniLM-L6, posters with DINOv2-S when the
posters are present, else the year/genre text with MiniLM-L6), train IISAN and print the report.
"""

from __future__ import annotations

from pathlib import Path

from iisan.data.dataset import dataset_stats, load_dataset
from iisan.data.fetch import fetch_ml100k
from iisan.extract.run import ExtractConfig, run_extraction
from iisan.train.config import resolve
from iisan.train.recipe import run
from iisan.train.result import RunResult, RunSpec


def run_demo(cache: Path = Path("cache"), out: Path = Path("runs"), log=print) -> RunResult:
    fetch_ml100k(Path("data") / "ml-100k")
    dataset = load_dataset("ml-100k")
    stats = dataset_stats(dataset)
    log(f"ml-100k: {stats.users:,} users, {stats.items:,} items, {stats.interactions:,} interactions, "
        f"{stats.items_with_image:,} items with a poster")
    posters = stats.file_items_with_image > 0
    run_extraction(ExtractConfig(model="minilm-l6", dataset="ml-100k", out=cache), log=log)
    if posters:
        run_extraction(ExtractConfig(model="dinov2-small", dataset="ml-100k", out=cache), log=log)
        pipeline = {"pipeline": "text-image"}
    else:
        log("no posters found (../shared/data/ml-100k-posters): using the year/genre text as the second modality")
        run_extraction(ExtractConfig(model="minilm-l6", dataset="ml-100k", text_field="year_genres", out=cache),
                       log=log)
        pipeline = {"pipeline": "multimodal-text"}
    return run(RunSpec(resolve({"dataset": "ml-100k", **pipeline, "cache": str(cache), "out": str(out)})), log=log)
