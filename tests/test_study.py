"""`iisan study run` on the toy world: two rows, one epoch; rerunning reuses the runs; bad plans are refused
before anything runs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from iisan.cli import main as iisan_cli
from iisan.experiments.study import NothingToRun, StudyError, load_plan, paired_test
from iisan.extract.layers import select_layers

PLAN = """name: toy
seeds: 2
experiments:
  - name: methods
    reference: iisan
    rows:
      - {label: iisan, dataset: toy, method: iisan, pipeline: text-only, epochs: 1}
      - {label: no inter, dataset: toy, method: iisan, pipeline: text-only, epochs: 1, inter: false}
    plot: bars
claims:
  - {claim: the inter tower helps, experiment: methods, rows: [iisan, no inter], relation: above, paper: 6.83 vs 6.38}
"""


@pytest.mark.slow
def test_a_plan_runs_resumably_and_tests_rows_against_the_reference(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "toy.yaml"
    plan.write_text(PLAN)
    args = ["study", "run", "--plan", str(plan), "--out", str(tmp_path / "reports"), "--runs", str(tmp_path / "runs")]
    monkeypatch.setenv("IISAN_CACHE_DIR", str(env / "cache"))
    first = CliRunner().invoke(iisan_cli, args)
    assert first.exit_code == 0, first.output
    assert "[1/2] methods/iisan: test HR@10 " in first.output and "[2/2] methods/no inter" in first.output
    study = json.loads((tmp_path / "reports" / "study-toy.json").read_text())
    rows = study["experiments"][0]["rows"]
    assert [r["label"] for r in rows] == ["iisan", "no inter"] and all(r["status"] == "ok" for r in rows)
    assert rows[0]["seeds"] == 2 and "paired_p" not in rows[0] and 0 <= rows[1]["paired_p"]["HR@10"] <= 1
    report = json.loads((Path(rows[1]["run_dir"]) / "report.json").read_text())
    assert report["config"]["inter"] is False and rows[1]["test"]["HR@10"] == report["test"]["HR@10"]
    ranks = [np.load(Path(rows[0]["run_dir"]) / f"seed-{s}" / "ranks.npz")["test"] for s in (12345, 12346)]
    assert rows[0]["test"]["MRR"]["mean"] == pytest.approx(np.mean([np.mean(1 / r) for r in ranks]))
    claim = study["claims"][0]
    values = [rows[0]["test"]["HR@10"]["mean"], rows[1]["test"]["HR@10"]["mean"]]
    assert claim["values"] == values and claim["holds"] == (values[0] > values[1]) and 0 <= claim["p"] <= 1
    assert study["machine"]["threads"] >= 1 and study["machine"]["torch"]
    assert all(isinstance(r["threads"], list) and r["threads"][0] >= 1 for r in rows)  # per row, as each ran
    # the plan's cost: each row's seeds' epochs and valid passes, from its report, summed over the rows
    seconds = [sum(s["epochs"] * (s["seconds_per_epoch"] + s["seconds_per_evaluation"]) for s in
                   json.loads((Path(r["run_dir"]) / "report.json").read_text())["seeds"]) for r in rows]
    assert [r["run_seconds"] for r in rows] == pytest.approx(seconds)
    assert study["run_seconds"] == pytest.approx(sum(seconds)) and study["run_seconds"] > 0
    # the load of the machine while each row ran is measured and kept with the run (and so in the record)
    assert all(0 <= r["others_cpu_share"] <= 1.05 for r in rows)
    assert all(len(json.loads((Path(r["run_dir"]) / "study-load.json").read_text())) == 1 for r in rows)
    table = (tmp_path / "reports" / "study-toy.md").read_text()
    assert f"every session that ran them: {study['run_seconds'] / 3600:.1f} h" in table
    verdict = ("does not hold" if not claim["holds"] else "holds" if claim["p"] < 0.05 else
               "holds on the means, not significantly")
    assert (f"- **the inter tower helps** (methods): {verdict} — test HR@10 iisan {100 * values[0]:.2f} vs no inter "
            f"{100 * values[1]:.2f} ({100 * (values[0] - values[1]):+.2f}, paired p {claim['p']:.3f}); "
            f"paper: 6.83 vs 6.38") in table
    for png in ("study-toy-methods.png", "study-toy-cost.png"):
        assert (tmp_path / "reports" / png).stat().st_size > 1000 and f"]({png})" in table
    hr = rows[1]["test"]["HR@10"]
    p = rows[1]["paired_p"]["HR@10"]
    assert (f"| no inter | {100 * hr['mean']:.2f} ± {100 * hr['std']:.2f} | " in table
            and f" | {p:.3f}{'*' if p < 0.05 else ''} | " in table)
    # the README's table is generated from the JSON by `study render`, and rendering again changes nothing
    (tmp_path / "README.md").write_text("intro\n\n<!-- study-table reports/study-toy.json -->\nold\n"
                                        "<!-- end study-table -->\n\nclaims:\n<!-- study-claims reports/study-toy.json -->\n"
                                        "<!-- end study-claims -->\n\noutro\n")
    rendered = CliRunner().invoke(iisan_cli, ["study", "render", "reports/study-toy.json"])
    assert rendered.exit_code == 0, rendered.output
    assert rendered.output.count("README.md: the study blocks from reports/study-toy.json rewritten") == 1
    readme = (tmp_path / "README.md").read_text()
    warm = rows[1]["groups"]["test"]["warm"]
    assert readme.startswith("intro\n\n<!-- study-table reports/study-toy.json -->\n| setting | row |")
    assert readme.endswith("<!-- end study-claims -->\n\noutro\n") and "\nold\n" not in readme
    line = next(x for x in table.splitlines() if x.startswith("- **the inter tower helps**"))
    assert f"claims:\n<!-- study-claims reports/study-toy.json -->\n{line}\n<!-- end study-claims -->\n" in readme
    assert (f"| methods | no inter | {100 * hr['mean']:.2f} ± {100 * hr['std']:.2f} | " in readme
            and f"| {100 * warm['HR@10']['mean']:.2f} [{100 * warm['HR@10_ci95'][0]:.1f}, "
                f"{100 * warm['HR@10_ci95'][1]:.1f}] ({warm['users']:,}) |" in readme)
    assert "rewritten" not in CliRunner().invoke(iisan_cli, ["study", "render", "reports/study-toy.json"]).output
    assert (tmp_path / "README.md").read_text() == readme
    folders = sorted((tmp_path / "runs" / "toy").iterdir())
    again = CliRunner().invoke(iisan_cli, args)
    assert again.exit_code == 0, again.output
    assert sorted((tmp_path / "runs" / "toy").iterdir()) == folders  # reused, nothing trained again

    # `study check` re-runs the plan from scratch: identical on this CPU; a committed number that differs by more
    # than 0.3 points is reported as moved, and the check fails
    check = CliRunner().invoke(iisan_cli, ["study", "check", "reports/study-toy.json", "--runs", "check-1"])
    assert check.exit_code == 0, check.output
    assert "methods/iisan: identical" in check.output and "methods/no inter: identical" in check.output
    assert sorted((tmp_path / "check-1" / "toy").iterdir()) != folders and "check passed: 2 rows" in check.output
    study["experiments"][0]["rows"][1]["test"]["NDCG@10"]["mean"] += 0.004
    (tmp_path / "reports" / "study-toy.json").write_text(json.dumps(study))
    moved = CliRunner().invoke(iisan_cli, ["study", "check", "reports/study-toy.json", "--runs", "check-2"])
    assert moved.exit_code == 1 and "check FAILED" in moved.output
    assert "methods/no inter: MOVED at equal config, code and machine (" in moved.output
    # what the record says tells why a row differs: made on another CPU kind, a difference within 0.3 points passes
    # (past it: MOVED on another machine); made by another config, it is STALE and fails, naming the field
    record = Path(rows[1]["run_dir"])
    provenance = json.loads((record / "provenance.json").read_text())
    other_isa = "AVX2" if provenance["numerics"]["isa"] != "AVX2" else "AVX512"  # not this machine's
    (record / "provenance.json").write_text(json.dumps({**provenance, "numerics": {**provenance["numerics"],
                                                                                   "isa": other_isa}}))
    study["experiments"][0]["rows"][1]["test"]["NDCG@10"]["mean"] -= 0.002
    (tmp_path / "reports" / "study-toy.json").write_text(json.dumps(study))
    config = json.loads((Path(rows[0]["run_dir"]) / "config.json").read_text())
    (Path(rows[0]["run_dir"]) / "config.json").write_text(json.dumps({**config, "dropout": 0.3}))
    study["experiments"][0]["rows"][0]["test"]["HR@10"]["mean"] += 0.01
    (tmp_path / "reports" / "study-toy.json").write_text(json.dumps(study))
    told = CliRunner().invoke(iisan_cli, ["study", "check", "reports/study-toy.json", "--runs", "check-3"])
    assert told.exit_code == 1, told.output
    assert ("methods/no inter: within 0.3 points (" in told.output
            and f"another machine: isa '{other_isa}' -> " in told.output)
    assert ("methods/iisan: STALE (" in told.output and "config dropout 0.3 -> 0.1" in told.output
            and "regenerate the stale rows: `iisan study run --plan toy --fresh`" in told.output)
    assert "check FAILED: 2 rows (1 within, 1 stale)" in told.output
    # a record that read another dataset (e.g. images there, none here) is named as such
    provenance["caches"]["text"]["manifest"]["dataset_fingerprint"] = "sha256:" + "f" * 64
    (record / "provenance.json").write_text(json.dumps(provenance))
    other = CliRunner().invoke(iisan_cli, ["study", "check", "reports/study-toy.json", "--runs", "check-4"])
    assert (other.exit_code == 1 and "methods/no inter: OTHER DATA (" in other.output
            and "text dataset_fingerprint 'sha256:ffff" in other.output), other.output


def test_the_committed_readme_tables_are_those_of_their_json():
    from iisan.experiments.readme import update_readme

    root = Path(__file__).resolve().parent.parent
    assert "<!-- study-table reports/" in (root / "README.md").read_text()
    assert "<!-- study-table ../reports/" in (root / "docs" / "results.md").read_text()
    for readme in (root / "README.md", *sorted((root / "docs").glob("*.md"))):
        assert update_readme(readme, check=True) == [], f"run `iisan study render JSON` and commit {readme.name}"


@pytest.mark.parametrize("text, message", [
    ("a\n<!-- study-table reports/x.json -->\n| t |\n", "README.md:2: a '<!-- study-table PATH -->' marker without"),
    ("<!-- study-claims reports/x.json -->\n<!-- end study-table -->\n",
     "README.md:1: a '<!-- study-claims PATH -->' marker without its '<!-- end study-claims -->' line"),
    ("a\nb\n<!-- study-table reports/none.json -->\n<!-- end study-table -->\n",
     "README.md:3: the study table's JSON reports/none.json does not exist"),
])
def test_bad_readme_blocks_are_named(tmp_path, text, message):
    from iisan.experiments.readme import ReadmeError, update_readme

    (tmp_path / "README.md").write_text(text)
    with pytest.raises(ReadmeError, match=message.replace("|", r"\|")):
        update_readme(tmp_path / "README.md")
    assert (tmp_path / "README.md").read_text() == text


def test_timings_taken_under_contention_are_marked(tmp_path):
    from iisan.experiments.study import contended, note_load, others_share
    from iisan.runtime import others_cpu_share

    assert others_share(tmp_path) is None  # a run from before the load was recorded
    note_load(tmp_path, 100.0, others_cpu_share(100.0, busy=150.0, own=50.0))  # others: 100 of 100 s x the cores
    note_load(tmp_path, 300.0, others_cpu_share(300.0, busy=None, own=0.0))     # not measured: left out of the mean
    note_load(tmp_path, 300.0, others_cpu_share(300.0, busy=300.0, own=300.0))  # alone on the machine
    cores = os.cpu_count() or 1
    assert others_share(tmp_path) == pytest.approx((100 * (1 / cores) + 300 * 0.0) / 400)
    assert contended({"status": "ok", "others_cpu_share": 0.25}) == " †"
    assert contended({"status": "ok", "others_cpu_share": 0.05}) == "" == contended({"status": "ok"})


def test_paired_test():
    ref = np.zeros(200)
    assert paired_test(ref, ref) == 1.0
    better = np.r_[np.ones(60), np.zeros(140)]
    assert paired_test(ref, better) < 0.001
    noise = np.random.default_rng(0).integers(0, 2, 200).astype(float)
    assert paired_test(noise, np.roll(noise, 1)) > 0.05


@pytest.mark.parametrize("text, message", [
    ("experiments:\n  - name: x\n    rows:\n      - {dataset: toy, method: nope}\n", "toy.yaml:4: experiment 1 (x), row 1 (nope): unknown method 'nope'"),
    ("experiments:\n  - name: x\n    rows:\n      - {dataset: toy, epoch: 3}\n", "unknown option(s) epoch"),
    ("experiments:\n  - name: x\n    rows:\n      - {dataset: toy, pipeline: nope}\n", "unknown pipeline 'nope'"),
    ("experiments:\n  - name: x\n    rows:\n      - {dataset: toy, layers_text: 'top:x'}\n", "expected top:<block count>"),
    ("experiments:\n  - name: x\n    reference: y\n    rows:\n      - {dataset: toy}\n", "reference 'y' is none"),
    ("experiments:\n  - name: x\n    rows:\n      - {dataset: toy\n", "toy.yaml:5: not valid YAML"),
    ("experiments:\n  - name: x\n    plot: pie\n    rows:\n      - {dataset: toy}\n", "toy.yaml:3: experiments[0].plot: Input should be 'bars' or 'scaling'"),
    ("experiments:\n  - name: x\n    rows:\n      - {dataset: toy, seeds: 0}\n", "toy.yaml:4: experiments[0].rows[0].seeds: Input should be greater than or equal to 1"),
    ("threads: 0\nexperiments:\n  - name: x\n    rows:\n      - {dataset: toy}\n", "toy.yaml:1: threads: Input should be greater than or equal to 1"),
    ("thread: 2\nexperiments:\n  - name: x\n    rows:\n      - {dataset: toy}\n", "toy.yaml:1: thread: unknown key (known: name, seeds, threads, include, experiments, claims)"),
    ("experiments:\n  - name: x\n    rows:\n      - {dataset: toy}\nclaims:\n  - {claim: c, experiment: y, rows: "
     "[a, b], relation: above}\n", "claim 1 (c): no experiment 'y'"),
    ("experiments:\n  - name: x\n    rows:\n      - {dataset: toy}\nclaims:\n  - {claim: c, experiment: x, rows: "
     "[iisan, b], relation: above}\n", "claim 1 (c): row(s) b not in 'x'"),
    ("experiments:\n  - rows:\n      - {dataset: toy}\n", "toy.yaml:2: experiments[0].name: required, and missing"),
    ("name: a\n", "toy.yaml:1: experiments: required, and missing"),
    (b"experiments: []\n# \xff\n", "toy.yaml: not UTF-8 text"),
    ("experiments:\n  - name: x\n    rows:\n      - {dataset: toy}\nclaims:\n  - {claim: c, experiment: x, rows: "
     "[iisan, iisan], relation: beats}\n", "toy.yaml:6: claims[0].relation: Input should be 'above', 'matches' or 'increasing'"),
])
def test_bad_plans_are_refused_before_anything_runs(env, tmp_path, text, message):
    plan = tmp_path / "toy.yaml"
    plan.write_bytes(text) if isinstance(text, bytes) else plan.write_text(text)
    with pytest.raises(StudyError, match=re.escape(message)):
        load_plan(str(plan))


@pytest.fixture
def no_data_root(tmp_path, monkeypatch):
    """No dataset anywhere: the data roots are one empty folder (as on a fresh clone with no ../shared)."""
    import iisan.registry

    monkeypatch.setattr(iisan.registry, "data_roots", lambda: [tmp_path / "no-data"])


def test_the_shipped_plans_load(no_data_root):
    """Loading a plan needs no data: a row's pipeline and its encoders' layer rules come from the registry."""
    for path in sorted(Path(__file__).resolve().parent.parent.glob("plans/*.yaml")):
        rows = [row for _, row in load_plan(str(path)).rows()]
        assert rows and not [row.label for row in rows if row.pending], path
    scientific = [row for _, row in load_plan("methods").rows() if row.options["dataset"] == "scientific"]
    assert scientific[0].options == {"dataset": "scientific", "method": "iisan", "layers_text": "even"}
    plan = load_plan("quick")
    assert {row.options["dataset"] for _, row in plan.rows()} == {"ml-100k"} and plan.seeds == 1
    paper = load_plan("paper")
    parts = [load_plan(name) for name in ("methods", "ablations", "scaling", "layers", "multimodal-text")]
    assert [e.name for e in paper.experiments] == [e.name for p in parts for e in p.experiments]
    assert len(paper.claims) == sum(len(p.claims) for p in parts) > 0 and paper.seeds == 3
    end_to_end = [r for _, r in paper.rows() if r.options.get("method") in ("fft", "adapter", "lora", "bitfit",
                                                                             "iisan-uncached")]
    assert end_to_end and all(r.seeds == 1 for r in end_to_end)
    assert {r.options["dataset"] for r in end_to_end} == {"ml-100k"}


def test_includes_and_row_seeds(env, tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nseeds: 5\nexperiments:\n  - name: one\n    rows:\n"
                                     "      - {dataset: toy}\n      - {label: e2e, dataset: toy, method: fft, seeds: 1}\n"
                                     "claims:\n  - {claim: c, experiment: one, rows: [iisan, e2e], relation: matches}\n")
    (tmp_path / "b.yaml").write_text("name: b\nseeds: 2\ninclude: [a.yaml]\nexperiments:\n  - name: two\n"
                                     "    rows:\n      - {dataset: toy, method: frozen}\n")
    plan = load_plan(str(tmp_path / "b.yaml"))
    assert [e.name for e in plan.experiments] == ["one", "two"] and [c.claim for c in plan.claims] == ["c"]
    seeds = [r.args(plan.seeds, "runs")[r.args(plan.seeds, "runs").index("--seeds") + 1] for _, r in plan.rows()]
    assert seeds == ["2", "1", "2"]  # the including plan's seeds, except a row's own
    forced = load_plan(str(tmp_path / "b.yaml"), seeds=4)
    assert {r.args(forced.seeds, "runs")[4] for _, r in forced.rows()} == {"4"}  # --seeds wins over a row's own
    # a dataset that only the including plan has: the included plan holds nothing for it and is left out, by type
    (tmp_path / "d.yaml").write_text("name: d\ninclude: [a.yaml]\nexperiments:\n  - name: three\n    rows:\n"
                                     "      - {dataset: plain, method: frozen}\n")
    assert [e.name for e in load_plan(str(tmp_path / "d.yaml"), datasets=("plain",)).experiments] == ["three"]
    with pytest.raises(NothingToRun, match="no rows to run for elsewhere"):
        load_plan(str(tmp_path / "d.yaml"), datasets=("elsewhere",))
    (tmp_path / "c.yaml").write_text("include: [c.yaml]\nexperiments: []\n")
    with pytest.raises(StudyError, match="include 'c.yaml' includes itself"):
        load_plan(str(tmp_path / "c.yaml"))


def test_missing_layers_are_extracted_once_with_the_union_of_the_rows(env, tmp_path, monkeypatch):
    import shutil

    from iisan.cache_store import open_cache
    from iisan.experiments.study import ensure_caches

    cache = tmp_path / "cache"
    shutil.copytree(env / "cache" / "toy", cache / "toy")  # tiny-bert (3 blocks) kept with `even`: [0, 1, 3]
    monkeypatch.setenv("IISAN_CACHE_DIR", str(cache))
    plan = tmp_path / "layers.yaml"
    plan.write_text("experiments:\n  - name: layers\n    rows:\n"
                    "      - {label: even, dataset: toy, pipeline: text-only}\n"
                    "      - {label: top, dataset: toy, pipeline: text-only, layers_text: 'top:2'}\n"
                    "      - {label: ids, dataset: toy, method: sasrec-id, pipeline: text-only}\n")
    with open_cache(cache / "toy" / "tiny-bert.zarr") as store:
        assert store.manifest.layers == [0, 1, 3]
    messages = []
    assert [p.name for p in ensure_caches(load_plan(str(plan)), messages.append)] == ["tiny-bert.zarr"]
    with open_cache(cache / "toy" / "tiny-bert.zarr") as store:
        assert store.manifest.layers == [0, 1, 2, 3] and store.manifest.complete  # even ∪ top:2 = [0, 2, 3]
    assert any("hidden states 0,1,2,3 (the union its rows read)" in m for m in messages)
    assert ensure_caches(load_plan(str(plan)), messages.append) == []  # nothing left to extract
    # the store now holds the union: a row without a rule gets the encoder's default spelt out, so that it still
    # reads [0, 1, 3] (training without a rule reads every layer the store holds: no LayerDrop)
    rows = {row.label: row.options for _, row in load_plan(str(plan)).rows()}
    assert (rows["even"]["layers_text"], rows["top"]["layers_text"]) == ("even", "top:2")
    assert "layers_text" not in rows["ids"]  # reads no cached states
    assert select_layers(rows["even"]["layers_text"], 4) == [0, 1, 3]


@pytest.mark.slow
def test_a_row_whose_dataset_is_absent_fails_when_it_runs_naming_it(env, tmp_path, monkeypatch):
    """A row on a dataset no data root holds loads (its defaults wait for the folder where the registry does not
    give its pipeline) and fails when it is run, before anything trains, naming the dataset, its rows and how to
    get it; with the folder back, the same plan resolves and runs."""
    import iisan.registry
    from iisan.experiments.study import run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IISAN_CACHE_DIR", str(env / "cache"))
    (tmp_path / "absent.yaml").write_text("name: absent\nexperiments:\n  - name: one\n    rows:\n"
                                          "      - {label: a, dataset: toy, epochs: 1}\n"
                                          "      - {label: b, dataset: plain, method: sasrec-id, epochs: 1}\n")
    roots = iisan.registry.data_roots()
    monkeypatch.setattr(iisan.registry, "data_roots", lambda: [tmp_path / "no-data"])
    plan = load_plan("absent.yaml")
    a, b = [row for _, row in plan.rows()]
    assert "toy: dataset folder not found in any data root" in a.pending and "layers_text" not in a.options
    assert not b.pending  # `plain` names its pipeline in the registry
    with pytest.raises(StudyError, match=r"one/a: toy: dataset folder not found in any data root .*put a folder 'toy' "
                                         r"holding items.tsv and users.tsv.*; one/b: plain: dataset folder not found"):
        run_study(plan, tmp_path / "reports", str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()  # nothing ran
    monkeypatch.setattr(iisan.registry, "data_roots", lambda: roots)
    ran = json.loads(run_study(plan, tmp_path / "reports", str(tmp_path / "runs")).read_text())
    assert [r["status"] for r in ran["experiments"][0]["rows"]] == ["ok", "ok"]
    assert ran["experiments"][0]["rows"][0]["options"]["layers_text"] == "even"  # settled when it ran


def test_a_record_made_by_other_code_is_told_and_marked(tmp_path):
    """A run's origin (config, commit, result-code hashes, CPU kind, threads) read back from its files; the
    differences name what makes a record stale (config, code) and what says it ran elsewhere."""
    from iisan.experiments.study import code_changes, mark_made_by, other_data, run_origin, why_different
    from iisan.runtime import code_hashes, git_commit

    hashes = code_hashes()
    assert "iisan.train.recipe" in hashes and "iisan.evaluate.metrics" in hashes and len(hashes["iisan.train.loss"]) == 16
    assert not any(name.startswith(("iisan.experiments", "iisan.deploy")) for name in hashes)
    now = {"config": {"lr": 1e-3}, "commit": git_commit(), "code": hashes, "threads": [2],
           "numerics": {"cpu": "AuthenticAMD family 23 model 49", "isa": "AVX2", "torch": "2.13.0+cpu"}}
    assert why_different(now, now) == ([], [])
    old = {**now, "config": {"lr": 2e-4}, "code": {**hashes, "iisan.train.loss": "0" * 16}, "threads": [1],
           "numerics": {**now["numerics"], "isa": "AVX512"}}
    stale, elsewhere = why_different(old, now)
    assert stale == ["config lr 0.0002 -> 0.001", f"code changed since {now['commit'][:7]}: iisan.train.loss"]
    assert elsewhere == ["isa 'AVX512' -> 'AVX2'", "threads [1] -> [2]"]
    unknown = {**now, "code": None, "numerics": None, "commit": ""}
    assert why_different(unknown, now) == (["code not recorded (made at an unknown commit)"],
                                           ["the record's CPU kind was not recorded"])
    assert code_changes({"commit": now["commit"], "code": None}) == []  # the same commit, no hashes: unchanged
    assert run_origin(tmp_path / "none") == {"config": None, "commit": "", "code": None, "numerics": None,
                                             "threads": None, "data": None}
    seen = {"data": {"dataset": {"users": 943}, "image": {"dataset_fingerprint": "sha256:a", "layers_read": [0, 2]}}}
    assert other_data(seen, seen) == [] and other_data({"data": None}, seen) == []
    assert other_data(seen, {"data": {**seen["data"], "image": {"dataset_fingerprint": "sha256:b",
                                                                "layers_read": [0, 2]}}}) == [
        "image dataset_fingerprint 'sha256:a' -> 'sha256:b'"]
    row = {"status": "ok", "run_dir": str(tmp_path / "none"), "carried_from": now["commit"],
           "code_changed_since": ["stale from an earlier write"]}
    mark_made_by(row, {"code": hashes, "commit": now["commit"]})
    assert row["made_at"] == now["commit"] and "code_changed_since" not in row


def test_every_shipped_plan_is_installed_with_the_package():
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert sorted(listed["share/iisan-versa/plans"]) == sorted(f"plans/{p.name}" for p in (root / "plans").glob("*.yaml"))
    for plan in (root / "plans").glob("*.yaml"):
        load_plan(str(plan))  # every shipped plan is valid


RECORDED = """name: toy
seeds: 2
threads: 1
experiments:
  - name: methods
    reference: iisan
    rows:
      - {label: iisan, dataset: toy, method: iisan, pipeline: text-only, epochs: 2}
      - {label: no inter, dataset: toy, method: iisan, pipeline: text-only, epochs: 2, inter: false}
  - name: extra
    rows:
      - {label: frozen, dataset: toy, method: frozen, pipeline: text-only, epochs: 1, seeds: 1}
