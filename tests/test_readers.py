"""The IISAN TSV readers on good and bad input: every problem names file and line, nothing is lost silently."""

from __future__ import annotations

import pytest

from iisan.data.readers import (DUPLICATE_ITEM, EMPTY_TITLE, NON_UTF8, UNKNOWN_ITEM, BLANK, read_items,
                                read_users)
from iisan.data.report import DataReport
from iisan.errors import DataError

from conftest import write_tsv


def test_reads_items_in_file_order_with_extra_fields(tmp_path):
    path = write_tsv(tmp_path / "items.tsv", ["b\tBee title\t1995", "a\tAy\t", "c\t Cee &amp; co\t2001"])
    items = read_items(path, ("title", "year"))
    assert items.ids == ["b", "a", "c"]
    assert items.fields["title"] == ["Bee title", "Ay", " Cee &amp; co"]  # raw: cleaning is the encoder's job
    assert items.fields["year"] == ["1995", "", "2001"]
    assert items.position == {"b": 0, "a": 1, "c": 2}
    assert items.lines == [1, 2, 3]


def test_reads_users_in_order(tmp_path):
    items = read_items(write_tsv(tmp_path / "items.tsv", ["a\tA", "b\tB", "c\tC"]))
    users = read_users(write_tsv(tmp_path / "users.tsv", ["u1\ta b c a", "u2\tc"]), items)
    assert users.ids == ["u1", "u2"]
    assert users.sequences == [["a", "b", "c", "a"], ["c"]]


@pytest.mark.parametrize("lines, line, problem", [
    (["a\tA", "b\tB\textra"], 2, "expected 2 tab-separated columns (item_id, title), found 3"),
    (["a\tA", "\tno id"], 2, "empty item id"),
    (["a\tA", "b\tB", " \tB2"], 3, "empty item id"),
    (["a\tA", "b Title with spaces"], 2, "item id 'b Title with spaces' contains whitespace (are the columns "
                                         "separated by tabs?)"),
])
def test_malformed_item_lines_name_file_and_line(tmp_path, lines, line, problem):
    path = write_tsv(tmp_path / "items.tsv", lines)
    with pytest.raises(DataError) as e:
        read_items(path)
    assert e.value.line == line
    assert str(e.value) == f"{path}:{line}: {problem}"


@pytest.mark.parametrize("lines, line, problem", [
    (["u1\ta b", "u2"], 2, "expected 2 tab-separated columns (user_id, item ids), found 1"),
    (["u1\ta b", "u2\ta\tb"], 2, "expected 2 tab-separated columns (user_id, item ids), found 3"),
    (["\ta b"], 1, "empty user id"),
])
def test_malformed_user_lines_name_file_and_line(tmp_path, lines, line, problem):
    items = read_items(write_tsv(tmp_path / "items.tsv", ["a\tA", "b\tB"]))
    path = write_tsv(tmp_path / "users.tsv", lines)
    with pytest.raises(DataError) as e:
        read_users(path, items)
    assert str(e.value) == f"{path}:{line}: {problem}"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"items\.tsv: file not found"):
        read_items(tmp_path / "items.tsv")
    items = read_items(write_tsv(tmp_path / "items.tsv", ["a\tA"]))
    with pytest.raises(DataError, match=r"users\.tsv: file not found"):
        read_users(tmp_path / "users.tsv", items)


def test_duplicate_item_keeps_first_and_warns_with_count_and_lines(tmp_path):
    path = write_tsv(tmp_path / "items.tsv", ["a\tfirst", "b\tB", "a\tsecond", "a\tthird", "b\tB again"])
    report = DataReport()
    items = read_items(path, report=report)
    assert items.ids == ["a", "b"]
    assert items.fields["title"] == ["first", "B"]
    assert report.count(DUPLICATE_ITEM) == 3
    (message,) = report.messages()
    assert message.startswith(f"{path}: {DUPLICATE_ITEM}, 3 time(s) (first at line 3, 4, 5)")
    assert "kept the first occurrence" in message


def test_strict_refuses_a_duplicate(tmp_path):
    path = write_tsv(tmp_path / "items.tsv", ["a\tfirst", "a\tsecond"])
    with pytest.raises(DataError, match=r"items\.tsv:2: a duplicate item id .*refused by --strict"):
        read_items(path, report=DataReport(strict=True))


def test_unknown_item_in_history_is_removed_and_reported(tmp_path):
    items = read_items(write_tsv(tmp_path / "items.tsv", ["a\tA", "b\tB"]))
    path = write_tsv(tmp_path / "users.tsv", ["u1\ta x b", "u2\ty y a"])
    report = DataReport()
    users = read_users(path, items, report)
    assert users.sequences == [["a", "b"], ["a"]]
    assert report.count(UNKNOWN_ITEM) == 3
    (message,) = report.messages()
    assert "user 'u1' item 'x'" in message and "user 'u2' item 'y'" in message
    assert "(first at line 1, 2)" in message


def test_empty_title_is_kept_and_reported(tmp_path):
    path = write_tsv(tmp_path / "items.tsv", ["a\tA", "b", "c\t  "])
    report = DataReport()
    items = read_items(path, report=report)
    assert items.ids == ["a", "b", "c"]
    assert items.fields["title"] == ["A", "", "  "]
    assert report.count(EMPTY_TITLE) == 2
    assert "(first at line 2, 3)" in report.messages()[0]


def test_non_utf8_bytes_are_replaced_and_reported(tmp_path):
    path = write_tsv(tmp_path / "items.tsv", b"a\tCaf\xe9\nb\tB\n")
    report = DataReport()
    items = read_items(path, report=report)
    assert items.fields["title"] == ["Caf\ufffd", "B"]
    assert report.count(NON_UTF8) == 1
    assert "byte 0xe9 at column 6" in report.messages()[0]
    with pytest.raises(DataError, match=r"items\.tsv:1: non-UTF-8 bytes"):
        read_items(path, report=DataReport(strict=True))


def test_blank_lines_and_bom_and_crlf(tmp_path):
    path = write_tsv(tmp_path / "items.tsv", b"\xef\xbb\xbfa\tA\r\n\r\nb\tB\r\n")
    report = DataReport()
    items = read_items(path, report=report)
    assert items.ids == ["a", "b"]
    assert items.fields["title"] == ["A", "B"]
    assert report.count(BLANK) == 1
