"""`iisan data import --from amazon2023`: the reviews and metadata JSONL files of Amazon Reviews 2023.

Reviews records give `user_id`, `parent_asin` (the item) and `timestamp` (milliseconds); metadata records give
`parent_asin`, `title`, optional text keys (`--fields`: lists are joined with "; ") and `images`, whose first
entry's `large` URL (else `hi_res`, else `thumb`) becomes the field `image_url` for `iisan data images`.
Either file may be `.jsonl` or gzip-compressed (recognised by its bytes, whatever its name).
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

from iisan.data.builder import DatasetBuilder, Parsed, as_text
from iisan.data.readers import BLANK
from iisan.data.report import DataReport
from iisan.errors import DataError, IisanError

REVIEW_KEYS = ("user_id", "parent_asin", "timestamp")
METADATA_KEYS = ("parent_asin", "title")
IMAGE_URL_FIELD = "image_url"
IMAGE_KEYS = ("large", "hi_res", "thumb")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def json_records(path: Path, report: DataReport | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSONL file, plain or gzip. A line that is not a JSON object, a file that is
    not there and an unreadable gzip stream are errors naming the file and line; blank lines are counted."""
    if not path.is_file():
        raise DataError(path, "file not found")
    compressed = _is_gzip(path)
    number = 0
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    if report is not None:
                        report.add(path, number, BLANK, "skipped")
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(path, f"not valid JSON ({e.msg} at column {e.colno})", number) from None
                except UnicodeDecodeError as e:
                    raise DataError(path, f"not valid JSON (not UTF-8: byte 0x{raw[e.start]:02x} at column "
                                          f"{e.start + 1})", number) from None
                if not isinstance(record, dict):
                    raise DataError(path, f"expected a JSON object, found {type(record).__name__}", number)
                yield number, record
    except (OSError, EOFError, zlib.error) as e:
        if compressed:
            raise DataError(path, f"unreadable gzip stream ({e})", number + 1) from None
        raise DataError(path, f"cannot read ({e})") from None


def _kind(path: Path) -> str | None:
    """'reviews' or 'metadata' from the first record's keys; None when it tells neither."""
    for _, record in json_records(path):
        if "user_id" in record:
            return "reviews"
        if "parent_asin" in record and "title" in record:
            return "metadata"
        return None
    return None


def _roles(sources: list[Path]) -> tuple[Path, Path]:
    """(reviews file, metadata file): by content where it tells, else reviews first, metadata second."""
    if len(sources) != 2:
        raise IisanError(f"--from amazon2023 takes two files, the reviews JSONL and the metadata JSONL "
                         f"(.jsonl or .jsonl.gz); got {len(sources)}")
    kinds = [_kind(path) for path in sources]
    if kinds[0] is not None and kinds[0] == kinds[1]:
        raise DataError(sources[1], f"both files look like {kinds[0]} (reviews records have user_id; metadata "
                                    f"records have parent_asin and title but no user_id)")
    if kinds[0] == "metadata" or kinds[1] == "reviews":
        return sources[1], sources[0]
    return sources[0], sources[1]


def _required(path: Path, number: int, record: dict[str, Any], keys: tuple[str, ...], role: str) -> None:
    for key in keys:
        if key not in record:
            raise DataError(path, f"no key '{key}' in this {role} record (its keys: {', '.join(record) or 'none'})",
                            number)


def text_of(value: Any) -> str:
    """A metadata value as one text: lists joined with "; ", mappings as `key: value` pairs, None empty."""
    if isinstance(value, list):
        return "; ".join(text for text in (text_of(v) for v in value) if text)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {text_of(v)}" for k, v in value.items() if text_of(v))
    return as_text(value)


def first_image_url(images: Any) -> str:
    """The first image's `large` URL, else its `hi_res`, else its `thumb`; empty when there is none."""
    if isinstance(images, list) and images and isinstance(images[0], dict):
        for key in IMAGE_KEYS:
            url = images[0].get(key)
            if isinstance(url, str) and url.strip():
                return url.strip()
    return ""


def read_amazon2023(sources: list[Path], options: Any, report: DataReport) -> Parsed:
    """Fill a DatasetBuilder from the two files (`options.fields`: the metadata keys kept as text)."""
    reviews, metadata = _roles(sources)
    extra = [f for f in options.fields if f not in ("title", IMAGE_URL_FIELD)]
    builder = DatasetBuilder(["title", *extra, IMAGE_URL_FIELD], report)
    seen: set[str] = set()
    first_keys: list[str] = []
    for number, record in json_records(metadata, report):
        _required(metadata, number, record, METADATA_KEYS, "metadata")
        first_keys = first_keys or list(record)
        seen.update(key for key in extra if key in record)
        values = [text_of(record["title"]), *(text_of(record.get(key)) for key in extra),
                  first_image_url(record.get("images"))]
        builder.add_item(metadata, number, record["parent_asin"], values)
    for key in extra:
        if key not in seen:
            raise DataError(metadata, f"no record has the key '{key}' named by --fields (the first record's keys: "
                                      f"{', '.join(first_keys)})")
    for number, record in json_records(reviews, report):
        _required(reviews, number, record, REVIEW_KEYS, "review")
        builder.add_event(reviews, number, record["user_id"], record["parent_asin"], record["timestamp"])
    origins = {"title": "title", **{key: key for key in extra},
               IMAGE_URL_FIELD: "images[0]: large, else hi_res, else thumb"}
    return Parsed(builder, [(reviews, "reviews (interactions)"), (metadata, "metadata (items)")], metadata, origins,
                  image_url_field=IMAGE_URL_FIELD)
