from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel's CPU pool, read when it is imported

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SCIENTIFIC = SHARED_DATA / "scientific"
POSTERS = SHARED_DATA / "ml-100k-posters" / "images"



def _needs_shared(present: bool, reason: str):
    """A test that reads ../shared: skipped with `reason` where it is absent (a newcomer's clone), and marked
    `reads_shared`, the only tests for which the product's search roots include ../shared."""
    def mark(test):
        return pytest.mark.reads_shared(pytest.mark.skipif(not present, reason=reason)(test))
    return mark


needs_scientific = _needs_shared((SCIENTIFIC / "items.tsv").is_file(), f"needs the shared Scientific data at {SCIENTIFIC}")
needs_posters = _needs_shared(POSTERS.is_dir(), f"needs the shared ML-100K posters at {POSTERS}")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, request):
    # Tests must not depend on the developer's own data or cache locations.
    monkeypatch.delenv("IISAN_DATA_DIR", raising=False)
    monkeypatch.delenv("IISAN_CACHE_DIR", raising=False)
    monkeypatch.delenv("IISAN_PIPELINES", raising=False)
    # nor on ../shared: a test behaves in the checkout (../shared beside it) as in a newcomer's clone (none),
    # unless it says it reads it (`needs_scientific`, `needs_posters`, or the `reads_shared` mark)
    if request.node.get_closest_marker("reads_shared") is None:
        import iisan.registry

        monkeypatch.setattr(iisan.registry, "shared_roots", lambda folder: [])


@pytest.fixture(scope="session")
def recbole_wheel(tmp_path_factory) -> Path:
    """The recbole 1.2.1 wheel, downloaded once per session from the package index."""
    from iisan.data.fetch import RECBOLE_REQUIREMENT, download_wheel

    if os.environ.get("IISAN_RECBOLE_WHEEL"):
        return Path(os.environ["IISAN_RECBOLE_WHEEL"])
    return download_wheel(RECBOLE_REQUIREMENT, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory, recbole_wheel) -> Path:
    """ml-100k built by the product's own fetcher, in a fresh folder."""
    from iisan.data.fetch import fetch_ml100k

    dest = tmp_path_factory.mktemp("data") / "ml-100k"
    fetch_ml100k(dest, wheel=recbole_wheel)
    return dest


def write_tsv(path: Path, lines: list[str] | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A toy dataset with images, a registry of tiny encoders and pipelines, and their caches (stage-2 tests)."""
    import numpy as np
    from PIL import Image

    from iisan.extract.run import ExtractConfig, run_extraction
    from tiny_models import WORDS, build_tiny_bert, build_tiny_dinov2, write_registry

    root = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    data = root / "data"
    items = [f"i{k:03d}\t" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for k in range(120)]
    write_tsv(data / "toy" / "items.tsv", items)
    users = [f"u{u}\t" + " ".join(f"i{rng.randrange(100):03d}" for _ in range(rng.randint(5, 15))) for u in range(150)]
    write_tsv(data / "toy" / "users.tsv", users)
    (data / "toy" / "images").mkdir()
    pixels = np.random.default_rng(0)
    for k in range(0, 120, 2):
        Image.fromarray(pixels.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / "toy" / "images" / f"i{k:03d}.jpg")
    write_tsv(data / "plain" / "items.tsv", items)
    write_tsv(data / "plain" / "users.tsv", users)
    models = {"tiny-bert": {"source": str(build_tiny_bert(root / "bert")), "kind": "text", "family": "encoder"},
              "tiny-dino": {"source": str(build_tiny_dinov2(root / "dino")), "kind": "image", "family": "vision"}}
    registry = write_registry(root / "pipelines.yaml", models, {"toy": {}, "plain": {"pipeline": "text-only"}})
    text = registry.read_text() + ("pipelines:\n  text-image: {text: tiny-bert, image: tiny-dino, epochs: 2}\n"
                                   "  text-only: {text: tiny-bert, epochs: 2}\n"
                                   "  ghost: {text: nobody}\n")
    registry.write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IISAN_PIPELINES", str(registry))
        mp.setenv("IISAN_DATA_DIR", str(data))
        for model, dataset in (("tiny-bert", "toy"), ("tiny-dino", "toy"), ("tiny-bert", "plain")):
            run_extraction(ExtractConfig(model=model, dataset=dataset, out=root / "cache", chunk_rows=32,
                                         progress=False), log=lambda m: None)
        for model in ("tiny-bert", "tiny-dino"):  # fp32 caches: cached vs uncached IISAN compared within 1e-5
            run_extraction(ExtractConfig(model=model, dataset="toy", out=root / "cache32", storage_dtype="float32",
                                         progress=False), log=lambda m: None)
        yield root


@pytest.fixture
def env(world, monkeypatch):
    monkeypatch.setenv("IISAN_PIPELINES", str(world / "pipelines.yaml"))
    monkeypatch.setenv("IISAN_DATA_DIR", str(world / "data"))
    return world


def options(world: Path, out: Path, **extra):
    return {"dataset": "toy", "cache": str(world / "cache"), "out": str(out), "progress": False, **extra}


def forget_final_state(path: Path) -> None:
    """Make a store look written before the manifest recorded final_state (the key deleted)."""
    import json

    from iisan.cache_store.backends import backend_for

    backend = backend_for(path).open(path, writable=True)
    if path.suffix == ".zarr":
        raw = dict(backend.group.attrs["iisan"])
        del raw["final_state"]
        backend.group.attrs["iisan"] = raw
    else:
        raw = json.loads(backend.file.attrs["iisan"])
        del raw["final_state"]
        backend.file.attrs["iisan"] = json.dumps(raw)
    backend.close()


def toy_with_cold_targets(env: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the toy world's data in which ten users' test targets are items i100..i119: cached, but in no
    history, so those targets are cold. IISAN_DATA_DIR points at the copy."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(env / "data", data)
    users = (data / "toy" / "users.tsv").read_text().splitlines()
    users = [line.rsplit(" ", 1)[0] + f" i{100 + k:03d}" if k < 10 else line for k, line in enumerate(users)]
    (data / "toy" / "users.tsv").write_text("\n".join(users) + "\n")
    monkeypatch.setenv("IISAN_DATA_DIR", str(data))
    return data
