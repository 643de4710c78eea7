"""`iisan data import --from FORMAT SRC... --out DIR`: a dataset in another layout written as an IISAN TSV
dataset folder (items.tsv, users.tsv, dataset.yaml, SOURCE.md, images/ where the source names image files).

Formats: `recbole` (atomic files, read here), `amazon2023` (iisan/data/amazon.py), `csv` and `parquet`
(iisan/data/tables.py). Every reader fills a DatasetBuilder (iisan/data/builder.py), which checks and counts
the problems; the folder is built under a temporary sibling name and renamed into place at the end, so an
error leaves nothing half-written. The written folder is then loaded as any `--dataset PATH` is, for the
protocol statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from iisan.data.amazon import read_amazon2023
from iisan.data.atomic import read_atomic
from iisan.data.builder import Counts, DatasetBuilder, Parsed
from iisan.data.dataset import DatasetStats, dataset_stats, load_dataset
from iisan.data.layout import StagedFolder, file_sha256, write_dataset_yaml, write_lines
from iisan.data.protocol import ProtocolConfig
from iisan.data.report import DataReport
from iisan.data.tables import read_tables
from iisan.errors import DataError, IisanError

# RecBole column types read as text fields; columns of other types (e.g. `float_seq` vectors) are left out and
# listed in SOURCE.md. An untyped header column ("") is read as text.
RECBOLE_TEXT_TYPES = ("token", "token_seq", "float", "")


@dataclass(frozen=True)
class ImportOptions:
    """Which columns / keys hold what. Not every format reads every option (see `iisan data import --help`)."""

    user_col: str = "user_id"                  # recbole .inter, csv/parquet interactions
    item_col: str = "item_id"                  # recbole .inter, csv/parquet interactions
    time_col: str = "timestamp"                # recbole .inter, csv/parquet interactions
    id_col: str = "item_id"                    # recbole .item, csv/parquet items
    text_cols: tuple[str, ...] | None = None   # csv/parquet items; None: title (+ description if present)
    image_col: str | None = None               # csv/parquet items; None: image_path if present; "": none
    fields: tuple[str, ...] = ("title",)       # amazon2023 metadata keys kept as text


@dataclass
class ImportResult:
    out: Path
    fmt: str
    name: str
    files: list[tuple[Path, str, str]]   # (path, role, sha256)
    fields: list[str]
    origins: dict[str, str]
    read: Counts
    written: Counts
    images: int
    report: DataReport
    stats: DatasetStats

    def summary(self) -> list[str]:
        """What `iisan data import` prints: the counts read and written, every problem, the protocol's view."""
        s = self.stats
        lines = [f"imported {self.fmt} into {self.out} (dataset '{self.name}')",
                 f"  read     {self.read.line()}",
                 f"  written  {self.written.line()}; fields {', '.join(self.fields)}"
                 + (f"; {self.images:,} images" if self.images else "")]
        messages = self.report.messages()
        lines.append("  problems " + ("none" if not messages else
                                     f"({len(messages)} kind{'s' * (len(messages) > 1)}, each counted):"))
        lines += [f"    {message}" for message in messages]
        lines += [f"protocol (docs/method.md §1.2: users with at least {ProtocolConfig().min_seq_len} interactions, "
                  f"the last {ProtocolConfig().keep_last} of each kept):",
                  f"  users {s.users:,}, items {s.items:,}, interactions {s.interactions:,}; zero-popularity items "
                  f"{s.zero_popularity_items:,}; repeat targets valid/test {s.repeat_valid:,} / {s.repeat_test:,}; "
                  f"items with an image {s.items_with_image:,}"]
        return lines


# --- recbole ------------------------------------------------------------------------------------------------
def _recbole_files(sources: list[Path]) -> tuple[Path, Path]:
    """(the .inter file, the .item file): from a folder holding one `<name>.inter` and its `<name>.item`, or
    from the two files named."""
    if len(sources) == 1 and sources[0].is_dir():
        folder = sources[0]
        inters = sorted(folder.glob("*.inter"))
        if len(inters) != 1:
            raise DataError(folder, f"expected one RecBole .inter file in the folder, found "
                                    f"{', '.join(p.name for p in inters) or 'none'}")
        return inters[0], inters[0].with_suffix(".item")
    by_suffix = {path.suffix: path for path in sources}
    if len(sources) != 2 or set(by_suffix) != {".inter", ".item"}:
        raise IisanError("--from recbole takes a folder holding <name>.inter and <name>.item, or those two files; "
                         f"got {', '.join(str(p) for p in sources)}")
    return by_suffix[".inter"], by_suffix[".item"]


