"""`iisan data import` (recbole, amazon2023, csv, parquet) and `iisan data images --download`: exact counts,
every bad-input case named by file and line, nothing half-written after an error."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import threading
import zipfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from iisan.cli import main
from iisan.data.builder import BAD_TIMESTAMP, DUPLICATE_EVENT, UNKNOWN_EVENT_ITEM
from iisan.data.dataset import dataset_stats, load_dataset
from iisan.data.fetch import ML100K_MEMBER
from iisan.data.images import MISSING_IMAGE_FILE
from iisan.data.importers import ImportOptions, import_dataset
from iisan.data.readers import DUPLICATE_ITEM, read_items, read_users
from iisan.errors import DataError, IisanError


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def leftovers(out: Path) -> list[str]:
    """Anything an import left next to `out` (its temporary folder) or `out` itself."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def assert_import(output: str, read: str, wrote: str, *problems: tuple[Path, str, int, str]) -> None:
    """The summary's read / written lines, and each (file, problem, count, first lines) as the report words it."""
    assert f"read     {read}" in output and f"written  {wrote}" in output, output
    for path, problem, count, lines in problems:
        assert f"{path}: {problem}, {count} time(s) (first at line {lines})" in output, output


def written(out: Path) -> tuple[list[str], list[str]]:
    return ((out / "items.tsv").read_text(encoding="utf-8").splitlines(),
            (out / "users.tsv").read_text(encoding="utf-8").splitlines())


# --- recbole: the real ml-100k atomic files ------------------------------------------------------------------
@pytest.fixture(scope="module")
def recbole_src(tmp_path_factory, recbole_wheel) -> Path:
    folder = tmp_path_factory.mktemp("recbole") / "ml-100k"
    folder.mkdir()
    with zipfile.ZipFile(recbole_wheel) as z:
        for suffix in (".inter", ".item"):
            (folder / f"ml-100k{suffix}").write_bytes(z.read(ML100K_MEMBER + suffix))
    return folder


def test_recbole_round_trip_equals_the_fetcher(tmp_path, recbole_src, ml100k_dir):
    out = tmp_path / "ml-imported"
    result = run("data", "import", "--from", "recbole", recbole_src, "--out", out)
    assert result.exit_code == 0, result.output
    assert "read     943 users, 1,682 items, 100,000 interactions" in result.output
    assert "written  943 users, 1,682 items, 100,000 interactions; fields title, release_year, class" in result.output
    assert "problems none" in result.output
    assert "users 943, items 1,304, interactions 12,259" in result.output
    stats = dataset_stats(load_dataset(str(out)))
    assert (stats.users, stats.items, stats.interactions) == (943, 1304, 12259)
    items, users = written(out)
    fetched_items, fetched_users = written(ml100k_dir)
    assert users == fetched_users
    assert [line.split("\t")[0] for line in items] == [line.split("\t")[0] for line in fetched_items]
    assert items[0] == "1\tToy Story\t1995\tAnimation Children's Comedy"
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    assert meta == {"items": "items.tsv", "users": "users.tsv", "fields": ["title", "release_year", "class"]}
    source = (out / "SOURCE.md").read_text()
    assert "ml-100k.inter" in source and "sha256 " in source and "title (from movie_title)" in source
    assert leftovers(out) == [out.name]


def test_recbole_missing_column_is_named(tmp_path, recbole_src):
    result = run("data", "import", "--from", "recbole", recbole_src, "--out", tmp_path / "o", "--time-col", "when")
    assert result.exit_code == 2
    assert (f"error: {recbole_src / 'ml-100k.inter'}:1: no column 'when' (the timestamp, --time-col); the columns "
            f"are user_id, item_id, rating, timestamp") in result.output
    assert leftovers(tmp_path / "o") == []


# --- amazon2023 ----------------------------------------------------------------------------------------------
def write_jsonl(path: Path, records: list, compress: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(text) if compress else text)
    return path


DEFAULT_IMAGES = {"A1": [{"thumb": "http://t/1.jpg", "large": "http://l/1.jpg"}],
                  "A2": [{"hi_res": "http://hi/2.jpg", "thumb": "http://t/2.jpg"}], "A4": [{"thumb": "http://t/4.jpg"}]}


