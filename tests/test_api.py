"""The README's Python example, run as written (on ml-100k fetched by the product, in a fresh folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, recbole_wheel, capsys):
    text = README.read_text(encoding="utf-8")
    example = re.search(r"<!-- python-example -->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IISAN_RECBOLE_WHEEL", str(recbole_wheel))
    monkeypatch.setenv("IISAN_DATA_DIR", str(tmp_path / "data"))
    exec(compile(example, "README.md:python-example", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"test HR@10 \d+\.\d\d", printed[0]), printed  # the typed RunResult
    assert len(printed) == 6 and all(not line.startswith(("50 ", "172 ", "181 ")) for line in printed[1:])
    assert (tmp_path / "cache" / "ml-100k" / "minilm-l6.zarr").is_dir() and list((tmp_path / "runs").iterdir())
