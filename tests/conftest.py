from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel's CPU pool, read when it is imported

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SCIENTIFIC = SHARED_DATA / "scientific"
POSTERS = SHARED_DATA / "ml-100k-posters" / "images"

needs_scientific = pytest.mark.skipif(not (SCIENTIFIC / "items.tsv").is_file(),
                                      reason=f"needs the shared Scientific data at {SCIENTIFIC}")
needs_posters = pytest.mark.skipif(not POSTERS.is_dir(), reason=f"needs the shared ML-100K posters at {POSTERS}")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    # Tests must not depend on the developer's own data or cache locations.
    monkeypatch.delenv("IISAN_DATA_DIR", raising=False)
    monkeypatch.delenv("IISAN_CACHE_DIR", raising=False)
    monkeypatch.delenv("IISAN_PIPELINES", raising=False)


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
