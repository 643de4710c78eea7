"""Built-in dataset fetchers. `ml-100k` is built in the IISAN TSV format from the recbole 1.2.1 wheel on
PyPI (MovieLens-100K under `recbole/dataset_example/ml-100k/`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from iisan.data.atomic import parse_atomic
from iisan.data.layout import clean_text, file_sha256, sort_user_ids, write_lines
from iisan.errors import DataError, IisanError

RECBOLE_REQUIREMENT = "recbole==1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k"


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into `dest` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise IisanError(f"could not download {requirement} from the package index "
                         f"({' '.join(cmd)}):\n{result.stderr.strip()}")
    return wheels[0]


def build_ml100k(wheel: Path, dest: Path) -> dict[str, int]:
    """Convert the wheel's ml-100k atomic files into `dest/items.tsv` and `dest/users.tsv`.

    items: `item_id \\t title \\t year_genres` in the .item file's order, recbole's item ids kept.
    users: `user_id \\t items…`, each user's interactions sorted by timestamp, ties in file order.
    """
    with zipfile.ZipFile(wheel) as z:
        item_table, inter_table = (parse_atomic(z.read(member).decode("utf-8"), f"{z.filename}!{member}")
                                   for member in (ML100K_MEMBER + ".item", ML100K_MEMBER + ".inter"))
    col = {name: i for i, name in enumerate(item_table.names)}
    items = []
    for _, row in item_table.rows:
        year = row[col["release_year"]].strip()
        genres = ", ".join(row[col["class"]].split())
        year_genres = "; ".join(part for part in (f"released {year}" if year else "",
                                                  f"genres: {genres}" if genres else "") if part)
        items.append(f"{row[col['item_id']].strip()}\t{clean_text(row[col['movie_title']])}\t{year_genres}")
    col = {name: i for i, name in enumerate(inter_table.names)}
    by_user: dict[str, list[tuple[float, str]]] = {}
    for _, row in inter_table.rows:
        by_user.setdefault(row[col["user_id"]], []).append((float(row[col["timestamp"]]), row[col["item_id"]]))
    users = []
    for user in sort_user_ids(by_user):  # numeric ids in numeric order
        history = sorted(by_user[user], key=lambda pair: pair[0])  # stable: ties keep file order
        users.append(f"{user}\t{' '.join(item for _, item in history)}")
    dest.mkdir(parents=True, exist_ok=True)
    write_lines(dest / "items.tsv", items)
    write_lines(dest / "users.tsv", users)
    digest = file_sha256(wheel)
    write_lines(dest / "SOURCE.md", [
        "# MovieLens-100K in the IISAN TSV format",
        "",
        f"Built by `iisan data fetch ml-100k` from `{wheel.name}` (sha256 {digest}),",
        f"members `{ML100K_MEMBER}.item` and `.inter`.",
        "items.tsv: item_id, title, year_genres. users.tsv: user_id, items by timestamp (ties in file order).",
        "MovieLens terms allow research use but not redistribution: do not commit these files.",
    ])
    return {"items": len(items), "users": len(users), "interactions": len(inter_table.rows)}


def fetch_ml100k(dest: Path, force: bool = False, wheel: Path | None = None) -> tuple[Path, dict[str, int] | None]:
    """Build ml-100k at `dest` unless it is already there. Returns (dest, counts or None if skipped)."""
    if not force and (dest / "items.tsv").is_file() and (dest / "users.tsv").is_file():
        return dest, None
    if wheel is None and os.environ.get("IISAN_RECBOLE_WHEEL"):
        wheel = Path(os.environ["IISAN_RECBOLE_WHEEL"])
    if wheel is not None:
        if not wheel.is_file():
            raise DataError(wheel, "wheel file not found")
        return dest, build_ml100k(wheel, dest)
    with tempfile.TemporaryDirectory(prefix="iisan-recbole-") as tmp:
        return dest, build_ml100k(download_wheel(RECBOLE_REQUIREMENT, Path(tmp)), dest)


FETCHERS = {"ml-100k": fetch_ml100k}


def fetch(name: str, dest: Path | None = None, force: bool = False, wheel: Path | None = None
          ) -> tuple[Path, dict[str, int] | None]:
    """Build a built-in dataset (`iisan data fetch NAME`) at `dest` (default ./data/NAME)."""
    if name not in FETCHERS:
        raise IisanError(f"no built-in fetcher for '{name}' (available: {', '.join(FETCHERS)}); other datasets "
                         f"are folders of items.tsv / users.tsv found in $IISAN_DATA_DIR, ./data or ../shared/data")
    return FETCHERS[name](Path(dest) if dest else Path("data") / name, force=force, wheel=wheel)