def read_recbole(sources: list[Path], options: ImportOptions, report: DataReport) -> Parsed:
    """Every text-like column of the .item file other than the id is a field; the title is the column named
    `title`, else the first named like `*title*`, else the first text-like one."""
    inter_path, item_path = _recbole_files(sources)
    items = read_atomic(item_path, report)
    id_index = items.column(options.id_col, "the item id, --id-col")
    text = [i for i, kind in enumerate(items.types) if i != id_index and kind in RECBOLE_TEXT_TYPES]
    if not text:
        raise DataError(item_path, f"no text column (token, token_seq or float) besides the id; the columns are "
                                   f"{', '.join(items.names)}", 1)
    lowered = [items.names[i].lower() for i in text]
    title = text[lowered.index("title")] if "title" in lowered else next(
        (i for i in text if "title" in items.names[i].lower()), text[0])
    order = [title] + [i for i in text if i != title]
    builder = DatasetBuilder(["title"] + [items.names[i] for i in order[1:]], report)
    for number, row in items.rows:
        builder.add_item(items.source, number, row[id_index], [row[i] for i in order])
    inter = read_atomic(inter_path, report)
    user, item, time = (inter.column(options.user_col, "the user id, --user-col"),
                        inter.column(options.item_col, "the item id, --item-col"),
                        inter.column(options.time_col, "the timestamp, --time-col"))
    for number, row in inter.rows:
        builder.add_event(inter.source, number, row[user], row[item], row[time])
    ignored = [f"{n}:{t}" for i, (n, t) in enumerate(zip(items.names, items.types)) if i != id_index and i not in text]
    origins = {"title": items.names[title], **{items.names[i]: items.names[i] for i in order[1:]}}
    notes = (f"columns of {item_path.name} not read as text: {', '.join(ignored)}",) if ignored else ()
    return Parsed(builder, [(inter_path, "interactions"), (item_path, "items")], item_path, origins, notes=notes)


FORMATS: dict[str, Callable[[list[Path], ImportOptions, DataReport], Parsed]] = {
    "recbole": read_recbole, "amazon2023": read_amazon2023,
    "csv": lambda sources, options, report: read_tables("csv", sources, options, report),
    "parquet": lambda sources, options, report: read_tables("parquet", sources, options, report),
}


# --- the import ---------------------------------------------------------------------------------------------
def import_dataset(fmt: str, sources: list[Path], out: Path, name: str | None = None, strict: bool = False,
                   options: ImportOptions = ImportOptions(), force: bool = False) -> ImportResult:
    """Read `sources` in format `fmt` and write the dataset folder `out` (replacing a non-empty one only with
    `force`). With `strict` the first counted problem is a DataError and nothing is written."""
    if fmt not in FORMATS:
        raise IisanError(f"unknown import format '{fmt}' (known: {', '.join(FORMATS)})")
    staged = StagedFolder(out, force)
    report = DataReport(strict=strict)
    parsed = FORMATS[fmt]([Path(p) for p in sources], options, report)
    builder = parsed.builder
    folder = staged.create()
    try:
        written, images = builder.write(folder, parsed.items_file)
        files = [(path, role, file_sha256(path)) for path, role in parsed.files]
        meta = {"name": name, "items": "items.tsv", "users": "users.tsv", "fields": builder.fields,
                "images": ["images"] if images else [], "image_url_field": parsed.image_url_field}
        write_dataset_yaml(folder, meta, f"written by `iisan data import --from {fmt}` from "
                                         + ", ".join(path.name for path, _, _ in files))
        write_lines(folder / "SOURCE.md", _source_md(fmt, name or out.name, parsed, files, builder.read, written,
                                                     images, report))
        staged.commit()
    finally:
        staged.discard()
    dataset = load_dataset(str(out))
    return ImportResult(out, fmt, dataset.name, files, builder.fields, parsed.origins, builder.read, written, images,
                        report, dataset_stats(dataset))


def _source_md(fmt: str, name: str, parsed: Parsed, files: list[tuple[Path, str, str]], read: Counts,
               written: Counts, images: int, report: DataReport) -> list[str]:
    fields = ", ".join(f"{field} (from {parsed.origins[field]})" if parsed.origins.get(field, field) != field
                       else field for field in parsed.builder.fields)
    lines = [f"# {name} in the IISAN TSV format", "",
             f"Imported by `iisan data import --from {fmt}` from:", ""]
    lines += [f"- `{path}` ({role}), sha256 {digest}" for path, role, digest in files]
    lines += ["", f"Read: {read.line()} (users: distinct ids among the interaction rows).",
              f"Written: {written.line()}" + (f", {images:,} images in images/" if images else "") + ".",
              f"items.tsv: item_id, {fields}. users.tsv: user_id, item ids by timestamp (ties in file order).", ""]
    lines += list(parsed.notes) + ([""] if parsed.notes else [])
    messages = report.messages()
    lines += ["Problems (counted; first lines given):", ""] + [f"- {m}" for m in messages] if messages else \
        ["Problems: none."]
    return lines
