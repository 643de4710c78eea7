"""The format-independent part of `iisan data import`: items and interactions in, the IISAN TSV layout out.

Each format's reader (iisan/data/importers.py, amazon.py, tables.py) feeds rows to a DatasetBuilder with the
file and line (or record / row number) they came from; the builder checks and counts every problem in a
DataReport, so that nothing is dropped silently and `--strict` refuses the first one:

- an item id that is empty or holds whitespace is an error (histories are split on whitespace);
- a repeated item id keeps the first row (counted), an empty title is kept (counted);
- an interaction with an empty or non-numeric timestamp is skipped (counted), then one whose item is not in
  the items table (counted); of events with the same user, item and timestamp one is kept (counted).

Histories are sorted by timestamp with ties in file order (a stable sort); users are written in
`sort_user_ids` order; items in the items table's order, every item of it, with or without interactions.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from iisan.data.images import IMAGE_SUFFIXES, MISSING_IMAGE_FILE
from iisan.data.layout import clean_text, safe_file_stem, sort_user_ids, write_lines
from iisan.data.readers import DUPLICATE_ITEM, EMPTY_TITLE
from iisan.data.report import DataReport
from iisan.errors import DataError, IisanError

BAD_TIMESTAMP = "a non-numeric or empty timestamp"
UNKNOWN_EVENT_ITEM = "an interaction with an item id not in the items table"
DUPLICATE_EVENT = "a duplicate interaction (same user, item and timestamp)"
UNSUPPORTED_IMAGE = "an image file that is not .jpg, .jpeg or .png"
UNNAMEABLE_IMAGE = "an item id that cannot name an image file"


def as_text(value: Any) -> str:
    """A cell as text: None is empty; an integral float (a column widened by missing values) has no `.0`."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def parse_time(value: Any) -> float | int | None:
    """A timestamp as a number (int where it is one), or None when it is empty, non-numeric or not finite.
    Date and datetime values (typed Parquet columns) become POSIX seconds."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day).timestamp()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


@dataclass
class Parsed:
    """What a format's reader hands back: the filled builder and what to say about where it came from."""

    builder: "DatasetBuilder"
    files: list[tuple[Path, str]]        # every source file with its role (interactions, items, ...)
    items_file: Path
    origins: dict[str, str]              # field -> the source column or key it was read from
    image_url_field: str = ""
    notes: tuple[str, ...] = ()          # what else the SOURCE.md should say (columns ignored, ...)


@dataclass
class Counts:
    users: int = 0
    items: int = 0
    interactions: int = 0

    def line(self) -> str:
        return f"{self.users:,} users, {self.items:,} items, {self.interactions:,} interactions"


