"""`iisan recommend` and the trained run behind it, on the toy world: the test split reproduces the evaluation's
masked score rows, every cached item is ranked (also those the protocol dropped), ties go to the lower index,
and bad requests are named."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from iisan.cli import main as iisan_cli


def trained(env: Path, out: Path, *extra: str) -> Path:
    result = CliRunner().invoke(iisan_cli, ["train", "--dataset", "toy", "--cache", str(env / "cache"), "--out",
                                            str(out), "--epochs", "2", "--seed", "3", "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return Path(result.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IISAN_PIPELINES", str(world / "pipelines.yaml"))
        mp.setenv("IISAN_DATA_DIR", str(world / "data"))
        out = tmp_path_factory.mktemp("runs")
        yield {"iisan": trained(world, out, "--method", "iisan"),
               "hybrid": trained(world, out, "--method", "iisan-hybrid", "--pipeline", "text-only",
                                 "--id-init", "xavier"),
               "ids": trained(world, out, "--method", "sasrec-id", "--pipeline", "text-only")}


def reference_top(run, k: int) -> list[list[str]]:
    """The evaluation's masked test score rows (protocol items only), top-k by (-score, index)."""
    split = run.split
    table = run.model.item_table()
    users = run.model.user_vectors(torch.from_numpy(split.test_inputs), table)
    scores = users @ run.model.ranking_table(table).T   # (cosine runs: unit item rows, as evaluation ranks)
    scores[:, 0] = float("-inf")
    scores.scatter_(1, torch.from_numpy(split.test_history), float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return [[split.item_ids[j - 1] for j in row] for row in order.tolist()]


def test_user_vectors_hold_only_what_they_keep(env, runs):
    # the last position copied out: a view of it would keep the encoder's whole [U, L, d] output alive (at 200k
    # users, 10x the memory of the [U, d] kept; the scale bench's mmap peak)
    from iisan.deploy.run import load_run

    run = load_run(runs["iisan"])
    windows = torch.from_numpy(run.split.test_inputs)
    users = run.model.user_vectors(windows, run.model.item_table())
    assert users.shape == (len(windows), run.model.item_table().shape[1])
    assert users.untyped_storage().nbytes() == users.numel() * users.element_size()


@pytest.mark.parametrize("name", ["iisan", "hybrid", "ids"])
def test_the_test_split_reproduces_the_evaluations_score_rows(env, runs, name):
    from iisan.deploy.run import load_run

    run = load_run(runs[name])
    users, windows, exclude = run.dataset_requests(None, "test")
    assert users == list(run.split.user_ids)
    kept = {run.index[i] for i in run.split.item_ids}
    outside = [j for j in range(1, len(run.item_ids) + 1) if j not in kept]  # the items the protocol dropped
    got = run.rank(windows, [e + outside for e in exclude], k=10)
    assert [[r.id for r in row] for row in got] == reference_top(run, 10)


def test_every_cached_item_is_ranked_and_new_ones_reach_the_top(env, runs):
    from iisan.deploy.run import load_run

    run = load_run(runs["iisan"])
    assert len(run.item_ids) == 120 and run.split.n_items < 120  # i100..i119 occur in no sequence
    assert run.item_ids == list(run.dataset.items.ids)
    # a dropped item gets its content embedding: equal to the same tower on its states
    protocol = run.model.item_table()
    for item in run.split.item_ids[:5]:
        torch.testing.assert_close(run.table[run.index[item]], protocol[run.split.item_ids.index(item) + 1],
                                   atol=1e-6, rtol=0)
    scores = run.user_vectors(torch.tensor([run.window([run.index["i003"]])])) @ run.table.T
    dropped = [run.index[f"i{k}"] for k in range(100, 120)]
    best = max(dropped, key=lambda j: float(scores[0, j]))
    rank = int((scores[0, 1:] > scores[0, best]).sum()) + 1
    top = run.recommend([["i003"]], k=min(rank + 1, 119))[0]
    assert run.item_ids[best - 1] in [r.id for r in top] and "i003" not in [r.id for r in top]


def test_hybrid_items_outside_training_get_their_content_alone(env, runs):
    from iisan.deploy.run import load_run

    run = load_run(runs["hybrid"])
    items = run.model.items
    j = run.index["i110"]
    content = items.side({slot: x[j:j + 1] for slot, x in _universe_states(run).items()})[0]
    torch.testing.assert_close(run.table[j], content, atol=1e-6, rtol=0)
    seen = run.split.item_ids[0]
    assert not torch.allclose(run.table[run.index[seen]],
                              items.side({s: x[run.index[seen]:run.index[seen] + 1]
                                          for s, x in _universe_states(run).items()})[0])


def _universe_states(run):
    from iisan.train.data import load_slot, slot_sources

    return {slot: load_slot(run.cfg, run.dataset, run.split, slot, source, torch.device("cpu"),
                            item_ids=list(run.dataset.items.ids), statistics=run.setup.slots[slot].statistics
                            ).states.float() for slot, source in slot_sources(run.cfg).items()}


def test_ties_go_to_the_lower_index():
    from iisan.deploy.run import topk_by_index

    scores = torch.tensor([[0.0, 1.0, 3.0, 3.0, 2.0, 3.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert topk_by_index(scores, 2).tolist() == [[2, 3], [0, 1], [0, 1]]
    assert topk_by_index(scores, 4).tolist() == [[2, 3, 5, 4], [0, 1, 2, 3], [0, 1, 2, 3]]
    rng = torch.Generator().manual_seed(0)
    many = torch.randint(0, 4, (50, 30), generator=rng).float()
    want = torch.sort(many, dim=1, descending=True, stable=True).indices[:, :7]
    assert torch.equal(topk_by_index(many, 7), want)


def test_the_cli_writes_jsonl_and_csv(env, runs, tmp_path):
    run_dir = str(runs["iisan"])
    result = CliRunner().invoke(iisan_cli, ["recommend", run_dir, "--users", "u1,u7", "--k", "4"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["user"] for r in lines] == ["u1", "u7"] and all(len(r["items"]) == 4 for r in lines)
    first = lines[0]["items"]
    assert set(first[0]) == {"id", "title", "score"} and first[0]["score"] >= first[-1]["score"]
    history = (env / "data" / "toy" / "users.tsv").read_text().splitlines()[1].split("\t")[1].split()
    assert not set(history) & {i["id"] for i in first}  # u1's history is excluded
    kept = CliRunner().invoke(iisan_cli, ["recommend", run_dir, "--users", "u1", "--k", "119", "--include-history"])
    assert set(history) <= {i["id"] for i in json.loads(kept.stdout)["items"]}
    users = tmp_path / "users.txt"
    users.write_text("# two users\nu1\n\nu7\n")
    out = tmp_path / "recs.csv"
    as_csv = CliRunner().invoke(iisan_cli, ["recommend", run_dir, "--users", str(users), "--k", "4", "--format",
                                            "csv", "--out", str(out)])
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [(r["user"], r["rank"], r["id"]) for r in rows] == [
        (rec["user"], str(n), item["id"]) for rec in lines for n, item in enumerate(rec["items"], 1)]
    adhoc = CliRunner().invoke(iisan_cli, ["recommend", run_dir, "--history", "i001 i002 i110", "--k", "3"])
    record = json.loads(adhoc.stdout)
    assert record["user"] == "history" and not {"i001", "i002", "i110"} & {i["id"] for i in record["items"]}
    every = CliRunner().invoke(iisan_cli, ["recommend", run_dir])
    from iisan.deploy.run import load_run

    assert [json.loads(line)["user"] for line in every.stdout.splitlines()] == load_run(run_dir).split.user_ids


@pytest.mark.parametrize("args, message", [
    (["--users", "u1,nobody"], "unknown user id(s) 'nobody'"),
    (["--history", "i001 zzz"], "unknown item id(s) 'zzz'"),
    (["--k", "0"], "k 0: between 1 and the 120 ranked items"),
    (["--k", "121"], "k 121: between 1 and the 120 ranked items"),
    (["--history", " "], "a history needs at least one item id"),
])
def test_bad_requests_are_named(env, runs, args, message):
    result = CliRunner().invoke(iisan_cli, ["recommend", str(runs["iisan"]), *args])
    assert result.exit_code != 0 and message in result.output


def test_an_id_model_says_it_cannot_embed_items_it_never_trained(env, runs):
    result = CliRunner().invoke(iisan_cli, ["recommend", str(runs["ids"]), "--history", "i001 i110"])
    assert result.exit_code != 0
    assert "unknown item id(s) 'i110'" in result.output and "sasrec-id ranks only the items its training kept" \
        in result.output