"""


@pytest.mark.slow
def test_the_record_resumes_a_study_on_a_fresh_clone(env, tmp_path, monkeypatch):
    """The study's record (reports/study-<plan>/) holds each run's small files; a later session with no runs
    reports finished rows from it without training, continues a partly recorded row from its finished seeds, and
    `--experiment` runs some rows while the others keep their previous results."""
    import shutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IISAN_CACHE_DIR", str(env / "cache"))
    (tmp_path / "toy.yaml").write_text(RECORDED)

    def study(runs: str, *extra: str):
        result = CliRunner().invoke(iisan_cli, ["study", "run", "--plan", "toy.yaml", "--runs", runs, *extra])
        assert result.exit_code == 0, result.output
        return result.output, json.loads(Path("reports/study-toy.json").read_text())

    output, first = study("runs-1")
    assert first["machine"]["threads"] == 1 and first["machine"]["pinned_threads"] is True
    rows = [r for e in first["experiments"] for r in e["rows"]]
    assert [r["threads"] for r in rows] == [[1], [1], [1]]  # every run at the plan's pinned count
    record = Path("reports/study-toy/toy")
    kept = sorted(str(p.relative_to(record)).split("/", 1)[1] for p in record.rglob("*") if p.is_file())
    per_seed = ["metrics.jsonl", "ranks.npz", "report.json"]
    assert kept == sorted(["config.json", "provenance.json", "report.json", "study-load.json"] * 3
                          + [f"seed-{s}/{f}" for s in (12345, 12346) for f in per_seed] * 2
                          + [f"seed-12345/{f}" for f in per_seed])  # no checkpoints
    assert all(Path(r["run_dir"]).parent == record for r in rows)

    # a fresh clone: no runs; the record is all there is, and nothing is trained
    output, second = study("runs-2")
    assert "3 row(s) reported from the record" in output and not Path("runs-2").exists()
    for a, b in zip(rows, [r for e in second["experiments"] for r in e["rows"]]):
        assert a["test"] == b["test"] and a.get("paired_p") == b.get("paired_p") and b["recorded"] is True
    assert second["claims"] == first["claims"]

    # a record cut short (the second seed of `no inter` unfinished): that row continues from its first seed
    partial = Path(rows[1]["run_dir"])
    (partial / "report.json").unlink()
    shutil.rmtree(partial / "seed-12346")
    output, third = study("runs-3")
    assert "2 row(s) reported from the record" in output and "[1/1] methods/no inter" in output
    resumed = Path("runs-3/toy") / partial.name
    assert not (resumed / "seed-12345" / "best.safetensors").exists()  # reused from the record, not trained
    assert (resumed / "seed-12346" / "best.safetensors").is_file()
    assert third["experiments"][0]["rows"][1]["test"] == rows[1]["test"]  # same threads: bit-identical
    assert (partial / "report.json").is_file() and (partial / "seed-12346" / "ranks.npz").is_file()  # recorded
    assert len(json.loads((partial / "study-load.json").read_text())) == 2  # the machine's load, both sessions

    # --finished-only trains nothing: a row whose run is unfinished is marked not run, its finished seeds recorded
    record_dir = Path(rows[0]["run_dir"])
    shutil.rmtree(record_dir)
    shutil.rmtree(Path("runs-1/toy") / record_dir.name / "seed-12346")
    (Path("runs-1/toy") / record_dir.name / "report.json").unlink()
    output, handed = study("runs-1", "--finished-only")
    first_row = handed["experiments"][0]["rows"][0]
    assert first_row["status"] == "not run" and first_row["log_tail"] == ["unfinished: 1 of 2 seed(s) done (in the record)"]
    assert sorted(p.name for p in record_dir.iterdir()) == ["config.json", "provenance.json", "seed-12345", "study-load.json"]
    assert handed["experiments"][0]["rows"][1]["test"] == rows[1]["test"]  # finished: reported
    output, resumed_again = study("runs-5")  # a later session: restored from the record, seed 12346 trained
    assert resumed_again["experiments"][0]["rows"][0]["test"] == rows[0]["test"]

    # --experiment: only `extra` runs (fresh: its record is gone); `methods` keeps the previous results
    shutil.rmtree(record / Path(rows[2]["run_dir"]).name)
    output, fourth = study("runs-4", "--experiment", "extra")
    methods, extra = fourth["experiments"]
    assert all(r["carried_from"] == third["commit"] for r in methods["rows"])
    assert [r["test"] for r in methods["rows"]] == [r["test"] for r in rows[:2]]
    assert extra["rows"][0]["test"] == rows[2]["test"] and "carried_from" not in extra["rows"][0]
    assert "(carried from " in Path("reports/study-toy.md").read_text()
    bad = CliRunner().invoke(iisan_cli, ["study", "run", "--plan", "toy.yaml", "--experiment", "nope"])
    assert bad.exit_code == 2 and "no experiment 'nope' (experiments: methods, extra)" in bad.output


def test_an_increasing_claim_gives_each_steps_paired_p_and_the_valid_values(tmp_path):
    """A ladder claim names, for each step, the paired p-value of that step (not against the reference), and the
    rows' valid HR@10: a reversal on test within noise is told apart from a real one."""
    from iisan.evaluate.report import per_user
    from iisan.experiments.study import Claim, Plan, claim_line, evaluate_claims

    rng = np.random.default_rng(0)
    results, ranks = {}, {}
    for label, (hr, valid) in {"small": (0.10, 0.12), "base": (0.12, 0.13), "large": (0.11, 0.14)}.items():
        run = tmp_path / label
        ranks[label] = []
        for seed in (1, 2):
            (run / f"seed-{seed}").mkdir(parents=True)
            r = rng.integers(1, 40, size=300)
            np.savez(run / f"seed-{seed}" / "ranks.npz", test=r)
            ranks[label].append(r)
        results[("ladder", label)] = {"status": "ok", "run_dir": str(run), "test": {"HR@10": {"mean": hr}},
                                      "valid": {"HR@10": {"mean": valid}}}
    plan = Plan("t", tmp_path / "t.yaml", 2, claims=[Claim("bigger is better", "ladder", ["small", "base", "large"],
                                                           "increasing")])
    [claim] = evaluate_claims(plan, results)
    mean = lambda label: np.mean([per_user(r, "HR@10") for r in ranks[label]], axis=0)  # noqa: E731
    assert claim["holds"] is False and claim["p"] is None
    assert claim["steps_p"] == [paired_test(mean("small"), mean("base")), paired_test(mean("base"), mean("large"))]
    assert claim["valid_values"] == [0.12, 0.13, 0.14]
    p1, p2 = claim["steps_p"]
    assert claim_line(claim) == (f"- **bigger is better** (ladder): does not hold — test HR@10 small 10.00, base 12.00 "
                                 f"(p {p1:.3f}), large 11.00 (p {p2:.3f}); valid HR@10 12.00, 13.00, 14.00")


