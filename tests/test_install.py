"""The installed layout: stage folders under the `iisan` namespace, console scripts wired."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.parametrize("stage", ["extract", "cache_store", "train", "evaluate", "experiments"])
def test_stage_folders_import_under_the_namespace(stage, tmp_path):
    module = importlib.import_module(f"iisan.{stage}")
    assert Path(module.__file__).resolve() == (REPO / stage / "__init__.py").resolve()
    # The install adds no top-level module of that name (`train` / `evaluate` would collide with other
    # distributions). Checked outside the repository, whose folders are importable from its own root.
    code = f"import importlib.util; print(importlib.util.find_spec({stage!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.stdout.strip() == "None", result.stdout + result.stderr


@pytest.mark.parametrize("script, expected", [("iisan", "data"), ("cache_store", "verify")])
def test_console_scripts(script, expected):
    path = shutil.which(script, path=str(Path(sys.executable).parent))  # the environment running the tests
    assert path is not None, f"console script {script} not installed next to {sys.executable}"
    result = subprocess.run([path, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and expected in result.stdout
    assert result.stdout.startswith(f"Usage: {script} [OPTIONS] COMMAND [ARGS]...")
