"""`iisan export`: the files load without this package, and the exported user program with the exact FAISS
index gives `iisan recommend`'s top-k; HNSW is checked against exact; the standardisation statistics a run used
are saved with it and applied to every item."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from iisan.cli import main as iisan_cli

faiss = pytest.importorskip("faiss")

CLIENT = r"""
import json, sys
sys.modules["iisan"] = None            # the package must not be needed
import faiss, numpy as np, torch
from safetensors import safe_open

folder, rows = sys.argv[1], json.loads(sys.argv[2])
with safe_open(f"{folder}/items.safetensors", "pt") as f:
    ids = json.loads(f.metadata()["item_ids"])
program = torch.export.load(f"{folder}/user_encoder.pt2").module()
users = program(torch.tensor(rows, dtype=torch.long)).detach().numpy()
index = faiss.read_index(f"{folder}/items.flat.faiss")
scores, found = index.search(users, 10)
print(json.dumps({"ids": [[ids[j] for j in row] for row in found.tolist()], "scores": scores.tolist(),
                  "users": users.tolist()}))
"""


@pytest.mark.slow
def test_the_exported_files_reproduce_recommend_without_the_package(env, tmp_path):
    from iisan.deploy.run import load_run

    train = CliRunner().invoke(iisan_cli, ["train", "--dataset", "toy", "--cache", str(env / "cache"), "--out",
                                           str(tmp_path / "runs"), "--epochs", "2", "--no-progress"])
    assert train.exit_code == 0, train.output
    run_dir = Path(train.output.strip().splitlines()[-1])
    out = tmp_path / "export"
    result = CliRunner().invoke(iisan_cli, ["export", str(run_dir), "--out", str(out), "--faiss"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["items"] == 120 and meta["dim"] == 64 and meta["metric"] == "inner product"
    assert (out / "item_ids.txt").read_text().split() == load_run(run_dir).item_ids

    run = load_run(run_dir)
    users, windows, _ = run.dataset_requests(["u0", "u1", "u2", "u3", "u4"], "next")
    rows = (windows - 1).tolist()                      # universe index j is row j - 1; padding 0 -> -1
    client = subprocess.run([sys.executable, "-c", CLIENT, str(out), json.dumps(rows)], capture_output=True,
                            text=True, check=True)
    got = json.loads(client.stdout)
    torch.testing.assert_close(torch.tensor(got["users"]), run.user_vectors(windows), atol=1e-5, rtol=1e-5)
    want = run.rank(windows, [], k=10)                 # recommend with the history included, as the raw index
    for mine, theirs, scores in zip(want, got["ids"], got["scores"]):
        assert [r.score for r in mine] == pytest.approx(scores, abs=1e-4)
        distinct = [n for n in range(10) if all(abs(scores[n] - scores[m]) > 1e-4 for m in range(10) if m != n)]
        assert [mine[n].id for n in distinct] == [theirs[n] for n in distinct]  # ties aside

    hnsw = faiss.read_index(str(out / "items.hnsw.faiss"))
    flat = faiss.read_index(str(out / "items.flat.faiss"))
    queries = run.user_vectors(run.dataset_requests(None, "next")[1]).numpy()
    exact = flat.search(queries, 10)[1]
    approx = hnsw.search(queries, 10)[1]
    recall = sum(len(set(a) & set(b)) for a, b in zip(exact.tolist(), approx.tolist())) / exact.size
    assert recall > 0.95  # 120 items: HNSW is near exact


def test_standardisation_statistics_are_saved_and_applied_to_every_item(env, tmp_path):
    from safetensors.torch import load_file

    from iisan.deploy.run import load_run

    train = CliRunner().invoke(iisan_cli, ["train", "--dataset", "toy", "--pipeline", "text-only", "--cache",
                                           str(env / "cache"), "--out", str(tmp_path / "runs"), "--epochs", "1",
                                           "--standardize", "dim", "--no-progress"])
    assert train.exit_code == 0, train.output
    run_dir = Path(train.output.strip().splitlines()[-1])
    saved = load_file(str(run_dir / "standardization.safetensors"))
    assert set(saved) == {"text.mean", "text.std"}
    run = load_run(run_dir)
    assert torch.equal(saved["text.mean"], run.setup.slots["text"].statistics[0])
    table = run.model.item_table()
    for n, item in enumerate(run.split.item_ids[:10], 1):
        torch.testing.assert_close(run.table[run.index[item]], table[n], atol=1e-6, rtol=0)
    # the saved statistics, not the data's, standardise items: change them and the embeddings move
    saved["text.mean"] += 1.0
    from safetensors.torch import save_file

    save_file(saved, str(run_dir / "standardization.safetensors"))
    moved = load_run(run_dir)
    assert not torch.allclose(moved.table[1:], run.table[1:])