class DatasetBuilder:
    """Collects items (with their text fields, optionally an image file) and interactions, checking each."""

    def __init__(self, fields: list[str], report: DataReport):
        repeated = sorted({f for f in fields if list(fields).count(f) > 1})
        if repeated:
            raise IisanError(f"two text fields would be called {', '.join(repeated)} (the first text column is "
                             f"always written as 'title'); fields: {', '.join(fields)}")
        self.fields = list(fields)
        self.report = report
        self.items: dict[str, list[str]] = {}
        self.item_lines: dict[str, int] = {}
        self.images: dict[str, Path] = {}
        self.events: dict[str, list[tuple[float | int, str, int]]] = {}
        self.events_path = ""
        self.item_rows = 0
        self.event_rows = 0
        self.users_read: set[str] = set()

    # --- items -------------------------------------------------------------------------------------------
    def add_item(self, path: str | Path, line: int, raw_id: Any, values: list[Any], image: Path | None = None) -> None:
        """One row of the items table: its id, one value per field (first the title), an image file or None."""
        self.item_rows += 1
        item_id = as_text(raw_id).strip()
        if not item_id:
            raise DataError(path, "empty item id", line)
        if len(item_id.split()) > 1:
            raise DataError(path, f"item id {item_id!r} contains whitespace (histories are split on whitespace)",
                            line)
        if item_id in self.items:
            self.report.add(path, line, DUPLICATE_ITEM, "kept the first occurrence",
                            f"'{item_id}' first seen at line {self.item_lines[item_id]}")
            return
        texts = [clean_text(as_text(v)) for v in values]
        if not texts[0]:
            self.report.add(path, line, EMPTY_TITLE, "the item is kept with empty text", f"'{item_id}'")
        self.items[item_id] = texts
        self.item_lines[item_id] = line
        if image is not None:
            self._add_image(path, line, item_id, image)

    def _add_image(self, path: str | Path, line: int, item_id: str, image: Path) -> None:
        if not image.is_file():
            self.report.add(path, line, MISSING_IMAGE_FILE, "the item has no image", f"'{item_id}': {image}")
        elif image.suffix.lower() not in IMAGE_SUFFIXES:
            self.report.add(path, line, UNSUPPORTED_IMAGE, "the item has no image", f"'{item_id}': {image.name}")
        elif not safe_file_stem(item_id):
            self.report.add(path, line, UNNAMEABLE_IMAGE, "the item has no image", f"'{item_id}'")
        else:
            self.images[item_id] = image

    # --- interactions ------------------------------------------------------------------------------------
    def add_event(self, path: str | Path, line: int, raw_user: Any, raw_item: Any, raw_time: Any) -> None:
        """One interaction. Call after every item has been added: its item id is looked up in the items."""
        self.event_rows += 1
        self.events_path = str(path)
        user = as_text(raw_user).strip()
        if not user:
            raise DataError(path, "empty user id", line)
        if "\t" in user or "\n" in user or "\r" in user:
            raise DataError(path, f"user id {user!r} contains a tab or a line break", line)
        self.users_read.add(user)
        time = parse_time(raw_time)
        if time is None:
            self.report.add(path, line, BAD_TIMESTAMP, "the interaction was skipped",
                            f"user '{user}' timestamp {as_text(raw_time)!r}")
            return
        item = as_text(raw_item).strip()
        if item not in self.items:
            self.report.add(path, line, UNKNOWN_EVENT_ITEM, "the interaction was skipped",
                            f"user '{user}' item '{item}'")
            return
        self.events.setdefault(user, []).append((time, item, line))

    def histories(self) -> list[tuple[str, list[str]]]:
        """(user, item ids by time, ties in file order) in `sort_user_ids` order; of events with the same user,
        item and time the first in the file is kept and the others are counted, in line order."""
        out: list[tuple[str, list[str]]] = []
        repeats: list[tuple[int, str, str, int]] = []
        for user in sort_user_ids(self.events):
            kept: list[str] = []
            run_time: float | int | None = None
            run: dict[str, int] = {}
            for time, item, line in sorted(self.events[user], key=lambda event: event[0]):
                if time != run_time:
                    run_time, run = time, {}
                if item in run:
                    repeats.append((line, user, item, run[item]))
                    continue
                run[item] = line
                kept.append(item)
            out.append((user, kept))
        for line, user, item, first in sorted(repeats):
            self.report.add(self.events_path, line, DUPLICATE_EVENT, "kept once",
                            f"user '{user}' item '{item}' as at line {first}")
        return out

    @property
    def read(self) -> Counts:
        """What the source files hold: distinct users among the interaction rows, item rows, interaction rows."""
        return Counts(len(self.users_read), self.item_rows, self.event_rows)

    # --- output ------------------------------------------------------------------------------------------
    def write(self, folder: Path, items_source: str | Path) -> tuple[Counts, int]:
        """Write items.tsv, users.tsv and images/ into `folder`; (written counts, images copied)."""
        if not self.items:
            raise DataError(items_source, "no items")
        histories = self.histories()
        if not histories:
            raise DataError(self.events_path or items_source, "no interactions left to write")
        write_lines(folder / "items.tsv", ("\t".join([item_id, *texts]) for item_id, texts in self.items.items()))
        write_lines(folder / "users.tsv", (f"{user}\t{' '.join(items)}" for user, items in histories))
        if self.images:
            (folder / "images").mkdir()
            for item_id, source in self.images.items():
                _link_or_copy(source, folder / "images" / f"{item_id}{source.suffix.lower()}")
        written = Counts(len(histories), len(self.items), sum(len(items) for _, items in histories))
        return written, len(self.images)


def _link_or_copy(source: Path, dest: Path) -> None:
    """A hard link where the file system allows one (no extra space), else a copy."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)
