"""Every YAML file the project reads, validated one way: parsed with the line of each node kept, checked by a
pydantic model, and every problem reported as `FILE:LINE: FIELD: problem` (the line of the field's value, or of
the nearest mapping that holds it when the field is missing).

    raw, where = read_yaml(path, StudyError)          # the data, and a Where that finds lines in it
    plan = validated(PlanFile, raw, where, StudyError)
    where.line("experiments", 2, "rows", 0)          # the line of a node, for checks of the caller's own
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, RootModel, ValidationError

from iisan.errors import IisanError

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class Where:
    """A YAML file and its node tree: `line(*path)` is the 1-based line of the node at `path` (mapping keys and
    list indexes), or of the deepest node on the way that exists."""

    path: Path
    node: yaml.Node | None
    prefix: tuple[str | int, ...] = ()  # where `node` sits in the file (`inside`), for the field names

    def _deepest(self, loc: tuple[str | int, ...]) -> yaml.Node | None:
        """The node at `loc`, or the deepest node on the way that exists (a missing field: its mapping)."""
        node = self.node
        for step in loc:
            if isinstance(node, yaml.MappingNode):
                child = next((v for k, v in node.value if getattr(k, "value", None) == str(step)), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
                child = node.value[step]
            else:
                child = None
            if child is None:
                break
            node = child
        return node

    def inside(self, *loc: str | int) -> "Where":
        """The Where of the node at `loc` (a part of the file checked on its own, e.g. one registry entry)."""
        return Where(self.path, self._deepest(loc), (*self.prefix, *loc))

    def line(self, *loc: str | int) -> int | None:
        node = self._deepest(loc)
        return None if node is None else node.start_mark.line + 1

    def at(self, *loc: str | int) -> str:
        """`FILE:LINE` of the node at `loc` (`FILE` alone for an empty file)."""
        line = self.line(*loc)
        return f"{self.path}:{line}" if line is not None else str(self.path)


def read_yaml(path: str | Path, error: type[IisanError] = IisanError) -> tuple[Any, Where]:
    """The file's data and its `Where`; a file that is not UTF-8 or not YAML is `error` naming its line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise error(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    return data, Where(path, node)


def field_name(loc: tuple[str | int, ...]) -> str:
    """A pydantic location as the YAML reads it: `experiments[2].rows[0].seeds`."""
    out = ""
    for step in loc:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def validated(model: type[Model], data: Any, where: Where, error: type[IisanError] = IisanError) -> Model:
    """`data` checked by `model`; every problem one line `FILE:LINE: FIELD: problem`, all raised as one `error`."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as e:
        lines = []
        for problem in e.errors(include_url=False):
            loc = tuple(step for step in problem["loc"] if not (isinstance(step, str) and "[" in step))  # unions
            message = problem["msg"]
            if problem["type"] == "extra_forbidden":
                known = ", ".join(model_fields_at(model, loc[:-1]))
                message = f"unknown key (known: {known})"
            elif problem["type"] == "missing":
                message = "required, and missing"
            lines.append(f"{where.at(*loc)}: {field_name((*where.prefix, *loc)) or '(the file)'}: {message}")
        raise error("\n".join(lines)) from None


def model_fields_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The field names of the model found at `loc` inside `model` (for "unknown key (known: ...)")."""

    def unwrap(hint: Any) -> Any:
        """X | None -> X; a RootModel -> what it holds."""
        while True:
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                members = [a for a in typing.get_args(hint) if a is not type(None)]
                hint = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), members[0])
            elif isinstance(hint, type) and issubclass(hint, RootModel):
                hint = hint.model_fields["root"].annotation
            else:
                return hint

    current: Any = unwrap(model)
    for step in loc:
        origin = typing.get_origin(current)
        if origin is dict:
            current = typing.get_args(current)[1]
        elif origin is list:
            current = typing.get_args(current)[0]
        elif isinstance(current, type) and issubclass(current, BaseModel) and step in current.model_fields:
            current = current.model_fields[step].annotation
        else:
            return []
        current = unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []
