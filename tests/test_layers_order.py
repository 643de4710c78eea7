"""The package's imports run one way, in layers (docs/design.md): a module imports only its own layer or lower
ones, at module level, inside a function, or under TYPE_CHECKING alike."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Installed package -> source folder (pyproject.toml's package-dir), and the layers, lowest first.
FOLDERS = {"iisan": REPO / "iisan", "iisan.cache_store": REPO / "cache_store", "iisan.extract": REPO / "extract",
           "iisan.evaluate": REPO / "evaluate", "iisan.train": REPO / "train",
           "iisan.deploy": REPO / "deploy", "iisan.experiments": REPO / "experiments"}
LAYERS = [("iisan", "iisan.errors", "iisan.registry", "iisan.runtime"), ("iisan.data",), ("iisan.cache_store",),
          ("iisan.extract",), ("iisan.evaluate",), ("iisan.train",), ("iisan.deploy",), ("iisan.experiments",),
          ("iisan.cli", "iisan.demo", "iisan.api")]


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    assert best is not None, module
    return best


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            if package == "iisan" and path.parent != folder and path.parent.name != "data":
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imported(path: Path, module: str) -> list[tuple[int, str]]:
    out = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "iisan"]
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([name] if name else []))
            if name.split(".")[0] == "iisan":
                out.append((node.lineno, name))
    return out


def test_every_module_is_covered():
    found = modules()
    assert {"iisan.cli", "iisan.data.dataset", "iisan.train.recipe", "iisan.experiments.bench",
            "iisan.evaluate.metrics", "iisan.cache_store.reader", "iisan.extract.run"} <= set(found)
    assert len(found) > 40


def test_imports_run_one_way():
    wrong = []
    for module, path in modules().items():
        mine = layer_of(module)
        for line, target in imported(path, module):
            if target == "iisan":  # the package itself (its __init__: the version) is the lowest layer
                continue
            if layer_of(target) > mine:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {module} (layer {mine}) imports {target} "
                             f"(layer {layer_of(target)})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_walker_sees_an_import_inside_a_function(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from iisan.train.recipe import train\n")
    assert imported(path, "iisan.evaluate.m") == [(2, "iisan.train.recipe")]
    assert layer_of("iisan.train.recipe") > layer_of("iisan.evaluate.m")