def metadata_records(images: dict[str, list] | None = None) -> list:
    images = DEFAULT_IMAGES if images is None else images
    records: list = [{"parent_asin": f"A{k}", "title": f"Thing {k}\twith\n tabs", "store": f"store {k}",
                      "features": [f"f{k}a", f"f{k}b"], "images": images.get(f"A{k}", [])} for k in range(1, 7)]
    records.append({"parent_asin": "A1", "title": "a second A1"})  # line 7: duplicate item
    return records


REVIEWS = [  # (user, item, timestamp); line numbers are the positions + 1
    ("u1", "A1", 1000), ("u1", "A2", 500), ("u1", "A3", 1000), ("u1", "A4", 2000), ("u1", "A5", 3000),
    ("u1", "A6", 4000),
    ("u1", "A1", 1000),                                   # line 7: duplicate event
    ("u2", "A6", 1), ("u2", "A5", 2), ("u2", "A4", 3), ("u2", "A3", 4), ("u2", "A2", 5),
    ("u2", "ZZ", 6),                                      # line 13: unknown item
    ("u2", "A1", "soon"),                                 # line 14: non-numeric timestamp
    ("u3", "A1", ""),                                     # line 15: empty timestamp
]


def review_records(rows=REVIEWS) -> list:
    return [{"rating": 5.0, "user_id": u, "parent_asin": i, "asin": i, "timestamp": t} for u, i, t in rows]


def test_amazon2023_gz_and_plain_with_every_counted_problem(tmp_path):
    meta = write_jsonl(tmp_path / "meta.jsonl", metadata_records())
    reviews = write_jsonl(tmp_path / "reviews.jsonl.gz", review_records(), compress=True)
    out = tmp_path / "amazon"
    # Metadata first: the files are told apart by their records, not their order.
    result = run("data", "import", "--from", "amazon2023", meta, reviews, "--out", out, "--name", "shop",
                 "--fields", "title,store,features")
    assert result.exit_code == 0, result.output
    assert "imported amazon2023 into" in result.output and "(dataset 'shop')" in result.output
    assert_import(result.output, "3 users, 7 items, 15 interactions",
                  "2 users, 6 items, 11 interactions; fields title, store, features, image_url",
                  (meta, DUPLICATE_ITEM, 1, "7"), (reviews, DUPLICATE_EVENT, 1, "7"),
                  (reviews, UNKNOWN_EVENT_ITEM, 1, "13"), (reviews, BAD_TIMESTAMP, 2, "14, 15"))
    assert "users 2, items 6, interactions 11" in result.output
    items, users = written(out)
    assert users == ["u1\tA2 A1 A3 A4 A5 A6", "u2\tA6 A5 A4 A3 A2"]  # the tie at t=1000 keeps file order
    assert items[0] == "A1\tThing 1 with tabs\tstore 1\tf1a; f1b\thttp://l/1.jpg"  # large before thumb
    assert items[1] == "A2\tThing 2 with tabs\tstore 2\tf2a; f2b\thttp://hi/2.jpg"  # else hi_res
    assert items[2].endswith("f3b\t") and items[3].endswith("\thttp://t/4.jpg") and len(items) == 6
    meta_yaml = yaml.safe_load((out / "dataset.yaml").read_text())
    assert meta_yaml == {"name": "shop", "items": "items.tsv", "users": "users.tsv",
                         "fields": ["title", "store", "features", "image_url"], "image_url_field": "image_url"}
    dataset = load_dataset(str(out))
    assert dataset.name == "shop" and list(dataset.items.fields) == ["title", "store", "features", "image_url"]
    assert not dataset.report.messages()


