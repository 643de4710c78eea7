"""The one run API and launcher: a RunSpec in, a RunResult out, in this process or a child, the same numbers
either way; reuse finds a run by its spec hash (and an older folder by its config); a child's failure comes
back typed, with its error's type and message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iisan.experiments.launch import LaunchFailed, call_in_child, launch
from iisan.train.config import resolve
from iisan.train.recipe import find_run
from iisan.train.result import RunResult, RunSpec, spec_hash

from conftest import options

REPO = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda message: None}


def same(a, b) -> bool:
    """Equal as JSON (a group without users has NaN intervals, which are not == themselves)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_a_child_run_equals_the_run_in_this_process_and_reuse_finds_it_by_its_spec_hash(env, tmp_path):
    cfg = resolve(options(env, tmp_path / "here", epochs=1))
    here = launch(RunSpec(cfg), threads=1, **QUIET)
    child = launch(RunSpec(resolve(options(env, tmp_path / "child", epochs=1))), isolate=True, threads=1, memory=True)
    assert child.seeds[0].test == here.seeds[0].test and child.seeds[0].valid == here.seeds[0].valid
    assert same(child.to_dict()["groups"], here.to_dict()["groups"])
    assert child.memory["RssAnon"] > 0 and child.memory["VmRSS"] >= child.memory["RssAnon"] and not here.memory
    # the folder's name ends with the spec's hash, which leaves out where the run lives (its runs root)
    assert here.run_dir.name.endswith("-" + spec_hash(cfg)) and child.run_dir.name.endswith("-" + spec_hash(cfg))
    # the typed result is report.json's content, read back the same
    assert same(RunResult.from_run_dir(here.run_dir).to_dict(), here.to_dict())
    assert here.mean("HR@10", "test") == here.to_dict()["test"]["HR@10"]["mean"]
    # reuse: the same spec is reported again from its folder, nothing new is made
    again = launch(RunSpec(cfg, reuse=True), **QUIET)
    assert again.run_dir == here.run_dir and again.seeds[0].test == here.seeds[0].test
    assert len(list((tmp_path / "here" / "toy").iterdir())) == 1
    assert find_run(resolve(options(env, tmp_path / "here", epochs=2))) is None  # another spec
    # a folder named before spec hashes existed is found by comparing its config (the upgrade path)
    legacy = here.run_dir.with_name(here.run_dir.name.rsplit("-", 1)[0])
    here.run_dir.rename(legacy)
    assert find_run(cfg) == legacy
    assert launch(RunSpec(cfg, reuse=True), **QUIET).run_dir == legacy


def test_a_failing_child_comes_back_typed_with_its_error_and_output(env, tmp_path):
    empty = tmp_path / "no-cache"
    empty.mkdir()
    cfg = resolve(options(env, tmp_path / "runs", epochs=1, cache=str(empty)))
    with pytest.raises(LaunchFailed) as failed:
        launch(RunSpec(cfg), isolate=True)
    here = pytest.raises(Exception, launch, RunSpec(cfg), **QUIET)
    assert failed.value.kind == type(here.value).__name__ and str(here.value) in str(failed.value)
    assert failed.value.tail  # the child's last lines


def test_call_in_child_samples_the_memory_of_its_process_and_stops_it_at_a_limit(tmp_path, monkeypatch):
    (tmp_path / "hold_memory.py").write_text(
        "import time\n\ndef hold(mib, seconds):\n    b = bytearray(mib * 2**20)\n    time.sleep(seconds)\n"
        "    return len(b) // 2**20\n")
    monkeypatch.chdir(tmp_path)  # `python -m` puts the working folder first on the child's path
    outcome = call_in_child("hold_memory:hold", {"mib": 300, "seconds": 1.0}, memory=True)
    assert outcome.value == 300 and outcome.memory["RssAnon"] >= 290
    assert outcome.memory["VmRSS"] >= outcome.memory["RssAnon"] and 0.0 <= outcome.others_cpu_share <= 1.0
    with pytest.raises(LaunchFailed, match="passed the limit 100 MiB: stopped") as stopped:
        call_in_child("hold_memory:hold", {"mib": 300, "seconds": 30.0}, limit_mib=100)
    assert stopped.value.stopped and stopped.value.memory["VmRSS"] > 100


def test_spec_round_trips_and_names_one_thing_to_run(env, tmp_path):
    from iisan.errors import IisanError

    cfg = resolve(options(env, tmp_path, epochs=1))
    assert RunSpec.from_dict(RunSpec(cfg, reuse=True).to_dict()) == RunSpec(cfg, reuse=True)
    assert RunSpec.from_dict(RunSpec(resume=tmp_path).to_dict()) == RunSpec(resume=tmp_path)
    with pytest.raises(IisanError, match="one of the two"):
        RunSpec(cfg, resume=tmp_path)
    # the hash leaves out where a run lives, and nothing else
    assert spec_hash(resolve(options(env, tmp_path / "x", epochs=1, progress=True))) == spec_hash(cfg)
    assert spec_hash(resolve(options(env, tmp_path, epochs=2))) != spec_hash(cfg)


def test_no_runner_starts_the_command_line_or_its_own_children():
    """experiments/ trains through `launch` only: no `iisan.cli` child, no multiprocessing of its own."""
    for path in sorted((REPO / "experiments").glob("*.py")):
        text = path.read_text()
        assert '"iisan.cli"' not in text and "import multiprocessing" not in text, path
        if path.name != "launch.py":
            assert "subprocess.Popen" not in text and "subprocess.run(" not in text, path
