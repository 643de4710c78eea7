"""RecBole atomic files (`.inter`, `.item`, ...): a header row of `name:type` columns, then tab-separated rows.

One reader serves both `iisan data fetch ml-100k` (the files inside the recbole wheel) and
`iisan data import --from recbole` (the files of any RecBole dataset folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iisan.data.readers import BLANK
from iisan.data.report import DataReport
from iisan.errors import DataError


@dataclass
class AtomicTable:
    """One atomic file: column names and types (the part after ':'; empty when the header gives none), and
    the rows with their line numbers (the header is line 1)."""

    source: str
    names: list[str]
    types: list[str]
    rows: list[tuple[int, list[str]]]

    def column(self, name: str, role: str) -> int:
        """The index of column `name`; a DataError naming it and the columns there are if it is absent."""
        if name not in self.names:
            raise DataError(self.source, f"no column '{name}' ({role}); the columns are "
                                         f"{', '.join(self.names)}", 1)
        return self.names.index(name)


def parse_atomic(text: str, source: str, report: DataReport | None = None) -> AtomicTable:
    """Parse the text of an atomic file. A row whose column count differs from the header's is an error;
    blank lines are skipped (and counted in `report` when one is given)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise DataError(source, "no header row (expected `name:type` columns separated by tabs)", 1)
    header = [column.strip() for column in lines[0].lstrip("\ufeff").rstrip("\r").split("\t")]
    names = [column.split(":")[0] for column in header]
    types = [column.partition(":")[2] for column in header]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            if report is not None:
                report.add(source, number, BLANK, "skipped")
            continue
        columns = line.split("\t")
        if len(columns) != len(header):
            raise DataError(source, f"expected {len(header)} columns, found {len(columns)}", number)
        rows.append((number, columns))
    return AtomicTable(source, names, types, rows)


def read_atomic(path: Path, report: DataReport | None = None) -> AtomicTable:
    """Read an atomic file from disk (UTF-8; bytes that are not are an error naming the line)."""
    if not path.is_file():
        raise DataError(path, "file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 (byte 0x{data[e.start]:02x})", data.count(b"\n", 0, e.start) + 1) from None
    return parse_atomic(text, str(path), report)
