"""`iisan tune`: Optuna on the cache. Every trial is one training run (one seed) whose valid HR@10 after each
epoch feeds a median pruner; trials select on valid only. The best trial's config is then trained with three
fresh seeds and reported on test (with the warm / cold split). Resumable: the study lives in SQLite under
`runs/<dataset>/tune-<method>-<pipeline>/`, a trial killed mid-run is failed and enqueued again on the next
call, and its training run resumes from its last checkpoint (`launch` of a spec with `reuse`).

The search space of each method is in one place (`SPACES`), overridable from a YAML file (`--space`):

    lr: {low: 1e-4, high: 1e-3, log: true}     # a float range (log scale optional)
    bottleneck: {choices: [32, 64]}             # a choice
    dropout: null                               # not tuned (the fixed config's value)
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, RootModel

from iisan.errors import IisanError
from iisan.experiments.launch import launch
from iisan.registry import dataset_name, load_registry, save_preset
from iisan.runtime import git_commit
from iisan.train.result import RunResult, RunSpec
from iisan.yamlfile import read_yaml, validated


class TuneError(IisanError):
    """A tuning request that cannot run: a bad search space, a study of something else."""


@dataclass(frozen=True)
class Param:
    """One tuned TrainConfig field: a float range (`low`, `high`, `log`) or a list of `choices`."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        return ({"choices": list(self.choices)} if self.choices else
                {"low": self.low, "high": self.high, "log": self.log})


def _space(**params: dict[str, Any]) -> dict[str, Param]:
    return {name: Param(name, **spec) for name, spec in params.items()}


_OPTIMISATION = dict(lr={"low": 5e-5, "high": 2e-3, "log": True},
                     batch_size={"choices": (16, 32, 64, 128)},
                     dropout={"low": 0.0, "high": 0.5})
_SAN = dict(lr_san={"low": 2e-5, "high": 1e-3, "log": True},
            bottleneck={"choices": (16, 32, 64, 128)},
            layers_text={"choices": ("", "remove_first")})  # all cached states; or h_0 as the initial state

# The search space per method: learning rates, SAN bottleneck, batch size, dropout, ID dropout, layer rule.
SPACES: dict[str, dict[str, Param]] = {
    "iisan": _space(**_OPTIMISATION, **_SAN),
    "iisan-hybrid": _space(**_OPTIMISATION, **_SAN, id_dropout={"low": 0.0, "high": 0.6},
                           lr_id={"low": 1e-4, "high": 3e-3, "log": True}),
    "frozen": _space(**_OPTIMISATION),
    "sasrec-id": _space(**_OPTIMISATION),
}


class RangeFile(BaseModel):
    """One option of a search-space file: `low` / `high` [/ `log`], or `choices`."""
    model_config = ConfigDict(extra="forbid")
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None


class SpaceFile(RootModel[dict[str, RangeFile | None]]):
    """A search-space file: option -> range (null removes the option from the method's space)."""


def load_space(method: str, path: Path | None = None) -> dict[str, Param]:
    """The method's space, with a YAML file's entries replacing (or, as null, removing) parameters."""
    from iisan.train.config import TrainConfig

    space = dict(SPACES.get(method, {}))
    if path is not None:
        if not Path(path).is_file():
            raise TuneError(f"{path}: cannot read the search space (no such file)")
        raw, lines = read_yaml(path, TuneError)
        spec_of = validated(SpaceFile, raw, lines, TuneError).root
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        for name, spec in spec_of.items():
            at = f"{lines.at(name)}: {name}"
            if name not in fields or name in ("dataset", "method", "pipeline", "version", "seed", "seeds"):
                raise TuneError(f"{at}: not a tunable option of iisan train")
            if spec is None:
                space.pop(name, None)
                continue
            if spec.choices is not None:
                if not spec.choices or spec.low is not None or spec.high is not None:
                    raise TuneError(f"{at}: choices must be a non-empty list (and alone)")
                space[name] = Param(name, choices=tuple(spec.choices))
            else:
                if spec.low is None or spec.high is None:
                    raise TuneError(f"{at}: a range needs numeric low and high")
                low, high = spec.low, spec.high
                if not low < high or (spec.log and low <= 0):
                    raise TuneError(f"{at}: empty range [{low}, {high}]" + (" (log needs low > 0)" if spec.log else ""))
                space[name] = Param(name, low, high, spec.log)
    if not space:
        raise TuneError(f"no search space for method '{method}' (built in: {', '.join(SPACES)}); give --space FILE")
    return space