def test_amazon2023_reader_results_through_the_tsv_readers(tmp_path):
    meta = write_jsonl(tmp_path / "meta.jsonl.gz", metadata_records(), compress=True)
    reviews = write_jsonl(tmp_path / "reviews.jsonl", review_records())
    result = import_dataset("amazon2023", [reviews, meta], tmp_path / "a")
    assert (result.read.users, result.read.items, result.read.interactions) == (3, 7, 15)
    assert (result.written.users, result.written.items, result.written.interactions) == (2, 6, 11)
    assert {p.problem: p.count for p in result.report.problems.values()} == {
        DUPLICATE_ITEM: 1, DUPLICATE_EVENT: 1, UNKNOWN_EVENT_ITEM: 1, BAD_TIMESTAMP: 2}
    items = read_items(tmp_path / "a" / "items.tsv", result.fields)
    users = read_users(tmp_path / "a" / "users.tsv", items)
    assert users.sequences == [["A2", "A1", "A3", "A4", "A5", "A6"], ["A6", "A5", "A4", "A3", "A2"]]
    assert items.fields["image_url"][:3] == ["http://l/1.jpg", "http://hi/2.jpg", ""]
    assert items.fields["title"][5] == "Thing 6 with tabs"


@pytest.mark.parametrize("case, message", [
    ("bad_json", "meta.jsonl:3: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("missing_key", "reviews.jsonl:2: no key 'timestamp' in this review record (its keys: user_id, parent_asin)"),
    ("bad_gzip", "reviews.jsonl.gz:1: unreadable gzip stream"),
    ("not_found", "nowhere.jsonl: file not found"),
    ("unknown_field", "meta.jsonl: no record has the key 'colour' named by --fields"),
    ("strict", "reviews.jsonl:7: a duplicate interaction (same user, item and timestamp) (user 'u1' item 'A1' as "
               "at line 1) [refused by --strict]"),
])
def test_amazon2023_errors_name_file_and_line_and_write_nothing(tmp_path, case, message):
    meta_records, reviews_records = metadata_records(), review_records()
    extra: list[str] = []
    reviews_name = "reviews.jsonl"
    if case == "bad_json":
        meta_records[2] = "{not json"
    elif case == "missing_key":
        reviews_records[1] = {"user_id": "u1", "parent_asin": "A2"}
    elif case == "unknown_field":
        extra = ["--fields", "title,colour"]
    elif case == "strict":  # only the duplicate event left to refuse
        meta_records.pop()
        reviews_records = reviews_records[:12]
        extra = ["--strict"]
    meta = write_jsonl(tmp_path / "meta.jsonl", meta_records)
    reviews = write_jsonl(tmp_path / reviews_name, reviews_records)
    if case == "bad_gzip":
        reviews = tmp_path / "reviews.jsonl.gz"
        reviews.write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate")
    if case == "not_found":
        reviews = tmp_path / "nowhere.jsonl"
    out = tmp_path / "data" / "shop"
    result = run("data", "import", "--from", "amazon2023", reviews, meta, "--out", out, *extra)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {tmp_path}/{message}"), result.output
    assert not out.exists()
    assert not (tmp_path / "data").exists() or leftovers(out) == []


def test_existing_out_is_refused_unless_force(tmp_path):
    meta = write_jsonl(tmp_path / "meta.jsonl", metadata_records())
    reviews = write_jsonl(tmp_path / "reviews.jsonl", review_records())
    out = tmp_path / "shop"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    result = run("data", "import", "--from", "amazon2023", reviews, meta, "--out", out)
    assert result.exit_code == 2 and "folder exists and is not empty (use --force to replace it)" in result.output
    assert (out / "old.txt").is_file()
    result = run("data", "import", "--from", "amazon2023", reviews, meta, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "users.tsv").is_file()
    assert leftovers(out) == ["shop"]


def test_unknown_format_and_wrong_file_count(tmp_path):
    with pytest.raises(IisanError, match="unknown import format 'xml'"):
        import_dataset("xml", [tmp_path], tmp_path / "o")
    result = run("data", "import", "--from", "amazon2023", tmp_path / "x.jsonl", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "takes two files" in result.output


# --- csv and parquet -----------------------------------------------------------------------------------------
def png(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


ITEM_ROWS = [  # item_id, title, description, image_path
    ("i1", "One", "first\nline two", "img/one.png"),  # a quoted field over two lines: file lines 2-3
    ("i2", "Two", "", "img/two.PNG"),
    ("i3", "Three", "third", ""),
    ("i4", "Four", "fourth", "img/absent.png"),
    ("i5", "Five", "", ""),
    ("i1", "One again", "", ""),                     # file line 8 (CSV), row 6 (Parquet): duplicate item
]
EVENT_ROWS = [("u9", i, t) for i, t in (("i1", "10"), ("i2", "5"), ("i3", "10"), ("i4", "20"), ("i5", "30"))] + [
    ("u9", "i1", "10"),        # duplicate event: line 7 / row 6
    ("u10", "i9", "1"),        # unknown item: line 8 / row 7
    ("u10", "i2", "x"),        # non-numeric timestamp: line 9 / row 8
] + [("u10", i, str(t)) for t, i in enumerate(("i5", "i4", "i3", "i2", "i1"), start=2)]


def write_tables(folder: Path, kind: str, items=ITEM_ROWS, events=EVENT_ROWS) -> tuple[Path, Path]:
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    png(folder / "img" / "one.png", (255, 0, 0))
    png(folder / "img" / "two.PNG", (0, 255, 0))
    tables = {"interactions": (["user_id", "item_id", "timestamp"], events),
              "items": (["item_id", "title", "description", "image_path"], items)}
    paths = []
    for name, (header, rows) in tables.items():
        if kind == "csv":
            path = folder / f"{name}.csv"
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            path = folder / f"{name}.parquet"
            columns = list(zip(*rows))
            pq.write_table(pa.table({h: list(c) for h, c in zip(header, columns)}), path)
        paths.append(path)
    return paths[0], paths[1]


# (line in CSV, row in Parquet) of each counted problem
LINES = {"csv": {"dup_item": 8, "dup_event": 7, "unknown": 8, "time": 9, "absent": 6},
         "parquet": {"dup_item": 6, "dup_event": 6, "unknown": 7, "time": 8, "absent": 4}}


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_tables_with_images_and_every_counted_problem(tmp_path, kind):
    inter, items = write_tables(tmp_path / "src", kind)
    out = tmp_path / "tables"
    result = run("data", "import", "--from", kind, inter, items, "--out", out)
    assert result.exit_code == 0, result.output
    at = LINES[kind]
    assert_import(result.output, "2 users, 6 items, 13 interactions",
                  "2 users, 5 items, 10 interactions; fields title, description; 2 images",
                  (items, DUPLICATE_ITEM, 1, at["dup_item"]), (inter, DUPLICATE_EVENT, 1, at["dup_event"]),
                  (inter, UNKNOWN_EVENT_ITEM, 1, at["unknown"]), (inter, BAD_TIMESTAMP, 1, at["time"]),
                  (items, MISSING_IMAGE_FILE, 1, at["absent"]))
    assert "items with an image 2" in result.output
    item_lines, users = written(out)
    assert users == ["u10\ti5 i4 i3 i2 i1", "u9\ti2 i1 i3 i4 i5"]  # ids not all numbers: string order
    assert item_lines[0] == "i1\tOne\tfirst line two"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["i1.png", "i2.png"]
    assert Image.open(out / "images" / "i2.png").getpixel((0, 0)) == (0, 255, 0)
    assert yaml.safe_load((out / "dataset.yaml").read_text())["images"] == ["images"]
    stats = dataset_stats(load_dataset(str(out)))
    assert (stats.users, stats.items, stats.interactions, stats.items_with_image) == (2, 5, 10, 2)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_tables_image_path_escaping_the_folder_is_an_error(tmp_path, kind):
    rows = list(ITEM_ROWS[:5])
    rows[2] = ("i3", "Three", "third", "../secret.png")
    png(tmp_path / "secret.png", (0, 0, 255))
    inter, items = write_tables(tmp_path / "src", kind, items=rows)
    out = tmp_path / "tables"
    result = run("data", "import", "--from", kind, inter, items, "--out", out)
    assert result.exit_code == 2
    line = 5 if kind == "csv" else 3
    assert result.output.startswith(f"error: {items}:{line}: image path '../secret.png' leads outside the items "
                                    f"table's folder {tmp_path / 'src'}")
    assert leftovers(out) == []


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_tables_missing_column_and_strict(tmp_path, kind):
    inter, items = write_tables(tmp_path / "src", kind)
    result = run("data", "import", "--from", kind, inter, items, "--out", tmp_path / "o", "--user-col", "member")
    assert result.exit_code == 2
    where = f"{inter}:1" if kind == "csv" else f"{inter}"
    assert (f"error: {where}: no column 'member' (the user id, --user-col); the columns are user_id, item_id, "
            f"timestamp") in result.output
    result = run("data", "import", "--from", kind, inter, items, "--out", tmp_path / "o", "--strict")
    assert result.exit_code == 2 and "[refused by --strict]" in result.output
    assert "an image path to a file that does not exist" in result.output  # the first problem met: item i4
    assert leftovers(tmp_path / "o") == []


def test_tables_text_columns_option_and_whitespace_in_an_id(tmp_path):
    inter, items = write_tables(tmp_path / "src", "csv")
    result = import_dataset("csv", [inter, items], tmp_path / "o",
                            options=ImportOptions(text_cols=("description",), image_col=""))
    assert result.fields == ["title"] and result.origins["title"] == "description" and result.images == 0
    assert written(tmp_path / "o")[0][:2] == ["i1\tfirst line two", "i2\t"]
    with pytest.raises(IisanError, match="two text fields would be called title"):
        import_dataset("csv", [inter, items], tmp_path / "o2", options=ImportOptions(text_cols=("description", "title")))
    rows = list(ITEM_ROWS)
    rows[1] = ("i 2", "Two", "", "")
    inter, items = write_tables(tmp_path / "bad", "csv", items=rows)
    with pytest.raises(DataError) as e:
        import_dataset("csv", [inter, items], tmp_path / "o3")
    assert str(e.value) == f"{items}:4: item id 'i 2' contains whitespace (histories are split on whitespace)"
    assert leftovers(tmp_path / "o3") == []


# --- data images --download ----------------------------------------------------------------------------------
@pytest.fixture
def image_server(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    served = tmp_path / "served"
    png(served / "a.png", (255, 0, 0))
    Image.new("RGB", (4, 4), (0, 0, 255)).save(served / "b.jpg")
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_images_download_resumes_and_reports_failures(tmp_path, image_server):
    images = {"A1": [{"large": f"{image_server}/a.png"}], "A2": [{"thumb": f"{image_server}/b.jpg"}],
              "A3": [{"large": f"{image_server}/missing.jpg"}]}
    meta = write_jsonl(tmp_path / "meta.jsonl", metadata_records(images))
    reviews = write_jsonl(tmp_path / "reviews.jsonl", review_records())
    out = tmp_path / "shop"
    assert run("data", "import", "--from", "amazon2023", reviews, meta, "--out", out).exit_code == 0
    before = run("data", "images", out)
    assert before.exit_code == 0, before.output
    assert "6 items, 3 with an image URL, 0 with an image file in images/; 3 to download" in before.output
    first = run("data", "images", out, "--download", "--workers", "4", "--timeout", "5")
    assert first.exit_code == 0, first.output
    assert "downloaded 2, already there 0, failed 1" in first.output
    assert "  A3: HTTP 404 File not found" in first.output
    assert "added `images: [images]` to dataset.yaml" in first.output
    assert sorted(p.name for p in (out / "images").iterdir()) == ["A1.png", "A2.jpg"]
    assert yaml.safe_load((out / "dataset.yaml").read_text())["images"] == ["images"]
    assert run("data", "images", out).output.count("2 with an image file in images/; 1 to download") == 1
    again = run("data", "images", out, "--download", "--timeout", "5")
    assert again.exit_code == 0, again.output
    assert "downloaded 0, already there 2, failed 1" in again.output and "added `images" not in again.output
    dataset = load_dataset(str(out))
    assert "A1" in dataset.images and "A2" in dataset.images and "A3" not in dataset.images
    assert dataset_stats(dataset).items_with_image == 2


def test_images_needs_an_url_field(tmp_path, recbole_src):
    out = tmp_path / "ml"
    assert run("data", "import", "--from", "recbole", recbole_src, "--out", out).exit_code == 0
    result = run("data", "images", out)
    assert result.exit_code == 2 and "dataset.yaml names no image_url_field" in result.output
