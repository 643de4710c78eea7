"""Collects the problems found while reading a dataset, so that nothing is dropped silently.

Each problem kind is counted per file with its first line numbers and examples; `--strict` turns the first
problem into an error instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from iisan.errors import DataError

FIRST = 5  # how many line numbers / examples a warning quotes


@dataclass
class ProblemCount:
    file: str
    problem: str
    consequence: str
    count: int = 0
    lines: list[int] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def message(self) -> str:
        where = f"{self.file}: {self.problem}, {self.count:,} time(s)"
        if self.lines:
            where += " (first at line " + ", ".join(str(n) for n in self.lines) + ")"
        if self.examples:
            where += "; e.g. " + "; ".join(self.examples)
        return f"{where}; {self.consequence}"


@dataclass
class DataReport:
    """Problems found in a dataset's files. With `strict`, the first problem raises a DataError."""

    strict: bool = False
    problems: dict[tuple[str, str], ProblemCount] = field(default_factory=dict)

    def add(self, path: str | Path, line: int | None, problem: str, consequence: str,
            example: str | None = None) -> None:
        if self.strict:
            raise DataError(path, f"{problem}" + (f" ({example})" if example else "")
                            + " [refused by --strict]", line)
        key = (str(path), problem)
        entry = self.problems.setdefault(key, ProblemCount(str(path), problem, consequence))
        entry.count += 1
        if line is not None and len(entry.lines) < FIRST and line not in entry.lines:
            entry.lines.append(line)
        if example is not None and len(entry.examples) < FIRST:
            entry.examples.append(example)

    def count(self, problem: str) -> int:
        return sum(p.count for (_, kind), p in self.problems.items() if kind == problem)

    def messages(self) -> list[str]:
        return [p.message() for p in self.problems.values()]
