"""Readers for the IISAN TSV format (docs/method.md §1.1).

items: `item_id \\t title [\\t more text fields]`, no header. users: `user_id \\t id1 id2 ...`, no header,
chronological. Hard errors (missing file, wrong column count, empty id) raise DataError naming file and
line; recoverable problems (duplicate ids, empty titles, undecodable bytes, unknown items in a history,
blank lines) are counted in a DataReport and never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from iisan.data.report import DataReport
from iisan.errors import DataError

NON_UTF8 = "non-UTF-8 bytes"
BLANK = "a blank line"
DUPLICATE_ITEM = "a duplicate item id"
EMPTY_TITLE = "an empty title"
DUPLICATE_USER = "a duplicate user id"
UNKNOWN_ITEM = "an item id not in the items file"
EMPTY_HISTORY = "an empty history"


@dataclass
class ItemTable:
    """Items in file order (first occurrence of each id)."""

    path: Path
    ids: list[str]
    fields: dict[str, list[str]]  # field name -> one text per item, aligned with ids
    lines: list[int]              # line number of each kept item

    def __post_init__(self) -> None:
        self.position = {item_id: i for i, item_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class UserTable:
    """Users in file order with their chronological item-id sequences (unknown items removed, counted)."""

    path: Path
    ids: list[str]
    sequences: list[list[str]]

    def __len__(self) -> int:
        return len(self.ids)


def _lines(path: Path, report: DataReport) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) of non-blank lines, decoding UTF-8 and reporting what it cannot decode."""
    if not path.is_file():
        raise DataError(path, "file not found")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.add(path, number, NON_UTF8, "the bytes were replaced by U+FFFD",
                           f"byte 0x{raw[e.start]:02x} at column {e.start + 1}")
                text = raw.decode("utf-8", errors="replace")
            text = text.rstrip("\r\n")
            if not text.strip():
                report.add(path, number, BLANK, "skipped")
                continue
            yield number, text


def _first_occurrence(path: Path, number: int, raw_id: str, what: str, seen: dict[str, int], report: DataReport,
                      problem: str) -> str | None:
    """The stripped id of a line, or None for a repeat of an earlier line's id (reported, first kept)."""
    identifier = raw_id.strip()
    if not identifier:
        raise DataError(path, f"empty {what} id", number)
    if identifier in seen:
        report.add(path, number, problem, "kept the first occurrence",
                   f"'{identifier}' first seen at line {seen[identifier]}")
        return None
    seen[identifier] = number
    return identifier


def read_items(path: str | Path, fields: tuple[str, ...] | list[str] = ("title",),
               report: DataReport | None = None) -> ItemTable:
    """Read an items file. A line holding only the id is accepted as an item with empty text (real files
    have such lines); any other column count that differs from 1 + len(fields) is an error."""
    path = Path(path)
    report = report if report is not None else DataReport()
    fields = tuple(fields)
    expected = 1 + len(fields)
    ids: list[str] = []
    texts: dict[str, list[str]] = {name: [] for name in fields}
    lines: list[int] = []
    seen: dict[str, int] = {}
    for number, text in _lines(path, report):
        columns = text.split("\t")
        if len(columns) != expected and len(columns) != 1:
            raise DataError(path, f"expected {expected} tab-separated columns (item_id, {', '.join(fields)}), "
                                  f"found {len(columns)}", number)
        if len(columns[0].split()) > 1:  # histories are split on whitespace: such an id could never be used
            raise DataError(path, f"item id {columns[0].strip()!r} contains whitespace (are the columns "
                                  f"separated by tabs?)", number)
        item_id = _first_occurrence(path, number, columns[0], "item", seen, report, DUPLICATE_ITEM)
        if item_id is None:
            continue
        values = columns[1:] if len(columns) == expected else [""] * len(fields)
        if not values[0].strip():
            report.add(path, number, EMPTY_TITLE, "the item is kept with empty text", f"'{item_id}'")
        ids.append(item_id)
        lines.append(number)
        for name, value in zip(fields, values):
            texts[name].append(value)
    if not ids:
        raise DataError(path, "no items")
    return ItemTable(path, ids, texts, lines)


def read_users(path: str | Path, items: ItemTable, report: DataReport | None = None) -> UserTable:
    """Read a users file; every id in a history must be in `items`."""
    path = Path(path)
    report = report if report is not None else DataReport()
    ids: list[str] = []
    sequences: list[list[str]] = []
    seen: dict[str, int] = {}
    for number, text in _lines(path, report):
        columns = text.split("\t")
        if len(columns) != 2:
            raise DataError(path, f"expected 2 tab-separated columns (user_id, item ids), found {len(columns)}",
                            number)
        user_id = _first_occurrence(path, number, columns[0], "user", seen, report, DUPLICATE_USER)
        if user_id is None:
            continue
        sequence: list[str] = []
        for item_id in columns[1].split():
            if item_id in items.position:
                sequence.append(item_id)
            else:
                report.add(path, number, UNKNOWN_ITEM, "the interaction was removed from the history",
                           f"user '{user_id}' item '{item_id}'")
        if not sequence:
            report.add(path, number, EMPTY_HISTORY, "the user has no interactions", f"'{user_id}'")
        ids.append(user_id)
        sequences.append(sequence)
    if not ids:
        raise DataError(path, "no users")
    return UserTable(path, ids, sequences)
