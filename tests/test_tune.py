"""`iisan tune`: a 3-trial study on the toy world that resumes after being killed, the saved preset, the
report, and the errors of a bad search space or a study of something else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from iisan.cli import main as iisan_cli

SPACE = "lr: {low: 1.0e-4, high: 1.0e-3, log: true}\nbottleneck: {choices: [8, 16]}\nlr_san: null\n" \
        "batch_size: null\ndropout: null\nlayers_text: null\n"


def tune_args(env: Path, out: Path, space: Path, trials: int = 3, *extra: str) -> list[str]:
    return ["tune", "--dataset", "toy", "--pipeline", "text-only", "--cache", str(env / "cache"), "--out", str(out),
            "--space", str(space), "--trials", str(trials), "--final-seeds", "1", "--reports", str(out / "reports"),
            *extra]


def study_trials(folder: Path):
    import optuna

    study = optuna.load_study(study_name="iisan-tune", storage=f"sqlite:///{folder / 'study.db'}")
    return study.trials


@pytest.mark.slow
def test_a_killed_tuning_resumes_and_finishes(env, tmp_path, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "runs"
    folder = out / "toy" / "tune-iisan-text-only"
    registry = tmp_path / "pipelines.yaml"
    shutil.copy(env / "pipelines.yaml", registry)
    monkeypatch.setenv("IISAN_PIPELINES", str(registry))
    # Long trials (8 epochs, no early stop) so that the kill lands inside the first one, after a checkpoint.
    args = tune_args(env, out, space, 3, "--epochs", "8", "--patience", "8")
    child = subprocess.Popen([sys.executable, "-m", "iisan.cli", *args], env={**os.environ},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    try:
        while not list((folder / "trials").rglob("last.pt")):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.time() < deadline, "the first trial never saved a checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    from optuna.trial import TrialState

    assert [t.state for t in study_trials(folder)] == [TrialState.RUNNING]
    interrupted = study_trials(folder)[0].params
    result = CliRunner().invoke(iisan_cli, args + ["--save-preset", "tuned-toy"])
    assert result.exit_code == 0, result.output
    assert "trial 0 was interrupted: enqueued again" in result.output
    assert "0 trial(s) done, 3 to run" in result.output
    trials = study_trials(folder)
    states = [t.state for t in trials]
    assert states[0] == TrialState.FAIL and trials[1].params == interrupted
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 3
    # The re-run trial continued the killed run's folder instead of starting over.
    resumed = Path(trials[1].user_attrs["run_dir"])
    assert len(list((folder / "trials" / "toy").glob("iisan-text-only-*"))) == len(trials) - 1
    epochs = [json.loads(l)["epoch"] for l in (resumed / "seed-12345" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 9))
    # The best trial, retrained with a fresh seed, reported on test with the warm / cold split.
    summary = json.loads((folder / "summary.json").read_text())
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert summary["best_trial"] == best.number and summary["best_params"] == best.params
    # the killed trial's wall time spans the interruption: not counted in the time in trials, marked in the table
    from iisan.experiments.tune import _seconds

    assert summary["interrupted_trials"] == [0]
    assert summary["trial_seconds"] == pytest.approx(sum(_seconds(t) for t in trials[1:]))
    report = (out / "reports" / "tune-toy-iisan-text-only.md").read_text()
    assert "(1 interrupted trial(s) not counted" in report and "\n| 0 | interrupted |  |  |  | " in report
    final = json.loads((Path(summary["final_run"]) / "report.json").read_text())
    assert [s["seed"] for s in final["seeds"]] == [13345]
    assert final["config"]["lr"] == best.params["lr"] and final["config"]["bottleneck"] == best.params["bottleneck"]
    report = (out / "reports" / "tune-toy-iisan-text-only.md").read_text()
    assert f"Trial {best.number} (valid HR@10 {100 * best.value:.2f})" in report
    assert report.count("\n| ") >= 2 + 1 + len(trials)  # figures table rows, trials header, one row per trial
    assert (out / "reports" / "tune-toy-iisan-text-only.png").stat().st_size > 0
    # The saved preset is a pipeline that trains the tuned config.
    from iisan.registry import load_registry
    from iisan.train.config import resolve

    preset = load_registry()["pipelines"]["tuned-toy"]
    # written to presets.yaml beside the registry, with its note; the registry's own file is left as it was
    from iisan.registry import preset_note, presets_path, registry_path

    assert presets_path().parent == registry_path().parent and "tuned-toy" not in registry_path().read_text()
    assert preset_note("tuned-toy").startswith("tuned by `iisan tune` on toy (")
    assert preset == {"text": "tiny-bert", "epochs": 8, "patience": 8, "method": "iisan", **best.params}
    cfg = resolve({"dataset": "toy", "pipeline": "tuned-toy"})
    assert (cfg.lr, cfg.bottleneck) == (best.params["lr"], best.params["bottleneck"])
    # Running the same command again only re-reports: nothing left to tune, the retrained run reused.
    again = CliRunner().invoke(iisan_cli, args)
    assert again.exit_code == 0 and "3 trial(s) done, 0 to run" in again.output
    assert len(study_trials(folder)) == len(trials)


def test_bad_search_spaces_and_foreign_studies(env, tmp_path):
    out = tmp_path / "runs"
    bad = tmp_path / "bad.yaml"
    runner = CliRunner()
    for text, message in [("lr: {low: 1.0e-3, high: 1.0e-4}\n", "bad.yaml:1: lr: empty range [0.001, 0.0001]"),
                          ("lr: {low: 0, high: 1.0e-3, log: true}\n", "(log needs low > 0)"),
                          ("learning_rate: {low: 1.0e-4, high: 1.0e-3}\n",
                           "bad.yaml:1: learning_rate: not a tunable option"),
                          ("lr: {min: 1.0e-4, max: 1.0e-3}\n",
                           "bad.yaml:1: lr.min: unknown key (known: low, high, log, choices)"),
                          ("lr: {low: a, high: 2}\n", "bad.yaml:1: lr.low: Input should be a valid number"),
                          ("\nbottleneck: {choices: []}\n", "bad.yaml:2: bottleneck: choices must be a non-empty list")]:
        bad.write_text(text)
        result = runner.invoke(iisan_cli, tune_args(env, out, bad, 1))
        assert result.exit_code == 2 and message in result.output, (text, result.output)
    # A study folder holding another method's study (copied, or --out reused) is refused.
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    first = runner.invoke(iisan_cli, tune_args(env, out, space, 1, "--epochs", "1", "--final-seeds", "1"))
    assert first.exit_code == 0, first.output
    other = out / "toy" / "tune-frozen-text-only"
    other.mkdir(parents=True)
    shutil.copy(out / "toy" / "tune-iisan-text-only" / "study.db", other / "study.db")
    space.write_text("lr: {low: 1.0e-4, high: 1.0e-3, log: true}\nbatch_size: null\ndropout: null\n")
    refused = runner.invoke(iisan_cli, ["tune", "--dataset", "toy", "--pipeline", "text-only", "--method", "frozen",
                                        "--cache", str(env / "cache"), "--out", str(out), "--space", str(space),
                                        "--trials", "1"])
    assert refused.exit_code == 2 and "is a study of something else (method: study has 'iisan', this run has " \
                                      "'frozen'" in refused.output, refused.output


def test_a_diverging_trial_is_pruned_not_fatal(env, tmp_path, monkeypatch):
    import optuna
    import torch

    from iisan.experiments.tune import TuneConfig, run_tune
    from iisan.train.model import Recommender

    monkeypatch.setattr(Recommender, "calculate_loss", lambda self, *args: torch.tensor(float("nan")))
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    with pytest.raises(Exception, match="no trial completed"):
        run_tune({"dataset": "toy", "pipeline": "text-only", "cache": str(env / "cache"), "out": str(tmp_path),
                  "epochs": 1}, TuneConfig(trials=2, space=str(space), reports=str(tmp_path)), log=lambda m: None)
    trials = study_trials(tmp_path / "toy" / "tune-iisan-text-only")
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all("loss is nan" in t.user_attrs["diverged"] for t in trials)


@pytest.mark.slow
def test_one_config_tuned_across_settings_scores_the_mean_relative_valid_hr(env, tmp_path):
    """Two settings (toy title only, toy title + image): each trial's score is the mean of its valid HR@10 over
    the fixed config's, per setting, as its runs report them; the best and the fixed config are then trained on
    both with a fresh seed and reported side by side."""
    from iisan.train.methods import IISAN_PRESETS

    out = tmp_path / "runs"
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    args = ["tune", "--dataset", "toy:text-only", "--dataset", "toy:text-image", "--cache", str(env / "cache"),
            "--out", str(out), "--space", str(space), "--trials", "2", "--final-seeds", "1", "--epochs", "1",
            "--reports", str(tmp_path / "reports")]
    result = CliRunner().invoke(iisan_cli, args)
    assert result.exit_code == 0, result.output
    folder = out / "multi" / "tune-iisan-toy-text-only+toy-text-image"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["settings"] == ["toy:text-only", "toy:text-image"]
    refs = {}
    for run in (folder / "trials" / "toy").iterdir():
        config = json.loads((run / "config.json").read_text())
        report = json.loads((run / "report.json").read_text())
        if config["lr"] == IISAN_PRESETS["lr"] and config["bottleneck"] == 64:  # the fixed config (no draw)
            refs[config["pipeline"]] = report["valid"]["HR@10"]["mean"]
    assert summary["references"] == [refs["text-only"], refs["text-image"]]
    for t in study_trials(folder):
        per = [t.user_attrs["valid toy:text-only"], t.user_attrs["valid toy:text-image"]]
        assert t.value == pytest.approx((per[0] / refs["text-only"] + per[1] / refs["text-image"]) / 2, abs=1e-12)
    assert [r["setting"] for r in summary["final"]] == ["toy:text-only", "toy:text-image"]
    report = (tmp_path / "reports" / "tune-iisan-toy-text-only+toy-text-image.md").read_text()
    assert "| toy:text-image |" in report and "relative" in report
    refused = CliRunner().invoke(iisan_cli, args + ["--save-preset", "x"])
    assert refused.exit_code == 2 and "a config tuned across settings is a set of defaults" in refused.output
    twice = CliRunner().invoke(iisan_cli, args[:5] + ["--dataset", "toy:text-only"] + args[5:])
    assert twice.exit_code == 2 and "a setting is given twice" in twice.output
