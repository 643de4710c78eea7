"""`iisan study run`: the papers' experiments as plans. A plan is a YAML list of experiments, each a list of
rows; a row is a dataset, a method, a pipeline and any `iisan train` options (a layer rule among them), run
with the plan's seeds. Every run is its own process (`launch(RunSpec(config, reuse=True), isolate=True)`): a
finished run with the same resolved config is reported again and an unfinished one continued, so an interrupted study picks up where it
stopped. Results go to `reports/study-<plan>.json`, one entry per row, with each seed's per-user test ranks
compared against the experiment's reference row by a paired bootstrap over users.

The study's record, `reports/study-<plan>/`, keeps the small files of every run (configs, reports, each
finished seed's per-user ranks and epoch metrics; no checkpoints) as soon as its row ends. Committed, it is what
makes a study resumable in a later session on a fresh clone: a row whose finished run is in the record is
reported from it without training (or extracting) anything; one whose run is there in part continues from its
finished seeds. Rows that `--dataset` / `--experiment` leave out keep their entry of the previous
`study-<plan>.json` where their options and seeds are the same ("carried"), else are marked not run.

Plan file:

    name: quick
    seeds: 1
    threads: 2                      # optional: torch threads of every run (CPU results are bit-identical only
                                    # at the same count; `study check` runs at the committed study's count)
    include: [methods]              # optional: other plans' experiments and claims, run with this plan's seeds
    experiments:
      - name: methods
        reference: iisan            # the row (by label) the others are tested against
        plot: bars                  # optional: bars (HR@10 per row) or scaling (HR@10 against text-encoder size)
        rows:
          - {label: iisan, dataset: ml-100k, method: iisan, pipeline: text-only}
          - {label: frozen, dataset: ml-100k, method: frozen, pipeline: text-only, epochs: 50}
          - {label: fft, dataset: ml-100k, method: fft, pipeline: text-only, seeds: 1}   # a row's own seeds
    claims:                         # the papers' claims, each one line of the report: holds / does not hold
      - claim: IISAN beats the frozen backbone
        experiment: methods
        rows: [iisan, frozen]
        relation: above             # above (first > second), matches (>= or no significant difference),
                                    # increasing (strictly, along the rows)
        paper: "Scientific 6.83 vs 6.00 (TKDE Table III)"
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from iisan.errors import DatasetNotFound, IisanError
from iisan.evaluate.report import bootstrap_means, per_user
from iisan.registry import installed_file, load_registry
from iisan.runtime import CONTENDED, git_commit, load_mark, load_since
from iisan.train.result import LOCAL_FIELDS
from iisan.yamlfile import read_yaml, validated

# Shipped plans: the repository's plans/ (source checkout, editable install), else the copy a wheel installs.
PLANS_DIR = installed_file("plans")
PAIRED_SAMPLES = 10_000
STALE_MARK = " ‡"  # a row trained by other result code than the study's commit (`mark_made_by`)
METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")


class StudyError(IisanError):
    """A plan that cannot run: unknown names, bad options, a YAML error."""


class NothingToRun(StudyError):
    """A plan (or its --dataset / --experiment selection) that holds no row: an included plan that holds none
    for the chosen datasets is left out, by type."""


@dataclass
class Row:
    label: str
    options: dict[str, Any]          # iisan train options: dataset, method, pipeline, ...
    seeds: int | None = None         # the row's own seed count (else the plan's)
    pending: str = ""                # why its defaults wait for its dataset's folder (resolved when it runs)

    def args(self, seeds: int, out: str) -> list[str]:
        """The `iisan train` command line of this row (options as the CLI spells them)."""
        from iisan.train.config import TrainConfig

        fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        args = ["train", "--reuse", "--no-progress", "--seeds", str(self.seeds or seeds), "--runs-dir", out]
        for key, value in self.options.items():
            name = fields[key].metadata.get("option") or "--" + key.replace("_", "-")
            if isinstance(value, bool):
                f = fields[key]
                if value == f.default:
                    continue
                args.append(f.metadata.get("flag") or (name if value else f"--no-{key.replace('_', '-')}"))
            else:
                args += [name, str(value)]
        return args


@dataclass
class Experiment:
    name: str
    rows: list[Row]
    reference: str = ""
    plot: str = ""                   # "", "bars" or "scaling"




class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RowFile(BaseModel):
    """A plan row as written: `dataset:` and any `iisan train` options (checked against TrainConfig by
    load_plan), an optional label and seed count."""
    model_config = ConfigDict(extra="allow")
    dataset: str
    label: str | None = None
    seeds: int | None = Field(default=None, ge=1, strict=True)


class ExperimentFile(_Strict):
    name: str
    reference: str | None = None
    plot: Literal["bars", "scaling"] | None = None
    rows: list[RowFile]


class ClaimFile(_Strict):
    claim: str
    experiment: str
    rows: list[str]
    relation: Literal["above", "matches", "increasing"]
    paper: str = ""


class PlanFile(_Strict):
    """plans/NAME.yaml (docs/training.md, "Studies")."""
    name: str | None = None
    seeds: int = Field(default=1, ge=1, strict=True)
    threads: int | None = Field(default=None, ge=1, strict=True)
    include: list[str] = []
    experiments: list[ExperimentFile]
    claims: list[ClaimFile] = []


@dataclass
class Claim:
    """One of the papers' claims, checked on one experiment's rows by test HR@10 (docstring above)."""

    claim: str
    experiment: str
    rows: list[str]
    relation: str
    paper: str = ""


@dataclass
class Plan:
    name: str
    path: Path
    seeds: int
    experiments: list[Experiment] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    threads: int | None = None       # torch threads of every run (None: the machine's)

    def rows(self) -> list[tuple[Experiment, Row]]:
        return [(e, r) for e in self.experiments for r in e.rows]


def plan_path(name_or_file: str) -> Path:
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    return PLANS_DIR / f"{name_or_file}.yaml"


def load_plan(name_or_file: str, datasets: tuple[str, ...] = (), seeds: int | None = None,
              _including: tuple[Path, ...] = ()) -> Plan:
    """Read and check a plan before anything runs: every method, pipeline, option and layer rule is known, and
    every claim names rows of its experiment. `seeds` (the command line's) overrides the plan's and the rows'."""
    from iisan.extract.layers import LayerSelectionError, select_layers
    from iisan.train.config import TrainConfig
    from iisan.train.methods import METHODS

    path = plan_path(name_or_file)
    if not path.is_file():
        raise StudyError(f"{path}: no such plan (shipped plans: "
                         f"{', '.join(sorted(p.stem for p in PLANS_DIR.glob('*.yaml')))})")
    raw, lines = read_yaml(path, StudyError)
    spec = validated(PlanFile, raw, lines, StudyError)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"version", "seeds", "out", "progress"}
    pipelines = load_registry().get("pipelines") or {}
    plan = Plan(spec.name or path.stem, path, int(seeds or spec.seeds), threads=spec.threads)
    for included in spec.include:
        # a plan name (plans/NAME.yaml), or a file relative to the including plan's folder
        target = plan_path(str(included))
        if not target.is_absolute() and not target.is_file() and (path.parent / target).is_file():
            target = path.parent / target
        if target.resolve() in {p.resolve() for p in (*_including, path)}:
            raise StudyError(f"{path}: include '{included}' includes itself")
        try:
            sub = load_plan(str(target), datasets, seeds, (*_including, path))  # rows run with this plan's seeds
        except NothingToRun:
            continue
        plan.experiments += sub.experiments
        plan.claims += sub.claims
    for e, exp in enumerate(spec.experiments):
        where = f"{lines.at('experiments', e)}: experiment {e + 1} ({exp.name})"
        rows = []
        for i, row_spec in enumerate(exp.rows):
            row = {k: v for k, v in raw["experiments"][e]["rows"][i].items() if k not in ("label", "seeds")}
            label = row_spec.label or str(row.get("method", "iisan"))
            row_seeds = row_spec.seeds
            at = f"{lines.at('experiments', e, 'rows', i)}: experiment {e + 1} ({exp.name}), row {i + 1} ({label})"
            unknown = sorted(set(row) - fields)
            if unknown:
                raise StudyError(f"{at}: unknown option(s) {', '.join(unknown)}")
            if row.get("method", "iisan") not in METHODS:
                raise StudyError(f"{at}: unknown method '{row['method']}' (known: {', '.join(METHODS)})")
            if row.get("pipeline") and row["pipeline"] not in pipelines:
                raise StudyError(f"{at}: unknown pipeline '{row['pipeline']}'")
            for key in ("layers_text", "layers_image"):
                if row.get(key):
                    try:
                        select_layers(str(row[key]), 64)  # the rule's form; the store's count is checked at run
                    except LayerSelectionError as err:
                        raise StudyError(f"{at}: {key}: {err}") from None
            if datasets and str(row["dataset"]) not in datasets:
                continue
            try:
                options, pending = with_default_layers(row), ""
            except DatasetNotFound as err:  # its pipeline follows the folder's modalities: settled when it runs
                options, pending = row, str(err)
            rows.append(Row(label, options, None if seeds else row_seeds, pending))
        if rows:
            labels = [r.label for r in rows]
            if len(set(labels)) != len(labels):
                raise StudyError(f"{where}: row labels repeat ({', '.join(labels)})")
            reference = exp.reference or ""
            if reference and reference not in labels:
                raise StudyError(f"{where}: reference '{reference}' is none of the rows ({', '.join(labels)})")
            plan.experiments.append(Experiment(exp.name, rows, reference, exp.plot or ""))
    names = [exp.name for exp in plan.experiments]
    if len(set(names)) != len(names):
        raise StudyError(f"{path}: experiment names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    for c, claim_spec in enumerate(spec.claims):
        claim = _claim(claim_spec, f"{lines.at('claims', c)}: claim {c + 1}", {exp.name: exp for exp in plan.experiments},
                       datasets)
        if claim is not None:
            plan.claims.append(claim)
    if not plan.experiments:
        raise NothingToRun(f"{path}: no rows to run" + (f" for {', '.join(datasets)}" if datasets else ""))
    return plan


def _claim(spec: ClaimFile, where: str, experiments: dict[str, Experiment], datasets: tuple[str, ...]
           ) -> Claim | None:
    """A checked claim; None where `--dataset` left its experiment out."""
    claim = Claim(spec.claim, spec.experiment, list(spec.rows), spec.relation, spec.paper)
    if len(claim.rows) < 2 or (claim.relation != "increasing" and len(claim.rows) != 2):
        raise StudyError(f"{where} ({claim.claim}): rows: two labels" +
                         (" or more" if claim.relation == "increasing" else ""))
    exp = experiments.get(claim.experiment)
    if exp is None:
        if datasets:
            return None
        raise StudyError(f"{where} ({claim.claim}): no experiment '{claim.experiment}' "
                         f"(experiments: {', '.join(experiments)})")
    labels = [r.label for r in exp.rows]
    missing = [r for r in claim.rows if r not in labels]
    if missing:
        if datasets:
            return None
        raise StudyError(f"{where} ({claim.claim}): row(s) {', '.join(missing)} not in '{exp.name}' ({', '.join(labels)})")
    return claim


def paired_test(ref: np.ndarray, other: np.ndarray, samples: int = PAIRED_SAMPLES, seed: int = 0) -> float:
    """Two-sided paired bootstrap p-value of mean(other - ref) over users (values already averaged over
    seeds): the share of resampled mean differences on the far side of 0, doubled."""
    diff = other - ref
    if not diff.any():
        return 1.0
    means = bootstrap_means(diff, samples, seed)
    side = (means <= 0).mean() if diff.mean() > 0 else (means >= 0).mean()
    return float(min(1.0, 2 * side))


def _seed_ranks(run_dir: Path) -> list[np.ndarray] | None:
    files = sorted(run_dir.glob("seed-*/ranks.npz"))
    return [np.load(f)["test"] for f in files] if files else None


def run_seconds(experiments: list[dict[str, Any]]) -> float:
    """The training time of a study's finished rows, each run once (a run two experiments share counts once),
    summed over the sessions that ran them: the plan's cost, where a session's wall time holds only its own."""
    runs = {r["run_dir"]: r.get("run_seconds", 0.0) for e in experiments for r in e["rows"]
            if r.get("status") == "ok" and r.get("run_dir")}
    return float(sum(runs.values()))


def row_result(run_dir: Path) -> dict[str, Any]:
    """A finished run as a study row: its summary over seeds (RunResult's report shape), cost, and the test MRR
    over its seeds' per-user ranks."""
    from iisan.train.result import RunResult

    result = RunResult.from_run_dir(run_dir)
    summary = result.to_dict()
    out: dict[str, Any] = {"run_dir": str(run_dir), "seeds": len(result.seeds),
                           "test": summary["test"], "valid": summary["valid"], "groups": summary.get("groups"),
                           "seconds_per_epoch": result.seconds_per_epoch,
                           "run_seconds": result.run_seconds,  # in whichever session ran its seeds
                           "trainable_parameters": result.trainable_parameters,
                           "threads": result.threads, "others_cpu_share": others_share(run_dir)}
    ranks = result.ranks("test")
    if ranks is not None:
        out["test"]["MRR"] = {"mean": float(np.mean([np.mean(1.0 / r) for r in ranks])),
                              "std": float(np.std([np.mean(1.0 / r) for r in ranks], ddof=1)) if len(ranks) > 1 else 0.0}
    return out


def encoder_spec(model: str, kind: str):
    """The extraction spec of a row's encoder (a registered model's own; else inferred for the slot's kind)."""
    from iisan.extract.models import spec_for

    return spec_for(model, kind=kind if model not in (load_registry().get("models") or {}) else None)


def with_default_layers(options: dict[str, Any]) -> dict[str, Any]:
    """A row's options with each cached tower's layer rule spelt out: where neither the row nor its pipeline
    names one, the encoder's default selection (what `iisan extract` keeps by default). Training without a rule
    reads every layer its store holds, and a study's store holds the union of its rows' layers (`all` for the
    no-LayerDrop ablation), so a row left without one would silently train without LayerDrop."""
    from iisan.train.config import resolve
    from iisan.train.data import layer_rule, slot_sources
    from iisan.train.methods import ItemSource, method

    cfg = resolve(dict(options))
    if method(cfg.method).items is not ItemSource.CACHED or method(cfg.method).reads != "layers":
        return options
    out = dict(options)
    for slot, source in slot_sources(cfg).items():
        if not layer_rule(cfg, slot).strip():
            out["layers_text" if slot == "text" else "layers_image"] = encoder_spec(source.model, source.kind).layers
    return out


def ensure_datasets(rows: list[tuple[Experiment, Row]], log: Callable[[str], None] = print) -> list[Path]:
    """Build, before anything runs, every dataset the rows read that the product fetches itself (a registered
    name with a built-in fetcher, e.g. ml-100k) and no data root holds yet. Other missing datasets are left to
    the extraction or the run, whose error says where to put them. Returns the folders it built."""
    from iisan.data.fetch import FETCHERS, fetch
    from iisan.errors import DataError
    from iisan.registry import dataset_entry, load_registry, locate_dataset

    built: list[Path] = []
    registered = load_registry().get("datasets") or {}
    for name in dict.fromkeys(str(row.options["dataset"]) for _, row in rows):
        if name not in registered or dataset_entry(name).fetch not in FETCHERS:
            continue
        try:
            locate_dataset(name)
        except DataError:
            log(f"fetching {name}: no data root holds it (`iisan data fetch {dataset_entry(name).fetch}`)")
            built.append(fetch(dataset_entry(name).fetch)[0])
    return built


def settle_pending(rows: list[tuple[Experiment, Row]], log: Callable[[str], None] = print) -> None:
    """Spell out the defaults of rows that waited for their dataset's folder, where it is there now (fetched
    first when the product fetches it); the others stay pending (`require_datasets` names them)."""
    ensure_datasets(rows, log)
    for _, row in rows:
        if row.pending:
            try:
                row.options, row.pending = with_default_layers(row.options), ""
            except DatasetNotFound as err:
                row.pending = str(err)


def require_datasets(rows: list[tuple[Experiment, Row]], log: Callable[[str], None] = print) -> None:
    """Before anything runs: fetch what the product fetches itself and settle the rows whose defaults waited
    for their dataset's folder (`settle_pending`), and refuse, naming each absent dataset, its rows and how to get
    it, when a row to run still has no folder. Loading a plan needs no data; running a row does."""
    from iisan.registry import locate_dataset

    settle_pending(rows, log)
    absent: dict[str, tuple[str, list[str]]] = {}
    for exp, row in rows:
        try:
            locate_dataset(str(row.options["dataset"]))
        except DatasetNotFound as err:
            absent.setdefault(str(row.options["dataset"]), (str(err), []))[1].append(f"{exp.name}/{row.label}")
    if absent:
        raise StudyError("; ".join(f"{', '.join(labels)}: {why}" for why, labels in absent.values())
                         + " (or leave these rows out with --dataset / --experiment)")


def ensure_caches(plan: Plan, log: Callable[[str], None] = print,
                  rows: list[tuple[Experiment, Row]] | None = None) -> list[Path]:
    """Extract, before any row runs, every cache the plan's cached rows read, once per (dataset, encoder,
    field) with the union of the hidden states its rows select (a row without a rule reads the encoder's
    default selection). A complete store that keeps them all is left alone; one that lacks some is written
    again with the union of its own layers and the needed ones. `rows`: only those (default: all the plan's).
    Returns the stores it extracted."""
    from iisan.cache_store import open_cache
    from iisan.extract.layers import select_layers
    from iisan.extract.models import describe_backbone
    from iisan.extract.run import ExtractConfig, run_extraction
    from iisan.registry import dataset_name
    from iisan.train.config import resolve
    from iisan.train.data import layer_rule, slot_sources, slot_store
    from iisan.train.methods import ItemSource, method

    needs: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for _, row in plan.rows() if rows is None else rows:
        cfg = resolve(dict(row.options))
        if method(cfg.method).items is not ItemSource.CACHED:
            continue
        for slot, source in slot_sources(cfg).items():
            key = (cfg.cache, cfg.dataset, source, source.kind)
            entry = needs.setdefault(key, {"model": source.model, "field": source.field, "rules": set(), "cfg": cfg})
            entry["rules"].add(layer_rule(cfg, slot).strip())
    extracted = []
    for (cache, dataset, source, kind), entry in needs.items():
        spec = encoder_spec(entry["model"], kind)
        total = describe_backbone(spec).n_hidden_states
        wanted = {i for rule in entry["rules"] for i in select_layers(rule or spec.layers, total)}
        path, _ = slot_store(entry["cfg"], dataset_name(dataset), source)
        have: set[int] = set()
        if path is not None:
            with open_cache(path) as store:
                have = set(store.manifest.layers) if store.manifest.complete else set()
                kept = set(store.manifest.layers)
            if wanted <= have:
                continue
            wanted |= kept
        layers = ",".join(map(str, sorted(wanted)))
        log(f"extracting {source} on {dataset_name(dataset)}: hidden states {layers} (the union its rows read)")
        result = run_extraction(ExtractConfig(model=entry["model"], dataset=dataset, text_field=entry["field"],
                                              layers=layers, out=Path(cache), overwrite=path is not None and
                                              not wanted <= kept, progress=False), log=log)
        extracted.append(result.path)
    return extracted


def encoder_parameters(options: dict[str, Any]) -> dict[str, int]:
    """Parameter counts of a row's backbones by slot (from their configs, no weights read): the x axis of the
    scaling plot."""
    from iisan.extract.models import parameter_count, spec_for
    from iisan.train.config import resolve
    from iisan.train.data import slot_sources

    cfg = resolve(dict(options))
    return {slot: parameter_count(spec_for(source.model)) for slot, source in slot_sources(cfg).items()}


def machine(threads: int | None = None) -> dict[str, Any]:
    """Where a study ran: device, threads (`threads`: the count its runs were pinned to), torch and Python
    versions (the header of its report)."""
    import platform

    import torch

    from iisan.evaluate.efficiency import device_name
    from iisan.runtime import numeric_platform, pick_device

    device = pick_device()
    return {"device": device_name(device), "threads": threads or torch.get_num_threads(),
            "pinned_threads": threads is not None, "torch": torch.__version__,
            "python": platform.python_version(), "numerics": numeric_platform(device)}


def _hr(result: dict[str, Any] | None) -> float | None:
    return result["test"]["HR@10"]["mean"] if result and result.get("status") == "ok" else None


def _paired_hr(first: dict[str, Any], second: dict[str, Any]) -> float | None:
    """The paired bootstrap p-value of test HR@10 (seed-averaged per user) between two finished rows, None where
    either has no per-user ranks or they ranked different users."""
    a, b = (_seed_ranks(Path(r["run_dir"])) for r in (first, second))
    if a is None or b is None or len(a[0]) != len(b[0]):
        return None
    return paired_test(np.mean([per_user(r, "HR@10") for r in b], axis=0),
                       np.mean([per_user(r, "HR@10") for r in a], axis=0))


def evaluate_claims(plan: Plan, results: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Each claim against its rows' test HR@10 (means over seeds), with the paired bootstrap p-value between the
    two rows of an `above` / `matches` claim; an `increasing` claim gets each step's p-value (row i against row
    i + 1) and the rows' valid HR@10, to tell a real reversal from noise. `holds` is None where a row failed or
    did not run."""
    out = []
    for claim in plan.claims:
        rows = [results.get((claim.experiment, label)) for label in claim.rows]
        values = [_hr(r) for r in rows]
        entry: dict[str, Any] = {**dataclasses.asdict(claim), "values": values, "holds": None, "p": None}
        if all(v is not None for v in values):
            if claim.relation == "increasing":
                entry["holds"] = all(a < b for a, b in zip(values, values[1:]))
                entry["steps_p"] = [_paired_hr(a, b) for a, b in zip(rows, rows[1:])]
                entry["valid_values"] = [(r.get("valid") or {}).get("HR@10", {}).get("mean") for r in rows]
            else:
                entry["p"] = _paired_hr(*rows)
                if claim.relation == "above":
                    entry["holds"] = values[0] > values[1]
                else:  # matches: at least as good, or no significant difference
                    entry["holds"] = values[0] >= values[1] or (entry["p"] is not None and entry["p"] >= 0.05)
        out.append(entry)
    return out


RUN_RECORD = ("config.json", "report.json", "provenance.json", "study-load.json")
SEED_RECORD = ("report.json", "ranks.npz", "metrics.jsonl")
def note_load(run_dir: Path, seconds: float, share: float | None) -> None:
    """Append one invocation of a row's run to its study-load.json: its wall seconds and the share of the
    machine's CPU that other processes used meanwhile (`iisan.runtime.load_since`)."""
    path = run_dir / "study-load.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append({"seconds": seconds, "others_cpu_share": share})
    path.write_text(json.dumps(entries, indent=2))


def others_share(run_dir: Path) -> float | None:
    """The time-weighted share of the machine's CPU other processes used while a row's run ran (None: not
    measured, e.g. a run made before this was recorded)."""
    path = run_dir / "study-load.json"
    entries = [e for e in (json.loads(path.read_text()) if path.is_file() else []) if e.get("others_cpu_share") is not None]
    total = sum(e["seconds"] for e in entries)
    return sum(e["seconds"] * e["others_cpu_share"] for e in entries) / total if total > 0 else None


def record_root(out: Path, plan: Plan) -> Path:
    """The study's record: reports/study-<plan>/<dataset>/<run folder>/ (module docstring)."""
    return Path(out) / f"study-{plan.name}"


def row_config(row: Row, seeds: int, runs: str):
    """The resolved TrainConfig that `iisan train` writes for this row (what matches runs and records)."""
    from iisan.train.config import resolve

    return resolve({**row.options, "seeds": row.seeds or seeds, "out": runs, "progress": False})


def keep_record(run_dir: Path, root: Path) -> Path | None:
    """Copy a run's small files into the record (root/<dataset>/<folder>): its config, report and provenance,
    and of each finished seed its report, per-user ranks and epoch metrics. None when there is nothing yet."""
    import shutil

    if not (run_dir / "config.json").is_file():
        return None
    dest = root / run_dir.parent.name / run_dir.name
    for name in RUN_RECORD:
        if (run_dir / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / name, dest / name)
    for seed in sorted(run_dir.glob("seed-*")):
        if (seed / "report.json").is_file():
            (dest / seed.name).mkdir(parents=True, exist_ok=True)
            for name in SEED_RECORD:
                if (seed / name).is_file():
                    shutil.copy2(seed / name, dest / seed.name / name)
    return dest


def restore_record(record: Path, cfg) -> Path:
    """A partly finished record laid back under the runs root (its config's OUT and CACHE those of this
    machine), for `iisan train --reuse` to continue from its finished seeds."""
    import shutil

    dest = Path(cfg.out) / record.parent.name / record.name
    if not dest.exists():
        shutil.copytree(record, dest)
        config = json.loads((dest / "config.json").read_text())
        config.update({k: getattr(cfg, k) for k in LOCAL_FIELDS})
        (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def restriction(plan: Plan, datasets: tuple[str, ...] = (), experiments: tuple[str, ...] = ()
                ) -> Callable[[Experiment, Row], bool] | None:
    """The `only` of run_study for `--dataset` / `--experiment` (None: every row); refuses names that select
    nothing."""
    names = [e.name for e in plan.experiments]
    unknown = [e for e in experiments if e not in names]
    if unknown:
        raise StudyError(f"{plan.path}: no experiment {', '.join(map(repr, unknown))} (experiments: {', '.join(names)})")
    if not datasets and not experiments:
        return None

    def only(exp: Experiment, row: Row) -> bool:
        return ((not datasets or str(row.options["dataset"]) in datasets)
                and (not experiments or exp.name in experiments))

    if not any(only(e, r) for e, r in plan.rows()):
        raise NothingToRun(f"{plan.path}: no rows to run for {', '.join((*datasets, *experiments))}")
    return only


def _same_row(old: dict[str, Any], row: Row, seeds: int) -> bool:
    """A previous entry is this row: same seeds and options; or an entry written before rows had their layer
    rules spelt out (`with_default_layers`) that spelling them out turns into this row's options, and whose runs
    read exactly the hidden states those rules select (its provenance says which)."""
    if old.get("seeds") != (row.seeds or seeds):
        return False
    if old.get("options") == row.options:
        return True
    try:
        spelt = with_default_layers(dict(old.get("options") or {}))
    except IisanError:
        return False
    return spelt == row.options and _read_the_layers_of(old.get("run_dir"), spelt)


def _read_the_layers_of(run_dir: str | None, options: dict[str, Any]) -> bool:
    """Whether a run's cached towers read the hidden states that `options`' layer rules select."""
    from iisan.extract.layers import select_layers

    path = Path(run_dir or "") / "provenance.json"
    if not run_dir or not path.is_file():
        return False
    caches = json.loads(path.read_text()).get("caches") or {}
    rules = {"text": options.get("layers_text", ""), "image": options.get("layers_image", ""),
             "text2": options.get("layers_image", "")}
    try:
        return bool(caches) and all(
            not rules[slot] or c["layers_read"] == select_layers(rules[slot], c["manifest"]["total_layers"])
            for slot, c in caches.items())
    except (KeyError, IisanError):
        return False


def run_origin(run_dir: str | Path | None) -> dict[str, Any]:
    """What made a run's numbers, from the files a record keeps: its resolved config (less the fields local to a
    machine), the commit and result-code hashes it ran at, the numeric platform (CPU kind and vector ISA, or GPU)
    and the torch threads of its seeds. Missing parts (records written before they were kept) are None."""
    from iisan.train.config import TrainConfig, upgrade_config

    origin: dict[str, Any] = {"config": None, "commit": "", "code": None, "numerics": None, "threads": None,
                              "data": None}
    folder = Path(run_dir) if run_dir else None
    if folder is None or not folder.is_dir():
        return origin
    try:
        config = TrainConfig(**upgrade_config(json.loads((folder / "config.json").read_text()), str(folder))).to_dict()
        origin["config"] = {k: v for k, v in config.items() if k not in LOCAL_FIELDS}
    except (OSError, ValueError, TypeError, IisanError):
        pass
    if (folder / "provenance.json").is_file():
        prov = json.loads((folder / "provenance.json").read_text())
        origin.update(commit=prov.get("commit") or "", code=prov.get("code"), numerics=prov.get("numerics"))
        # the data its numbers came from: the dataset after the protocol, and per cached slot the dataset's
        # fingerprint (ids, text, image files), the encoder's weights and the layers read
        origin["data"] = {"dataset": {k: v for k, v in (prov.get("dataset") or {}).items() if k != "folder"},
                          **{slot: {k: (c.get("manifest") or {}).get(k) for k in ("dataset_fingerprint",
                                                                                 "model_weights_sha256")}
                             | {"layers_read": c.get("layers_read")} for slot, c in (prov.get("caches") or {}).items()}}
    if (folder / "report.json").is_file():
        seeds = json.loads((folder / "report.json").read_text()).get("seeds") or []
        origin["threads"] = sorted({s["threads"] for s in seeds if "threads" in s}) or None
    return origin


def code_changes(old: dict[str, Any], now: dict[str, Any] | None = None) -> list[str] | None:
    """The result-deciding code (train, evaluate, extract, cache, data) that differs between a run's origin and
    `now` (another run's origin; default: this process's code and checkout): module names where both hashed
    their code, else source files changed between the commits (git); None where neither can tell."""
    from iisan.runtime import changed_result_code, code_hashes

    if now is None:
        now = {"code": code_hashes(), "commit": git_commit()}
    now_code, now_commit = now.get("code"), now.get("commit")
    if old.get("code") and now_code:
        return sorted(k for k in set(old["code"]) | set(now_code) if old["code"].get(k) != now_code.get(k))
    if old.get("commit") and old["commit"] == now_commit:
        return []
    return changed_result_code(old["commit"], now_commit or "HEAD") if old.get("commit") else None


def other_data(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What says two runs read other data: the dataset after the protocol, a cached slot's dataset fingerprint
    (e.g. posters present for one and absent for the other), encoder weights or layers read."""
    if not old.get("data") or not new.get("data"):
        return []
    return [f"{part} {key} {a.get(key)!r} -> {b.get(key)!r}"
            for part in sorted(set(old["data"]) | set(new["data"]))
            for a, b in [(old["data"].get(part) or {}, new["data"].get(part) or {})]
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def why_different(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(stale, elsewhere) between a recorded run's origin and a fresh one's: what says the record was made by other
    config or code (stale), and what says it was made on another numeric platform or thread count."""
    stale: list[str] = []
    if old["config"] is not None and new["config"] is not None:
        stale += [f"config {k} {old['config'].get(k)!r} -> {new['config'].get(k)!r}"
                  for k in sorted(set(old["config"]) | set(new["config"])) if old["config"].get(k) != new["config"].get(k)]
    elif old["config"] is None:
        stale.append("config not recorded")
    changed = code_changes(old, new)
    if changed is None:
        stale.append(f"code not recorded (made at {old['commit'][:7] or 'an unknown commit'})")
    elif changed:
        stale.append(f"code changed since {old['commit'][:7] or 'the record'}: " + ", ".join(changed))
    elsewhere: list[str] = []
    if old["numerics"] is None:
        elsewhere.append("the record's CPU kind was not recorded")
    elif new["numerics"] is not None:
        elsewhere += [f"{k} {old['numerics'].get(k)!r} -> {new['numerics'].get(k)!r}"
                      for k in sorted(set(old["numerics"]) | set(new["numerics"]))
                      if old["numerics"].get(k) != new["numerics"].get(k)]
    if old["threads"] and new["threads"] and old["threads"] != new["threads"]:
        elsewhere.append(f"threads {old['threads']} -> {new['threads']}")
    return stale, elsewhere


def run_study(plan: Plan, out: Path, runs: str, log: Callable[[str], None] = print, command: str = "",
              only: Callable[[Experiment, Row], bool] | None = None, threads: int | None = None,
              finished_only: bool = False, fresh: bool = False) -> Path:
    """Extract what is missing, run every row (its own process) that the record does not hold already, then
    write reports/study-<plan>.json. `only`: the rows to run (the others are carried from the previous JSON);
    `threads`: the torch threads of every run (default: the plan's, else the machine's). `finished_only`: train
    nothing; rows whose run is unfinished are marked not run, their finished seeds kept in the record (how a
    session hands a long study over to the next). `fresh`: train the rows again from scratch, their finished runs
    and their folders in the record replaced (a record made by other code, `code_changed_since`)."""
    import shutil

    from iisan.experiments.launch import LaunchFailed, launch
    from iisan.train.recipe import find_run
    from iisan.train.result import RunSpec

    threads = threads or plan.threads
    root = record_root(out, plan)
    path = Path(out) / f"study-{plan.name}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    before = {(e["name"], r["label"]): r for e in previous.get("experiments", []) for r in e["rows"]}
    results: dict[tuple[str, str], dict[str, Any]] = {}
    todo = []
    # rows whose defaults wait for their dataset's folder: settled now where it can be had
    settle_pending([(e, r) for e, r in plan.rows() if r.pending and (only is None or only(e, r))], log)
    for exp, row in plan.rows():
        key = (exp.name, row.label)
        if only is not None and not only(exp, row):
            old = before.get(key)
            carried = old is not None and old.get("status") == "ok" and _same_row(old, row, plan.seeds)
            results[key] = ({**old, "carried_from": old.get("carried_from") or previous.get("commit")} if carried
                            else {"status": "not run", "log_tail": ["left out by --dataset / --experiment"]})
            continue
        if row.pending:  # its dataset is absent: refused below, with the others that are
            todo.append((exp, row, None))
            continue
        cfg = row_config(row, plan.seeds, runs)
        if fresh:
            if finished_only:
                raise StudyError("--fresh trains the rows again; --finished-only trains nothing: give one")
            while (old_record := find_run(cfg, root)) is not None:
                log(f"{exp.name}/{row.label}: {old_record} replaced (--fresh)")
                shutil.rmtree(old_record)
            todo.append((exp, row, cfg))
            continue
        record = find_run(cfg, root)
        if record is not None and (record / "report.json").is_file():
            results[key] = {"status": "ok", "args": row.args(plan.seeds, runs), "recorded": True, **row_result(record)}
            continue
        if record is not None and find_run(cfg) is None:
            restore_record(record, cfg)
        if finished_only:
            found = find_run(cfg)
            if found is None or not (found / "report.json").is_file():
                kept = keep_record(found, root) if found is not None else None
                seeds = len(list(kept.glob("seed-*/report.json"))) if kept is not None else 0
                results[key] = {"status": "not run", "log_tail": [
                    f"unfinished: {seeds} of {row.seeds or plan.seeds} seed(s) done" + (" (in the record)" if seeds else "")]}
                continue
        todo.append((exp, row, cfg))
    recorded = sum(1 for r in results.values() if r.get("recorded") and "carried_from" not in r)
    if recorded:
        log(f"{recorded} row(s) reported from the record {root} (nothing trained)")
    require_datasets([(exp, row) for exp, row, _ in todo], log)
    todo = [(exp, row, cfg or row_config(row, plan.seeds, runs)) for exp, row, cfg in todo]
    ensure_caches(plan, log, [(exp, row) for exp, row, _ in todo])
    start = time.perf_counter()
    for n, (exp, row, cfg) in enumerate(todo, 1):
        began, mark = time.perf_counter(), load_mark()
        args = [a for a in row.args(plan.seeds, runs) if not (fresh and a == "--reuse")]
        failed: list[str] | None = None
        try:  # its own process: pinned threads, and its memory its own
            launch(RunSpec(cfg, reuse=not fresh), isolate=True, threads=threads)
        except LaunchFailed as e:
            failed = e.tail[-5:] or [str(e)]
        finally:  # also when interrupted: the finished seeds go into the record
            found = find_run(cfg)
            if found is not None and (found / "config.json").is_file():
                note_load(found, *load_since(mark))
            kept = keep_record(found, root) if found is not None else None
        took = time.perf_counter() - began
        done = time.perf_counter() - start
        eta = done / n * (len(todo) - n)
        if failed is not None or kept is None:
            tail = failed or ["the run left no folder"]
            results[(exp.name, row.label)] = {"status": "failed", "log_tail": tail, "args": args}
            log(f"[{n}/{len(todo)}] {exp.name}/{row.label}: FAILED in {took:.0f} s: {' | '.join(tail)}; "
                f"ETA {eta / 60:.0f} min")
            continue
        result = {"status": "ok", "args": args, **row_result(kept)}
        results[(exp.name, row.label)] = result
        log(f"[{n}/{len(todo)}] {exp.name}/{row.label}: test HR@10 {100 * _hr(result):.2f} "
            f"({took:.0f} s); ETA {eta / 60:.0f} min")
    from iisan.runtime import code_hashes

    now = {"code": code_hashes(), "commit": git_commit()}
    for result in results.values():
        if result.get("status") == "ok":
            mark_made_by(result, now)
    experiments = []
    for exp in plan.experiments:
        ref = results.get((exp.name, exp.reference)) if exp.reference else None
        ref_ranks = _seed_ranks(Path(ref["run_dir"])) if ref and ref.get("status") == "ok" else None
        entries = []
        for row in exp.rows:
            result = dict(results[(exp.name, row.label)])
            if result.get("status") == "ok" and "carried_from" not in result:
                if exp.plot == "scaling":
                    result["encoder_parameters"] = encoder_parameters(row.options)
                result.pop("paired_p", None)
                ranks = _seed_ranks(Path(result["run_dir"]))
                if (ref_ranks is not None and row.label != exp.reference and ranks is not None
                        and len(ranks[0]) == len(ref_ranks[0])):
                    result["paired_p"] = {m: paired_test(np.mean([per_user(r, m) for r in ref_ranks], axis=0),
                                                         np.mean([per_user(r, m) for r in ranks], axis=0))
                                          for m in ("HR@10", "NDCG@10")}
            entries.append({"label": row.label, "options": row.options, **result})
        experiments.append({"name": exp.name, "reference": exp.reference, "plot": exp.plot, "rows": entries})
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"plan": plan.name, "plan_file": str(plan.path), "seeds": plan.seeds,
                                "command": command, "commit": git_commit(),
                                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "machine": machine(threads), "wall_seconds": time.perf_counter() - start,
                                "run_seconds": run_seconds(experiments),
                                "experiments": experiments, "claims": evaluate_claims(plan, results)},
                               indent=2, default=str))
    log(f"wrote {path}")
    return path