def test_a_built_in_dataset_no_data_root_holds_is_fetched_before_anything_runs(tmp_path, monkeypatch, recbole_wheel):
    import iisan.registry
    from iisan.experiments.study import ensure_datasets

    monkeypatch.chdir(tmp_path)  # the fetcher's default destination is ./data/NAME
    monkeypatch.setattr(iisan.registry, "data_roots", lambda: [tmp_path / "data"])
    monkeypatch.setenv("IISAN_RECBOLE_WHEEL", str(recbole_wheel))
    plan = tmp_path / "p.yaml"
    plan.write_text("experiments:\n  - name: e\n    rows:\n"
                    "      - {label: a, dataset: ml-100k, method: sasrec-id, pipeline: text-only}\n"
                    "      - {label: b, dataset: ml-100k, pipeline: text-only}\n"
                    "      - {label: c, dataset: toy, pipeline: text-only}\n")  # toy has no fetcher: left alone
    rows, messages = list(load_plan(str(plan)).rows()), []
    assert ensure_datasets(rows, messages.append) == [Path("data") / "ml-100k"]  # once for the two rows
    assert messages == ["fetching ml-100k: no data root holds it (`iisan data fetch ml-100k`)"]
    assert len((tmp_path / "data" / "ml-100k" / "users.tsv").read_text().splitlines()) == 943
    assert ensure_datasets(rows, messages.append) == [] and len(messages) == 1  # found now: nothing fetched


GOLDEN = Path(__file__).parent / "golden"


def test_the_study_report_renders_its_json_exactly_as_the_golden_file(tmp_path):
    """Rendering is tested once, whole: a frozen study JSON (a copy of a real record) against the markdown it
    gives. A deliberate change of the rendering regenerates tests/golden/study-quick.md with
    `python -c "from pathlib import Path; from iisan.experiments.study import render;
    render(Path('tests/golden/study-quick.json'))"` and says why in its commit; other tests assert on the JSON."""
    import shutil

    from iisan.experiments.study import render

    shutil.copy(GOLDEN / "study-quick.json", tmp_path / "study-quick.json")
    rendered = render(tmp_path / "study-quick.json").read_text()
    assert rendered == (GOLDEN / "study-quick.md").read_text()
    assert (tmp_path / "study-quick-cost.png").read_bytes()[:4] == b"\x89PNG"
