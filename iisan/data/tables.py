"""`iisan data import --from csv|parquet`: an interactions table, then an items table.

Columns are named by options (`--user-col`, `--item-col`, `--time-col` in the interactions table; `--id-col`,
`--text-cols`, `--image-col` in the items table). Without `--text-cols` the text is `title`, plus
`description` where the table has one; without `--image-col` the images come from a column `image_path` where
there is one. Image paths are relative to the items table's folder and must stay inside it.

CSV goes through the stdlib csv module (a header row; `.tsv` files are tab-separated); the line numbers in
messages are file lines, where a record starts. Parquet goes through pyarrow (the `parquet` extra); its row
numbers (1 = the first row) stand in for lines.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from iisan.data.builder import DatasetBuilder, Parsed, as_text
from iisan.data.readers import BLANK
from iisan.data.report import DataReport
from iisan.errors import DataError, IisanError

Rows = Callable[[list[str]], Iterator[tuple[int, list[Any]]]]


@dataclass
class Table:
    """A table's columns, and its rows read lazily: `rows(names)` yields (line or row number, values of the
    named columns). `header_line` is where a missing column is reported (None where there is no line)."""

    path: Path
    columns: list[str]
    read: Rows
    header_line: int | None

    def require(self, name: str, role: str) -> None:
        if name not in self.columns:
            raise DataError(self.path, f"no column '{name}' ({role}); the columns are {', '.join(self.columns)}",
                            self.header_line)

    def rows(self, names: list[str]) -> Iterator[tuple[int, list[Any]]]:
        unique = list(dict.fromkeys(names))
        for line, values in self.read(unique):
            by_name = dict(zip(unique, values))
            yield line, [by_name[name] for name in names]


def csv_table(path: Path, report: DataReport) -> Table:
    """A CSV (or, for a `.tsv` name, tab-separated) file with a header row, UTF-8 (a BOM is allowed)."""
    if not path.is_file():
        raise DataError(path, "file not found")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long descriptions exceed the 128 KiB default

    def records() -> Iterator[tuple[int, list[str]]]:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            start = 1
            try:
                for row in reader:
                    yield start, row
                    start = reader.line_num + 1
            except csv.Error as e:
                raise DataError(path, f"not valid CSV ({e})", start) from None
            except UnicodeDecodeError as e:
                raise DataError(path, f"not UTF-8 (byte 0x{e.object[e.start]:02x})", reader.line_num + 1) from None

    first = records()
    header = next(first, None)
    first.close()
    if header is None or not any(cell.strip() for cell in header[1]):
        raise DataError(path, "no header row", 1)
    columns = [cell.strip() for cell in header[1]]

    def read(names: list[str]) -> Iterator[tuple[int, list[Any]]]:
        index = [columns.index(name) for name in names]
        it = records()
        next(it)
        for line, row in it:
            if not row or not any(cell.strip() for cell in row):
                report.add(path, line, BLANK, "skipped")
                continue
            if len(row) != len(columns):
                raise DataError(path, f"expected {len(columns)} fields (as the header), found {len(row)}", line)
            yield line, [row[i] for i in index]

    return Table(path, columns, read, 1)


def parquet_table(path: Path, report: DataReport) -> Table:
    """A Parquet file, read in record batches; rows are numbered from 1."""
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise IisanError("reading Parquet needs pyarrow: pip install 'iisan-versa[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(path, f"not a Parquet file ({e})") from None

    def read(names: list[str]) -> Iterator[tuple[int, list[Any]]]:
        number = 0
        for batch in parquet.iter_batches(columns=names, batch_size=65_536):
            for values in zip(*(batch.column(name).to_pylist() for name in names)):
                number += 1
                yield number, list(values)

    return Table(path, list(parquet.schema_arrow.names), read, None)


def _image_path(table: Table, line: int, value: Any) -> Path | None:
    """The image file a cell names, resolved against the items table's folder; leaving the folder is an error."""
    text = as_text(value).strip()
    if not text:
        return None
    root = table.path.parent.resolve()
    path = (root / text).resolve()
    if not path.is_relative_to(root):
        raise DataError(table.path, f"image path {text!r} leads outside the items table's folder {root}", line)
    return path


def read_tables(kind: str, sources: list[Path], options: Any, report: DataReport) -> Parsed:
    """Fill a DatasetBuilder from an interactions table and an items table of `kind` csv or parquet."""
    if len(sources) != 2:
        raise IisanError(f"--from {kind} takes two files, the interactions table then the items table; "
                         f"got {len(sources)}")
    open_table = csv_table if kind == "csv" else parquet_table
    interactions, items = (open_table(path, report) for path in sources)
    text_cols = list(options.text_cols or ["title"] + (["description"] if "description" in items.columns else []))
    image_col = options.image_col if options.image_col is not None else (
        "image_path" if "image_path" in items.columns else "")
    items.require(options.id_col, "the item id, --id-col")
    for name in text_cols:
        items.require(name, "a text column, --text-cols")
    if image_col:
        items.require(image_col, "the image path, --image-col")
    for name, role in ((options.user_col, "the user id, --user-col"), (options.item_col, "the item id, --item-col"),
                       (options.time_col, "the timestamp, --time-col")):
        interactions.require(name, role)
    builder = DatasetBuilder(["title", *text_cols[1:]], report)
    for line, values in items.rows([options.id_col, *text_cols, *([image_col] if image_col else [])]):
        image = _image_path(items, line, values.pop()) if image_col else None
        builder.add_item(items.path, line, values[0], values[1:], image)
    for line, (user, item, time) in interactions.rows([options.user_col, options.item_col, options.time_col]):
        builder.add_event(interactions.path, line, user, item, time)
    origins = {"title": text_cols[0], **{name: name for name in text_cols[1:]}}
    notes = (f"images: column {image_col}, copied into images/<item_id><suffix>",) if image_col else ()
    return Parsed(builder, [(interactions.path, "interactions"), (items.path, "items")], items.path, origins,
                  notes=notes)