def mark_made_by(result: dict[str, Any], now: dict[str, Any]) -> None:
    """Say in a row's entry which commit trained it (`made_at`) and, where the result-deciding code changed since
    then (or cannot be told), what changed (`code_changed_since`: names, or None for unknown); the report marks
    such a row, whose numbers today's code may not give."""
    origin = run_origin(result.get("run_dir"))
    if not origin["commit"]:  # a run outside the record (carried): the commit its entry names
        origin["commit"] = result.get("made_at") or result.get("carried_from") or ""
    changed = code_changes(origin, now)
    result["made_at"] = origin["commit"]
    result.pop("code_changed_since", None)
    if changed is None or changed:
        result["code_changed_since"] = changed


def contended(row: dict[str, Any]) -> str:
    """' †' where a row's timings were taken under contention, else ''."""
    share = row.get("others_cpu_share")
    return " †" if row.get("status") == "ok" and share is not None and share > CONTENDED else ""


def percent(metric: dict[str, Any] | None, seeds: int) -> str:
    """A metric as percent, `mean ± std` over seeds (the mean alone for one seed)."""
    if not metric:
        return ""
    return f"{100 * metric['mean']:.2f}" + (f" ± {100 * metric['std']:.2f}" if seeds > 1 else "")


def render(json_path: Path, out: Path | None = None) -> Path:
    """reports/study-<plan>.md from its JSON: a header (command, commit, date, wall time) and one table per
    experiment: mean ± std over seeds of HR@K / NDCG@K (K = 5, 10, 20) and MRR, warm / cold HR@10 with user
    counts, seconds per epoch, and the paired test against the reference row (* where p < 0.05)."""
    study = json.loads(Path(json_path).read_text())
    out = out or Path(json_path).with_suffix(".md")
    where = study.get("machine") or {}
    lines = [f"# Study: {study['plan']}", "",
             f"- command: `{study.get('command') or 'iisan study run --plan ' + study['plan']}`",
             f"- commit {study['commit']}, {study['date']}; wall time {study['wall_seconds'] / 60:.1f} min "
             f"(runs reused from earlier sessions count as their reporting time only)"
             + (f"; its runs' training time, each run once, over every session that ran them: "
                f"{study['run_seconds'] / 3600:.1f} h" if study.get("run_seconds") else "")]
    if where:
        pinned = " (pinned)" if where.get("pinned_threads") else ""
        lines.append(f"- device: {where['device']}; {where['threads']} threads{pinned}; torch {where['torch']}, "
                     f"Python {where['python']}")
    lines += [
             f"- seeds per row: {study['seeds']}; metrics in percent, mean ± std over seeds (the mean alone for one seed); p: paired bootstrap "
             f"over users of the seed-averaged HR@10 / NDCG@10 against the reference row ({PAIRED_SAMPLES:,} "
             f"resamples, seed 0), * where p < 0.05; a row \"carried from\" a commit was measured by that earlier "
             f"run of the plan and left out of this one (`--dataset` / `--experiment`)"]
    if any(contended(r) for e in study["experiments"] for r in e["rows"]):
        lines.append(f"- † s/epoch taken under contention: other processes used more than {CONTENDED:.0%} of the "
                     "machine's CPU while the row ran (the share is in the JSON, `others_cpu_share`); such "
                     "timings are high, the metrics are not affected")
    if any("code_changed_since" in r for e in study["experiments"] for r in e["rows"] if r.get("status") == "ok"):
        lines.append(f"- {STALE_MARK.strip()} trained by other result code than this study's commit (the run's commit is "
                     "`made_at` in the JSON, what changed since `code_changed_since`): today's code may not give its "
                     "numbers; `iisan study run --fresh --experiment NAME` trains it again")
    lines.append("")
    if study.get("claims"):
        lines += ["## The papers' claims, here", ""] + [claim_line(c) for c in study["claims"]] + [""]

    def group(entry: dict[str, Any] | None) -> str:
        if not entry or entry.get("HR@10") is None:
            return "n/a" if entry else ""
        return f"{100 * entry['HR@10']['mean']:.2f} ({entry['users']:,})"

    for exp in study["experiments"]:
        ref = f" (reference: {exp['reference']})" if exp["reference"] else ""
        lines += [f"## {exp['name']}{ref}", "",
                  "| row | HR@10 | NDCG@10 | p HR@10 | p NDCG@10 | HR@5 | HR@20 | NDCG@5 | NDCG@20 | MRR | warm HR@10 (n) "
                  "| cold HR@10 (n) | s/epoch |", "|---" * 13 + "|"]
        for row in exp["rows"]:
            if row.get("status") != "ok":
                lines.append(f"| {row['label']} | {row.get('status', 'failed')}: {' '.join(row.get('log_tail', [])[-1:])} |"
                             + " |" * 11)
                continue
            t, groups = row["test"], (row.get("groups") or {}).get("test") or {}
            p = row.get("paired_p") or {}
            mark = {m: (f"{p[m]:.3f}" + ("*" if p[m] < 0.05 else "")) if m in p else "" for m in ("HR@10", "NDCG@10")}
            n = row["seeds"]
            carried = f" (carried from {str(row['carried_from'])[:7]})" if row.get("carried_from") else ""
            carried += STALE_MARK if "code_changed_since" in row else ""
            lines.append(f"| {row['label']}{carried} | {percent(t['HR@10'], n)} | {percent(t['NDCG@10'], n)} | {mark['HR@10']} | "
                         f"{mark['NDCG@10']} | {percent(t.get('HR@5'), n)} | {percent(t.get('HR@20'), n)} | "
                         f"{percent(t.get('NDCG@5'), n)} | {percent(t.get('NDCG@20'), n)} | {percent(t.get('MRR'), n)} | "
                         f"{group(groups.get('warm'))} | "
                         f"{group(groups.get('cold'))} | {row['seconds_per_epoch']:.1f}{contended(row)} |")
        lines.append("")
    pictures = plots(study, out)
    if pictures:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pictures] + [""]
    out.write_text("\n".join(lines))
    return out