@dataclass
class TuneConfig:
    trials: int = field(default=20, metadata={"help": "trials in total (a resumed study runs only the rest)"})
    timeout: float = field(default=0.0, metadata={"help": "stop starting trials after this many seconds (0: none)"})
    space: str = field(default="", metadata={"help": "YAML file overriding the method's search space"})
    save_preset: str = field(default="", metadata={"help": "write the best config as this preset (a pipeline) in "
                                                           "presets.yaml, beside pipelines.yaml"})
    final_seeds: int = field(default=3, metadata={"help": "fresh seeds the best config is trained with for test"})
    sampler_seed: int = field(default=0, metadata={"help": "TPE sampler seed"})
    reports: str = field(default="reports", metadata={"help": "Reports folder: the report and plot", "option": "--reports-dir"})
    command: str = ""  # the command line, for the report (no option: no help)


FIXED_IDENTITY = ("dataset", "method", "pipeline")


def tune_folder(base) -> Path:
    return Path(base.out) / dataset_name(base.dataset) / f"tune-{base.method}-{base.pipeline}"


def run_tune(fixed: dict[str, Any], tc: TuneConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the study for the fixed options, retrain the best config with fresh seeds, write the
    report; returns a summary (best params, valid, test)."""
    import optuna

    from iisan.train.config import resolve

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise IisanError("iisan tune runs in one process (each rank would ask Optuna for a trial of its own): "
                         "launch it without torchrun")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = resolve(dict(fixed), log=log)
    space = load_space(base.method, Path(tc.space) if tc.space else None)
    folder = tune_folder(base)
    folder.mkdir(parents=True, exist_ok=True)
    identity = {"dataset": dataset_name(base.dataset), "method": base.method, "pipeline": base.pipeline,
                "fixed": {k: v for k, v in base.to_dict().items() if k not in space and k not in ("progress", "out")},
                "space": {k: p.to_dict() for k, p in space.items()}}
    study, requeued = open_study(folder, identity, tc, log)
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    remaining = max(tc.trials - done, 0)
    log(f"study {folder / 'study.db'}: {done} trial(s) done, {remaining} to run; tuning {', '.join(space)}")
    trials_out = folder / "trials"

    def objective(trial) -> float:
        params = {name: p.suggest(trial) for name, p in space.items()}
        cfg = resolve({**fixed, **params, "seeds": 1, "out": str(trials_out), "progress": False})
        result = trial_run(trial, cfg, lambda epoch, hr: (hr, epoch))
        trial.set_user_attr("run_dir", str(result.run_dir))
        trial.set_user_attr("best_epoch", result.seeds[0].best_epoch)
        return result.mean("HR@10", "valid")

    def progress(study, trial) -> None:
        value = f"valid HR@10 {100 * trial.value:.2f}" if trial.value is not None else trial.state.name.lower()
        if trial.user_attrs.get("diverged"):
            value = "diverged (pruned)"
        best = study.best_trial if any(t.state == TrialState.COMPLETE for t in study.trials) else None
        log(f"trial {trial.number}: {value}; "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
            + (f" | best so far {100 * best.value:.2f} (trial {best.number})" if best else ""))

    best, complete = optimize(study, objective, progress, remaining, tc, folder)
    log(f"best trial {best.number}: valid HR@10 {100 * best.value:.2f}; retraining it with {tc.final_seeds} fresh "
        f"seed(s) for test")
    best_cfg = resolve({**fixed, **best.params, "seeds": tc.final_seeds, "seed": base.seed + 1000,
                        "out": str(folder / "best"), "progress": False})
    final = launch(RunSpec(best_cfg, reuse=True), log=log).to_dict()
    summary = {"folder": str(folder), "best_trial": best.number, "best_params": best.params,
               "best_valid_hr10": best.value, "final_run": final["run_dir"], "valid": final["valid"],
               "test": final["test"], "groups": final.get("groups"), "space": identity["space"],
               "trial_seconds": sum(_seconds(t) for t in study.trials if t.number not in requeued),
               "interrupted_trials": sorted(requeued), "trials": len(study.trials)}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report = write_report(study, base, space, summary, Path(tc.reports), fixed, tc.command)
    log(f"report: {report}")
    if tc.save_preset:
        values = {**preset_of(base, fixed), **best.params}
        path = save_preset(tc.save_preset, values, f"tuned by `iisan tune` on {identity['dataset']} "
                             f"({len(complete)} complete trials; best valid HR@10 {100 * best.value:.2f})")
        log(f"saved preset '{tc.save_preset}' in {path} (`iisan train --pipeline {tc.save_preset}`)")
    return summary


def optimize(study, objective, progress, remaining: int, tc: TuneConfig, folder: Path):
    """Run the remaining trials; returns (the best trial, the complete trials), refusing a study none of whose
    trials completed."""
    from optuna.trial import TrialState

    if remaining:
        study.optimize(objective, n_trials=remaining, timeout=tc.timeout or None, callbacks=[progress], catch=())
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise TuneError(f"{folder}: no trial completed (all pruned, diverged or interrupted)")
    return study.best_trial, complete


def trial_run(trial, cfg, report: Callable[[int, float], tuple[float, int]], where: str = "") -> RunResult:
    """Train (or reuse) one run of a trial: after each epoch `report(epoch, valid HR@10)` gives the (value, step)
    the median pruner sees, and a pruned trial stops the run there; a run whose loss diverges prunes the trial
    (`diverged`, naming `where`) instead of failing the study."""
    import optuna

    from iisan.train.step import NonFiniteLoss

    def on_epoch(epoch: int, hr: float) -> None:
        trial.report(*report(epoch, hr))
        if trial.should_prune():
            trial.set_user_attr("pruned_at_epoch", epoch)
            if where:
                trial.set_user_attr("pruned_at", f"{where} epoch {epoch}")
            raise optuna.TrialPruned()

    try:
        return launch(RunSpec(cfg, reuse=True), log=lambda m: None, on_epoch=on_epoch)
    except NonFiniteLoss as e:
        trial.set_user_attr("diverged", f"{where}: {e}" if where else str(e))
        raise optuna.TrialPruned() from None


@dataclass(frozen=True)
class Setting:
    """One dataset (and pipeline) a multi-setting tuning scores a config on: `NAME[:PIPELINE]` on the command
    line (`iisan tune --dataset scientific --dataset ml-100k:text-only --dataset ml-100k:text-image`)."""

    dataset: str
    pipeline: str = ""

    @classmethod
    def parse(cls, text: str) -> "Setting":
        name, _, pipeline = text.partition(":")
        if not name or (":" in pipeline):
            raise TuneError(f"--dataset '{text}': NAME or NAME:PIPELINE")
        return cls(name, pipeline)

    @property
    def label(self) -> str:
        return f"{dataset_name(self.dataset)}:{self.pipeline}" if self.pipeline else dataset_name(self.dataset)

    def options(self, fixed: dict[str, Any]) -> dict[str, Any]:
        return {**fixed, "dataset": self.dataset, **({"pipeline": self.pipeline} if self.pipeline else {})}


def tune(fixed: dict[str, Any], datasets: list[str], tc: TuneConfig, log: Callable[[str], None] = print
         ) -> dict[str, Any]:
    """`iisan tune`: one dataset is tuned on its own valid HR@10 (`run_tune`); several (each NAME[:PIPELINE])
    on the mean, over them, of valid HR@10 relative to the fixed config's own (`run_tune_across`)."""
    settings = [Setting.parse(d) for d in datasets]
    if len(settings) == 1:
        return run_tune(settings[0].options(fixed), tc, log)
    if len(set(settings)) != len(settings):
        raise TuneError("--dataset: a setting is given twice")
    return run_tune_across(fixed, settings, tc, log)


def run_tune_across(fixed: dict[str, Any], settings: list[Setting], tc: TuneConfig,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune one config for several settings at once (what a default must be). Each setting's fixed config (the
    defaults with the options given) is trained once first, one seed: its valid HR@10 is that setting's
    reference. A trial trains its config on every setting (one seed each) and scores the mean of valid HR@10 /
    the reference; the median pruner sees each setting's epochs in turn (step = setting x (epochs + 1) +
    epoch). The best config and the fixed one are then trained with `final_seeds` fresh seeds on every
    setting and reported per setting on valid and test, with the paired test (per user) of the two."""
    from optuna.trial import TrialState

    from iisan.train.config import resolve

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise IisanError("iisan tune runs in one process: launch it without torchrun")
    if tc.save_preset:
        raise TuneError("--save-preset saves one dataset's pipeline; a config tuned across settings is a set of "
                        "defaults: give them as options, or tune one --dataset to save a preset")
    bases = [resolve(st.options(fixed), log=log) for st in settings]
    methods = {b.method for b in bases}
    if len(methods) != 1:
        raise TuneError(f"--dataset: the settings resolve to different methods ({', '.join(sorted(methods))}); "
                        f"give --method")
    method = bases[0].method
    space = load_space(method, Path(tc.space) if tc.space else None)
    name = "+".join(st.label.replace(":", "-") for st in settings)
    folder = Path(fixed.get("out") or "runs") / "multi" / f"tune-{method}-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    identity = {"dataset": [st.label for st in settings], "method": method, "pipeline": [b.pipeline for b in bases],
                "fixed": {f"{st.label} {k}": v for st, b in zip(settings, bases) for k, v in b.to_dict().items()
                          if k not in space and k not in ("progress", "out")},
                "space": {k: p.to_dict() for k, p in space.items()}}
    study, requeued = open_study(folder, identity, tc, log)
    trials_out = folder / "trials"
    epochs = max(b.epochs for b in bases) + 1

    def reference(i: int, st: Setting) -> float:
        cfg = resolve({**st.options(fixed), "seeds": 1, "out": str(trials_out), "progress": False})
        return launch(RunSpec(cfg, reuse=True), log=lambda m: None).mean("HR@10", "valid")

    log(f"references: the fixed config on {len(settings)} settings, one seed each")
    references = [reference(i, st) for i, st in enumerate(settings)]
    for st, ref in zip(settings, references):
        log(f"  {st.label}: valid HR@10 {100 * ref:.2f}")
    if min(references) <= 0:
        raise TuneError("a setting's fixed config has valid HR@10 0: no relative score is defined")
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = max(tc.trials - done, 0)
    log(f"study {folder / 'study.db'}: {done} trial(s) done, {remaining} to run; tuning {', '.join(space)}")

    def objective(trial) -> float:
        params = {name: p.suggest(trial) for name, p in space.items()}
        relative = []
        for i, (st, ref) in enumerate(zip(settings, references)):
            cfg = resolve({**st.options(fixed), **params, "seeds": 1, "out": str(trials_out), "progress": False})
            result = trial_run(trial, cfg, lambda epoch, hr, i=i, ref=ref: (hr / ref, i * epochs + epoch), st.label)
            hr = result.mean("HR@10", "valid")
            trial.set_user_attr(f"valid {st.label}", hr)
            relative.append(hr / ref)
        return sum(relative) / len(relative)

    def progress(study, trial) -> None:
        value = (f"relative valid HR@10 {trial.value:.4f} (" + ", ".join(
            f"{st.label} {100 * trial.user_attrs[f'valid {st.label}']:.2f}" for st in settings) + ")"
                 if trial.value is not None else trial.state.name.lower())
        if trial.user_attrs.get("diverged"):
            value = "diverged (pruned)"
        log(f"trial {trial.number}: {value}; " + ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items()))

    best, _ = optimize(study, objective, progress, remaining, tc, folder)
    log(f"best trial {best.number}: relative valid HR@10 {best.value:.4f}; training it and the fixed config with "
        f"{tc.final_seeds} fresh seed(s) on every setting")
    final = []
    for st in settings:
        common = {"seeds": tc.final_seeds, "seed": bases[0].seed + 1000, "progress": False}
        tuned = launch(RunSpec(resolve({**st.options(fixed), **best.params, **common, "out": str(folder / "best")}),
                               reuse=True), log=log)
        fixed_run = launch(RunSpec(resolve({**st.options(fixed), **common, "out": str(folder / "fixed")}), reuse=True),
                           log=log)
        final.append({"setting": st.label, "tuned": _split_means(tuned), "fixed": _split_means(fixed_run),
                      "tuned_run": str(tuned.run_dir), "fixed_run": str(fixed_run.run_dir),
                      "paired": _paired(tuned, fixed_run)})
    summary = {"folder": str(folder), "settings": [st.label for st in settings], "references": references,
               "best_trial": best.number, "best_params": best.params, "best_relative_valid": best.value,
               "final": final, "space": identity["space"], "trials": len(study.trials),
               "trial_seconds": sum(_seconds(t) for t in study.trials if t.number not in requeued),
               "interrupted_trials": sorted(requeued)}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report = write_across_report(study, method, settings, space, summary, Path(tc.reports), tc.command)
    log(f"report: {report}")
    return summary


def _split_means(result: RunResult) -> dict[str, Any]:
    return {split: {m: {"mean": result.mean(m, split), "std": result.std(m, split)} for m in ("HR@10", "NDCG@10")}
            for split in ("valid", "test")}


def _paired(tuned: RunResult, fixed: RunResult) -> dict[str, Any]:
    """Per split, the paired bootstrap p-value (the study's `paired_test`) of HR@10 between the tuned and the
    fixed config's runs over users, each user's HR@10 averaged over the seeds."""
    import numpy as np

    from iisan.evaluate.report import per_user
    from iisan.experiments.study import paired_test

    out = {}
    for split in ("valid", "test"):
        tuned_hr, fixed_hr = (np.mean([per_user(ranks, "HR@10") for ranks in run.ranks(split) or []], axis=0)
                              for run in (tuned, fixed))
        out[split] = paired_test(fixed_hr, tuned_hr)
    return out


def write_across_report(study, method: str, settings: list[Setting], space: dict[str, Param],
                        summary: dict[str, Any], reports: Path, command: str = "") -> Path:
    """reports/tune-<method>-<settings>.md: the per-setting references, every trial's per-setting valid HR@10
    and relative score, and the best config against the fixed one on every setting (valid and test, fresh
    seeds, paired test)."""
    reports.mkdir(parents=True, exist_ok=True)
    stem = f"tune-{method}-" + "+".join(st.label.replace(":", "-") for st in settings)
    names = list(space)
    interrupted = set(summary.get("interrupted_trials") or [])
    lines = [f"# Tuning {method} across {len(settings)} settings", "",
             f"- command: `{command or 'iisan tune'}` (score: the mean over the settings of valid HR@10 relative to "
             f"the fixed config's, one seed per trial; trials selected on valid only)",
             *_run_lines(study, summary, interrupted),
             "- search space: " + "; ".join(f"{k} {p.to_dict()}" for k, p in space.items()),
             "- references (the fixed config, one seed): " + ", ".join(
                 f"{st.label} {100 * r:.2f}" for st, r in zip(settings, summary["references"])), "",
             f"## Best config (trial {summary['best_trial']}, relative valid {summary['best_relative_valid']:.4f}) "
             f"against the fixed one, {len(summary['final'])} settings, fresh seeds", "",
             ", ".join(f"{k}={_fmt(v)}" for k, v in summary["best_params"].items()), "",
             "| setting | valid fixed | valid tuned | p (valid) | test fixed | test tuned | p (test) |",
             "|---|---|---|---|---|---|---|"]

    def cell(m):
        return f"{100 * m['HR@10']['mean']:.2f} ± {100 * m['HR@10']['std']:.2f}"

    for row in summary["final"]:
        lines.append(f"| {row['setting']} | {cell(row['fixed']['valid'])} | {cell(row['tuned']['valid'])} | "
                     f"{row['paired']['valid']:.3g} | {cell(row['fixed']['test'])} | {cell(row['tuned']['test'])} "
                     f"| {row['paired']['test']:.3g} |")
    lines += ["", "## Trials", "", "| trial | state | relative | " + " | ".join(st.label for st in settings) + " | "
              + " | ".join(names) + " |", "|---" * (3 + len(settings) + len(names)) + "|"]
    for t in study.trials:
        state = ("diverged" if t.user_attrs.get("diverged") else "interrupted" if t.number in interrupted
                 else t.state.name.lower())
        per = [t.user_attrs.get(f"valid {st.label}") for st in settings]
        lines.append(f"| {t.number} | {state} | {'' if t.value is None else f'{t.value:.4f}'} | "
                     + " | ".join("" if v is None else f"{100 * v:.2f}" for v in per) + " | "
                     + " | ".join(_fmt(t.params.get(k, "")) for k in names) + " |")
    path = reports / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def open_study(folder: Path, identity: dict[str, Any], tc: TuneConfig, log: Callable[[str], None]):
    """The Optuna study in folder/study.db (created, or continued when its identity is this one; a study of
    something else is refused naming what differs), with its interrupted trials failed and enqueued again once;
    returns (study, the numbers of the trials requeued)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{folder / 'study.db'}"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5)
    study = optuna.create_study(study_name="iisan-tune", storage=storage, load_if_exists=True,
                                direction="maximize", pruner=pruner)
    # The sampler's seed moves on with the trials already run: a resumed study seeded as at its start would
    # draw its first trials' parameters again.
    study.sampler = optuna.samplers.TPESampler(seed=tc.sampler_seed + len(study.trials))
    known = study.user_attrs.get("identity")
    if known is None:
        study.set_user_attr("identity", identity)
    elif known != identity:
        differ = sorted(k for k in identity if known.get(k) != identity[k])
        detail = "; ".join(f"{k}: study has {known.get(k)!r}, this run has {identity[k]!r}"
                           for k in differ if k != "fixed")
        if "fixed" in differ:
            fixed_differ = sorted(k for k in set(known["fixed"]) | set(identity["fixed"])
                                  if known["fixed"].get(k) != identity["fixed"].get(k))
            detail = "; ".join(filter(None, [detail, "fixed options " + ", ".join(
                f"{k} ({known['fixed'].get(k)!r} → {identity['fixed'].get(k)!r})" for k in fixed_differ)]))
        raise TuneError(f"{folder / 'study.db'} is a study of something else ({detail}); use another --runs-dir, or "
                        f"delete that folder to start over")
    from optuna.trial import TrialState

    # A tuning killed mid-trial leaves it RUNNING (Ctrl-C leaves it FAIL): fail it and run its parameters
    # again, once; its training run resumes from the last checkpoint.
    requeued = set(study.user_attrs.get("requeued", []))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        if stale.number in requeued:
            continue
        if stale.state == TrialState.RUNNING:
            study.tell(stale.number, state=TrialState.FAIL)
        if stale.params:
            study.enqueue_trial(stale.params)
            log(f"trial {stale.number} was interrupted: enqueued again (its run resumes from the last checkpoint)")
        requeued.add(stale.number)
    study.set_user_attr("requeued", sorted(requeued))
    return study, requeued


def _run_lines(study, summary: dict[str, Any], interrupted: set[int]) -> list[str]:
    """A tuning report's date / commit line and its trials line (counts, time in trials)."""
    from optuna.trial import TrialState

    return [f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}",
            f"- trials: {len(study.trials)} ({sum(t.state == TrialState.COMPLETE for t in study.trials)} complete, "
            f"{sum(t.state == TrialState.PRUNED for t in study.trials)} pruned); time in trials "
            f"{summary['trial_seconds'] / 60:.1f} min" + (
                f" ({len(interrupted)} interrupted trial(s) not counted: their wall time spans the interruption, "
                f"and their runs resumed in the trial enqueued again for them)" if interrupted else "")]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def _seconds(trial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def preset_of(base, fixed: dict[str, Any]) -> dict[str, Any]:
    """What a saved pipeline holds besides the tuned values: the tuned pipeline's own entries (encoders, layer
    rules, presets), the method, and the training options held fixed on the command line (where and how to
    run aside), so that the pipeline trains exactly the tuned config."""
    values = dict((load_registry().get("pipelines") or {}).get(base.pipeline) or {})
    values["method"] = base.method
    values.update({k: v for k, v in fixed.items() if k not in NOT_PRESET})
    return values


NOT_PRESET = ("dataset", "pipeline", "method", "cache", "out", "device", "progress", "seed", "seeds")


def write_report(study, base, space: dict[str, Param], summary: dict[str, Any], reports: Path,
                 fixed: dict[str, Any], command: str = "") -> Path:
    """reports/tune-<dataset>-<method>-<pipeline>.md: the trials table, the best config's test figures, and a
    plot of valid HR@10 against trial."""
    reports.mkdir(parents=True, exist_ok=True)
    stem = f"tune-{dataset_name(base.dataset)}-{base.method}-{base.pipeline}"
    plot = _plot(study, reports / f"{stem}.png", stem)
    names = list(space)
    command = command or "iisan tune " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in fixed.items()
                                                  if k not in ("progress",))
    interrupted = set(summary.get("interrupted_trials") or [])
    lines = [f"# Tuning {base.method} on {dataset_name(base.dataset)} ({base.pipeline})", "",
             f"- command: `{command}` (trials selected on valid HR@10 only; median pruner on the per-epoch "
             f"valid HR@10 after 5 trials and 5 epochs)",
             *_run_lines(study, summary, interrupted),
             f"- search space: " + "; ".join(f"{k} {p.to_dict()}" for k, p in space.items()), "",
             "## Best config, retrained with fresh seeds", "",
             f"Trial {summary['best_trial']} (valid HR@10 {100 * summary['best_valid_hr10']:.2f}): "
             + ", ".join(f"{k}={_fmt(v)}" for k, v in summary["best_params"].items()), "",
             "| split | HR@10 | NDCG@10 | users |", "|---|---|---|---|"]
    for split in ("valid", "test"):
        m = summary[split]
        lines.append(f"| {split} | {100 * m['HR@10']['mean']:.2f} ± {100 * m['HR@10']['std']:.2f} | "
                     f"{100 * m['NDCG@10']['mean']:.2f} ± {100 * m['NDCG@10']['std']:.2f} | all |")
    for group, entry in ((summary.get("groups") or {}).get("test") or {}).items():
        if entry["HR@10"] is not None:
            lines.append(f"| test, {group} | {100 * entry['HR@10']['mean']:.2f} | {100 * entry['NDCG@10']['mean']:.2f} "
                         f"| {entry['users']} |")
    lines += ["", f"Run folder: `{summary['final_run']}`", "", "## Trials", "", f"![valid HR@10 per trial]({plot.name})",
              "", "| trial | state | valid HR@10 | epochs | seconds | " + " | ".join(names) + " |",
              "|---" * (5 + len(names)) + "|"]
    for t in study.trials:
        epochs = t.user_attrs.get("best_epoch", t.user_attrs.get("pruned_at_epoch", ""))
        state = ("diverged" if t.user_attrs.get("diverged") else "interrupted" if t.number in interrupted
                 else t.state.name.lower())
        value = f"{100 * t.value:.2f}" if t.value is not None else ""
        seconds = "" if t.number in interrupted else f"{_seconds(t):.0f}"
        lines.append(f"| {t.number} | {state} | {value} | {epochs} | {seconds} | "
                     + " | ".join(_fmt(t.params.get(k, "")) for k in names) + " |")
    path = reports / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot(study, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    complete = [(t.number, 100 * t.value) for t in study.trials if t.value is not None]
    pruned = [(t.number, 100 * max(t.intermediate_values.values())) for t in study.trials
              if t.value is None and t.intermediate_values]
    if complete:
        ax.scatter(*zip(*complete), label="complete", color="#4c72b0")
        best = [max(v for n, v in complete if n <= k) for k, _ in complete]
        ax.step([n for n, _ in complete], best, where="post", color="#c44e52", label="best so far")
    if pruned:
        ax.scatter(*zip(*pruned), label="pruned (best epoch seen)", color="#999999", marker="x")
    ax.set_xlabel("trial")
    ax.set_ylabel("valid HR@10 (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

