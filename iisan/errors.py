"""Errors raised for bad input. Each names the file (and line, where there is one) and the problem."""

from __future__ import annotations

from pathlib import Path


class IisanError(Exception):
    """Base class: an error the CLI prints as one clear message instead of a traceback."""


class DataError(IisanError):
    """A dataset file is missing or malformed."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class DatasetNotFound(DataError):
    """A dataset's folder is in no data root (the message says how to get it)."""

    def __init__(self, name: str, problem: str):
        self.name = name
        super().__init__(name, problem)


class RegistryError(IisanError):
    """pipelines.yaml is missing, malformed, or does not name what was asked for."""