def claim_line(claim: dict[str, Any]) -> str:
    """`- **claim** (experiment): holds / does not hold — the numbers; paper: theirs`."""
    values = claim["values"]
    shown = [f"{label} {100 * v:.2f}" if v is not None else f"{label} not run" for label, v in
             zip(claim["rows"], values)]
    verdict = {True: "holds", False: "does not hold", None: "not measured"}[claim["holds"]]
    if claim["holds"] and claim["relation"] == "above" and claim.get("p") is not None and claim["p"] >= 0.05:
        verdict = "holds on the means, not significantly"  # above, but within what the paired test calls noise
    if claim["relation"] == "increasing":
        steps = claim.get("steps_p") or []
        if steps:  # each step's paired p-value after the row it leads to
            shown = shown[:1] + [f"{s} (p {p:.3f})" if p is not None else s for s, p in zip(shown[1:], steps)]
        numbers = " < ".join(shown) if claim["holds"] else ", ".join(shown)
        valid = claim.get("valid_values") or []
        if valid and None not in valid:
            numbers += "; valid HR@10 " + ", ".join(f"{100 * v:.2f}" for v in valid)
    else:
        numbers = " vs ".join(shown)
        if None not in values:
            numbers += f" ({100 * (values[0] - values[1]):+.2f}"
            numbers += f", paired p {claim['p']:.3f})" if claim.get("p") is not None else ")"
    paper = f"; paper: {claim['paper']}" if claim.get("paper") else ""
    return f"- **{claim['claim']}** ({claim['experiment']}): {verdict} — test HR@10 {numbers}{paper}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def plots(study: dict[str, Any], out: Path) -> list[Path]:
    """PNGs next to the report: per experiment with `plot: bars` test HR@10 per row (± std over seeds), with
    `plot: scaling` test HR@10 against the text encoder's parameters; and the cost-vs-quality scatter (seconds
    per training epoch against test HR@10) of every row of the study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ok = lambda exp: [r for r in exp["rows"] if r.get("status") == "ok"]  # noqa: E731
    for exp in study["experiments"]:
        rows = ok(exp)
        if not exp.get("plot") or len(rows) < 2:
            continue
        hr = [100 * r["test"]["HR@10"]["mean"] for r in rows]
        err = [100 * r["test"]["HR@10"]["std"] for r in rows]
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        if exp["plot"] == "scaling":
            params = [r.get("encoder_parameters", {}).get("text", 0) / 1e6 for r in rows]
            ax.errorbar(params, hr, yerr=err, fmt="o-", capsize=3)
            for x, y, r in zip(params, hr, rows):
                ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel("text encoder parameters (millions, log scale)")
        else:
            colours = ["tab:orange" if r["label"] == exp.get("reference") else "tab:blue" for r in rows]
            ax.bar(range(len(rows)), hr, yerr=err, capsize=3, color=colours)
            ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test HR@10 (%)")
        ax.set_title(exp["name"], fontsize=10)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}-{_slug(exp['name'])}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    points = [(exp, r) for exp in study["experiments"] for r in ok(exp) if r.get("seconds_per_epoch")]
    if len(points) >= 2:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for exp, r in points:
            ax.scatter(r["seconds_per_epoch"], 100 * r["test"]["HR@10"]["mean"], s=18)
            ax.annotate(f"{r['label']} ({exp['name']})", (r["seconds_per_epoch"], 100 * r["test"]["HR@10"]["mean"]),
                        textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("seconds per training epoch (log scale)")
        ax.set_ylabel("test HR@10 (%)")
        ax.set_title(f"cost against quality: {study['plan']}", fontsize=10)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}-cost.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made


CHECK_TOLERANCE = 0.003  # 0.3 points of HR@10 and NDCG@10


def check_study(json_path: Path, runs: Path, log: Callable[[str], None] = print,
                tolerance: float = CHECK_TOLERANCE) -> bool:
    """Re-run a committed study's plan from scratch (fresh runs under `runs`, nothing reused, at the committed
    study's thread count) and compare every row's test HR@10 and NDCG@10 with the committed JSON. Runs are
    bit-identical only at equal config, result code, numeric platform (CPU kind and vector ISA, or GPU) and
    threads, so a row that differs is told apart by what its record (config.json, provenance.json) says:
    STALE — the record was made by another config or other code (regenerate it: `iisan study run --fresh`);
    OTHER DATA — it read another dataset or cache (a fingerprint, encoder weights, layers read); on another machine — within `tolerance` it passes, else MOVED; at equal config, code and machine — MOVED
    (the runs are not deterministic). Prints one line per row and a summary; True when every row passes."""
    committed = json.loads(Path(json_path).read_text())
    plan_file = Path(committed.get("plan_file") or "")
    plan = load_plan(str(plan_file) if plan_file.is_file() else committed["plan"], seeds=committed["seeds"])
    out = runs / "reports"
    # at the committed study's thread count: CPU runs are bit-identical only at the same count
    threads = (committed.get("machine") or {}).get("threads")
    fresh = json.loads(run_study(plan, out, str(runs), log, command=f"iisan study check {json_path}",
                                 threads=threads).read_text())
    same_machine = {k: v for k, v in (committed.get("machine") or {}).items() if k != "python"} == \
        {k: v for k, v in fresh["machine"].items() if k != "python"}
    before = {(e["name"], r["label"]): r for e in committed["experiments"] for r in e["rows"]}
    record = Path(json_path).parent / f"study-{committed['plan']}"
    counts = {"identical": 0, "within": 0, "stale": 0, "data": 0, "elsewhere": 0, "moved": 0, "failed": 0}
    for exp in fresh["experiments"]:
        for row in exp["rows"]:
            key = (exp["name"], row["label"])
            old = before.get(key)
            name = f"{exp['name']}/{row['label']}"
            if old is None or old.get("status") != "ok" or row.get("status") != "ok":
                counts["failed"] += 1
                log(f"{name}: FAILED ({'not in the committed study' if old is None else 'a run failed'})")
                continue
            diffs = {m: row["test"][m]["mean"] - old["test"][m]["mean"] for m in ("HR@10", "NDCG@10")}
            shown = ", ".join(f"{m} {100 * old['test'][m]['mean']:.2f} -> {100 * row['test'][m]['mean']:.2f}"
                              for m in diffs)
            then, now = run_origin(_recorded_run(old, record)), run_origin(row["run_dir"])
            stale, elsewhere = why_different(then, now)
            data = other_data(then, now)
            if all(d == 0 for d in diffs.values()):
                counts["identical"] += 1
                log(f"{name}: identical ({shown})" + (f" — though its record differs: {'; '.join(stale)}" if stale else ""))
            elif stale:
                counts["stale"] += 1
                log(f"{name}: STALE ({shown}) — the record was made by another config or other code: {'; '.join(stale)}"
                    + (f"; and elsewhere: {'; '.join(elsewhere)}" if elsewhere else ""))
            elif data:
                counts["data"] += 1
                log(f"{name}: OTHER DATA ({shown}) — the record read other data than this machine has: "
                    f"{'; '.join(data)} (e.g. a dataset folder or image folder that differs, as ../shared/data)")
            elif elsewhere:
                within = all(abs(d) <= tolerance for d in diffs.values())
                counts["within" if within else "elsewhere"] += 1
                log(f"{name}: {f'within {100 * tolerance:.1f} points' if within else 'MOVED on another machine'} "
                    f"({shown}) — same config and code, another machine: {'; '.join(elsewhere)} (float rounding "
                    f"differs between CPU kinds and thread counts, and training amplifies it)")
            else:
                counts["moved"] += 1
                log(f"{name}: MOVED at equal config, code and machine ({shown}) — the runs are not deterministic")
    missing = set(before) - {(e["name"], r["label"]) for e in fresh["experiments"] for r in e["rows"]}
    for exp_name, label in sorted(missing):
        counts["failed"] += 1
        log(f"{exp_name}/{label}: in the committed study, not in the plan now")
    passed = counts["stale"] + counts["data"] + counts["elsewhere"] + counts["moved"] + counts["failed"] == 0
    told = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    log(f"check {'passed' if passed else 'FAILED'}: {sum(len(e['rows']) for e in fresh['experiments'])} rows ({told}), "
        f"{'the same machine as' if same_machine else 'another machine than'} the committed run "
        f"({fresh['machine']['device']}, {fresh['machine']['threads']} threads)"
        + (f"; regenerate the stale rows: `iisan study run --plan {committed['plan']} --fresh`" if counts["stale"] else ""))
    return passed


def _recorded_run(row: dict[str, Any], record: Path) -> Path | None:
    """A committed row's run folder: where its JSON says (from the working directory), else in the record
    beside the JSON."""
    run_dir = Path(row.get("run_dir") or "")
    if not row.get("run_dir"):
        return None
    if run_dir.is_dir():
        return run_dir
    beside = record / run_dir.parent.name / run_dir.name
    return beside if beside.is_dir() else None
