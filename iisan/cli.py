"""`iisan` console script. This layer only parses arguments and calls the stage APIs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from iisan import __version__
from iisan.errors import IisanError


class IisanGroup(click.Group):
    """Prints IisanError as one clear message (file, line, problem) instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except IisanError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=IisanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iisan")
def main() -> None:
    """IISAN-Versa: cached side-adapted multimodal foundation models for sequential recommendation."""


@main.group()
def data() -> None:
    """Datasets: fetch the built-in ones, print statistics."""


@data.command("fetch")
@click.argument("name")
@click.option("--dest", type=click.Path(path_type=Path), default=None,
              help="Folder to build the dataset in (default: ./data/NAME).")
@click.option("--force", is_flag=True, help="Rebuild even if the files are already there.")
@click.option("--wheel", type=click.Path(path_type=Path), default=None,
              help="Use this already-downloaded wheel instead of downloading it (also $IISAN_RECBOLE_WHEEL).")
def data_fetch(name: str, dest: Path | None, force: bool, wheel: Path | None) -> None:
    """Build a built-in dataset (ml-100k) in the IISAN TSV format."""
    from iisan.data.fetch import FETCHERS

    if name not in FETCHERS:
        raise IisanError(f"no built-in fetcher for '{name}' (available: {', '.join(FETCHERS)}); other datasets "
                         f"are folders of items.tsv / users.tsv found in $IISAN_DATA_DIR, ./data or ../shared/data")
    dest = dest or Path("data") / name
    path, counts = FETCHERS[name](dest, force=force, wheel=wheel)
    if counts is None:
        click.echo(f"{name}: already at {path} (use --force to rebuild)")
    else:
        click.echo(f"{name}: wrote {path} ({counts['items']:,} items, {counts['users']:,} users, "
                   f"{counts['interactions']:,} interactions)")


@data.command("stats")
@click.argument("name")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="The dataset folder (default: found by name in $IISAN_DATA_DIR, ./data, ../shared/data).")
@click.option("--strict", is_flag=True, help="Refuse any data problem (duplicate ids, unknown items, ...).")
@click.option("--check-images", is_flag=True, help="Decode every kept item's image and count corrupt ones.")
def data_stats(name: str, data_dir: Path | None, strict: bool, check_images: bool) -> None:
    """Print the SPEC §1.2 statistics of a dataset."""
    from iisan.data.dataset import dataset_stats, load_dataset
    from iisan.data.images import open_image

    dataset = load_dataset(name, folder=data_dir, strict=strict)
    for message in dataset.report.messages():
        click.echo(f"warning: {message}", err=True)
    for absent in dataset.location.absent_image_dirs:
        click.echo(f"warning: image folder '{absent}' not found in the data roots", err=True)
    s = dataset_stats(dataset)
    rows = [
        ("dataset", f"{name} ({dataset.location.folder})"),
        ("users", f"{s.users:,}  ({s.file_users:,} in the users file)"),
        ("items", f"{s.items:,}  ({s.file_items:,} in the items file)"),
        ("interactions", f"{s.interactions:,}  ({s.file_interactions:,} before truncation)"),
        ("zero-popularity items", f"{s.zero_popularity_items:,}"),
        ("repeat targets valid/test", f"{s.repeat_valid:,} / {s.repeat_test:,}"),
        ("items with an image", f"{s.items_with_image:,}  ({s.items - s.items_with_image:,} take the "
                                f"missing-image path; {s.file_items_with_image:,} in the items file)"),
    ]
    if check_images:
        split = dataset.split()
        corrupt = [why for item in split.item_ids if item in dataset.images
                   for _, why in [open_image(dataset.images.get(item))] if why]
        rows.append(("corrupt images", f"{len(corrupt):,}" + (f"  (e.g. {corrupt[0]})" if corrupt else "")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
