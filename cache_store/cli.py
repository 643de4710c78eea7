"""`cache_store` console script: stats and verify."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from iisan.cache_store.inspect import default_cache_root, find_stores, format_stats, store_stats, verify_store
from iisan.cache_store.manifest import CacheError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inspect IISAN layer caches."""


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
def stats(paths: tuple[Path, ...]) -> None:
    """One row per cache: dataset, model, rows, layers kept/total, hidden size, dtype, bytes on disk, the size
    all layers would take, completeness. PATHS are stores or folders (default: $IISAN_CACHE_DIR or cache/)."""
    roots = list(paths) or [default_cache_root()]
    if not paths and not roots[0].exists():
        click.echo(f"no cache folder at {roots[0]} (extract one with `iisan extract`)")
        return
    try:
        stores = find_stores(roots)
        if not stores:
            click.echo("no cache stores found in " + ", ".join(map(str, roots)))
            return
        rows, failures = [], []
        for store in stores:
            try:
                rows.append(store_stats(store))
            except CacheError as e:
                failures.append(str(e))
    except CacheError as e:
        raise click.ClickException(str(e)) from None
    if rows:
        click.echo(format_stats(rows))
    for failure in failures:
        click.echo(f"unreadable: {failure}", err=True)
    if failures:
        sys.exit(1)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Dataset folder to check the fingerprint against (default: found by name in the data roots).")
@click.option("--skip-fingerprint", is_flag=True, help="Do not compare with the dataset files.")
def verify(path: Path, data_dir: Path | None, skip_fingerprint: bool) -> None:
    """Check shape, dtype, flags, NaN/Inf and the dataset fingerprint. Exit status 1 on any problem."""
    problems = verify_store(path, data_dir, check_fingerprint=not skip_fingerprint)
    if problems:
        for problem in problems:
            click.echo(problem if problem.startswith(str(path)) else f"{path}: {problem}", err=True)
        sys.exit(1)
    click.echo(f"{path}: ok")


if __name__ == "__main__":
    main()
