"""One name per meaning on the command line: every option of every command (`iisan`, `cache_store`) is walked; a
name that several commands use with different help texts is in the vocabulary and each of its helps starts with
the vocabulary's phrase; the old spellings are hidden aliases that still work and say so."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import click
from click.testing import CliRunner

from iisan.cache_store.cli import main as cache_store_main
from iisan.cli import VOCABULARY, main, renamed_args


def _options(group: click.Group, path: str) -> list[tuple[str, str, str]]:
    found = []
    for name, command in group.commands.items():
        where = f"{path} {name}"
        if isinstance(command, click.Group):
            found += _options(command, where)
            continue
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                found += [(opt, where, param.help or "") for opt in param.opts if opt.startswith("--")]
    return found


def test_a_name_carries_one_meaning_on_every_command():
    options = _options(main, "iisan") + _options(cache_store_main, "cache_store")
    helps: dict[str, dict[str, str]] = defaultdict(dict)
    for name, where, text in options:
        helps[name][where] = text
    assert len(helps) > 80 and len(helps["--seed"]) >= 5
    problems = []
    for name, by_command in sorted(helps.items()):
        if name not in VOCABULARY:
            if len(set(by_command.values())) > 1:  # several commands, several texts: a shared name with no meaning
                problems.append(f"{name}: {sorted(by_command)} differ and {name} is not in VOCABULARY")
            continue
        problems += [f"{name} on {where}: help {text[:60]!r} does not start with {VOCABULARY[name]!r}"
                     for where, text in sorted(by_command.items()) if not text.startswith(VOCABULARY[name])]
    assert not problems, "\n".join(problems)
    # the old spellings of the folders are gone from every command's help
    assert not {"--cache", "--runs", "--reports", "--dest", "--items"} & set(helps)
    assert set(helps["--users"]) == {"iisan recommend"}  # a selection of users; synth's count is --n-users


def test_old_spellings_are_rewritten_with_a_notice(capsys):
    renamed = {"--out": "--runs-dir", "--cache": "--cache-dir"}
    args = ["--dataset", "toy", "--out", "a", "--cache=b", "--", "--out"]
    assert renamed_args(args, renamed, "iisan train") == [
        "--dataset", "toy", "--runs-dir", "a", "--cache-dir=b", "--", "--out"]
    err = capsys.readouterr().err
    assert "iisan train: --out is now --runs-dir" in err and "--cache is now --cache-dir" in err


def test_an_old_spelling_still_runs_the_command(tmp_path: Path):
    """`data synth` with every old name: it writes where they say, and says what they are called now."""
    runner = CliRunner()
    old = runner.invoke(main, ["data", "synth", "--users", "12", "--items", "40", "--layers", "2", "--dim", "8",
                               "--out", str(tmp_path / "old"), "--cache", str(tmp_path / "old-cache")])
    assert old.exit_code == 0, old.output
    new = runner.invoke(main, ["data", "synth", "--n-users", "12", "--n-items", "40", "--n-states", "2", "--dim", "8",
                               "--out", str(tmp_path / "new"), "--cache-dir", str(tmp_path / "new-cache")])
    assert new.exit_code == 0, new.output
    for notice in ("--users is now --n-users", "--items is now --n-items", "--layers is now --n-states",
                   "--cache is now --cache-dir"):
        assert notice in old.stderr and notice not in new.stderr
    for name in ("users.tsv", "items.tsv"):  # the same data, each under the folder its --out named
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes()
    assert (tmp_path / "old-cache" / "old" / "synth.zarr").is_dir()  # the store under the old --cache
    assert (tmp_path / "new-cache" / "new" / "synth.zarr").is_dir()
    # `iisan cache stats` is `cache_store stats`
    ours = runner.invoke(main, ["cache", "stats", str(tmp_path / "new-cache")])
    theirs = runner.invoke(cache_store_main, ["stats", str(tmp_path / "new-cache")])
    assert ours.exit_code == theirs.exit_code == 0 and ours.output == theirs.output and "synth" in ours.output


def test_docs_cli_is_generated_from_the_commands():
    from iisan.cli import cli_markdown

    committed = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    generated = cli_markdown()
    assert "## iisan train\n" in generated and "## cache_store stats\n" in generated and "--runs-dir" in generated
    assert committed == generated, "docs/cli.md is stale: run `make docs` and commit it"

