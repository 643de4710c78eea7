"""New items without retraining: when the items file grows, `iisan extract` on the same store appends rows for
the new ids only (old rows bit-identical, the extension recorded); a store whose items are not a prefix of the
dataset's is refused; a trained run then embeds and recommends the new items; an ID model says it cannot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from iisan.cli import main as iisan_cli

NEW = ["n001\tblue guitar amplifier", "n002\tred violin strings", "n003\tgreen drum kit",
       "n004\tsmall piano bench", "n005\tlarge cello case"]


def grow(data: Path, lines: list[str] = NEW) -> None:
    with open(data / "toy" / "items.tsv", "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def extract(cache: Path, fmt: str = "zarr", model: str = "tiny-bert") -> CliRunner:
    args = ["extract", "--model", model, "--dataset", "toy", "--out", str(cache), "--format", fmt, "--chunk-rows", "32"]
    return CliRunner().invoke(iisan_cli, args)


@pytest.fixture
def copy(env, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(env / "data" / "toy", data / "toy")
    monkeypatch.setenv("IISAN_DATA_DIR", str(data))
    return data


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_extraction_appends_the_new_items_only(env, copy, tmp_path, fmt):
    from iisan.cache_store import open_cache

    cache = tmp_path / "cache"
    first = extract(cache, fmt)
    assert first.exit_code == 0, first.output
    path = next((cache / "toy").iterdir())
    with open_cache(path) as store:
        before = store.backend.read_rows(0, store.manifest.rows)
        old_fingerprint = store.manifest.dataset_fingerprint
    grow(copy)
    second = extract(cache, fmt)
    assert second.exit_code == 0, second.output
    assert "extending the store from 120 to 125 items" in second.output
    with open_cache(path) as store:
        m = store.manifest
        after = store.backend.read_rows(0, m.rows)
        assert m.rows == 126 and m.complete and store.backend.read_item_ids()[-5:] == [l.split("\t")[0] for l in NEW]
        assert [e["from_rows"] for e in m.extensions] == [121] and m.extensions[0]["to_rows"] == 126
        assert m.extensions[0]["previous_fingerprint"] == old_fingerprint != m.dataset_fingerprint
    assert np.array_equal(after[:121], before)          # the old rows, bit for bit
    assert np.abs(after[121:]).sum() > 0                 # the new rows were encoded
    # the result equals a store extracted from scratch on the grown file (the same encoder, row by row)
    fresh = extract(tmp_path / "fresh", fmt)
    assert fresh.exit_code == 0, fresh.output
    with open_cache(next((tmp_path / "fresh" / "toy").iterdir())) as store:
        np.testing.assert_allclose(store.backend.read_rows(0, 126).astype(np.float32), after.astype(np.float32),
                                   atol=2e-3, rtol=0)
    again = extract(cache, fmt)
    assert again.exit_code == 0 and "extending" not in again.output


def test_a_store_whose_items_are_not_a_prefix_is_refused(env, copy, tmp_path):
    cache = tmp_path / "cache"
    assert extract(cache).exit_code == 0
    lines = (copy / "toy" / "items.tsv").read_text().splitlines()
    lines[3] = lines[3].split("\t")[0] + "\tan edited title"
    (copy / "toy" / "items.tsv").write_text("\n".join(lines + NEW) + "\n")
    result = extract(cache)
    assert result.exit_code != 0 and "written for something else" in result.output
    assert "dataset_fingerprint" in result.output


def test_a_trained_run_embeds_and_recommends_new_items(env, copy, tmp_path):
    from iisan.deploy.run import load_run

    cache = tmp_path / "cache"
    shutil.copytree(env / "cache" / "toy", cache / "toy")
    runs = {}
    for method in ("iisan", "sasrec-id"):
        train = CliRunner().invoke(iisan_cli, ["train", "--dataset", "toy", "--pipeline", "text-only", "--cache",
                                               str(cache), "--out", str(tmp_path / "runs"), "--epochs", "1",
                                               "--method", method, "--no-progress"])
        assert train.exit_code == 0, train.output
        runs[method] = Path(train.output.strip().splitlines()[-1])
    before = load_run(runs["iisan"])
    grow(copy)
    # not extended yet: the store's items are a prefix of the file's, so the run still loads and ranks them
    prefix = load_run(runs["iisan"])
    assert prefix.item_ids == before.item_ids and np.array_equal(prefix.table.numpy(), before.table.numpy())
    assert extract(cache).exit_code == 0
    after = load_run(runs["iisan"])
    assert after.item_ids == before.item_ids + [l.split("\t")[0] for l in NEW]
    assert np.array_equal(after.table[:121].numpy(), before.table.numpy())   # old embeddings unchanged
    ranked = CliRunner().invoke(iisan_cli, ["recommend", str(runs["iisan"]), "--history", "n001 i003", "--k", "123"])
    assert ranked.exit_code == 0, ranked.output
    ids = [i["id"] for i in json.loads(ranked.stdout)["items"]]
    assert {"n002", "n003", "n004", "n005"} <= set(ids) and "n001" not in ids
    refused = CliRunner().invoke(iisan_cli, ["recommend", str(runs["sasrec-id"]), "--history", "n001 i003"])
    assert refused.exit_code != 0 and "unknown item id(s) 'n001'" in refused.output
    assert "sasrec-id ranks only the items its training kept: it cannot embed others" in refused.output


def test_training_on_items_appended_after_the_store_says_to_extend_it(env, copy, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(env / "cache" / "toy", cache / "toy")
    grow(copy)
    users = (copy / "toy" / "users.tsv").read_text().splitlines()
    users[0] += " n001 n002"  # the new items now occur in a sequence: training needs their states
    (copy / "toy" / "users.tsv").write_text("\n".join(users) + "\n")
    result = CliRunner().invoke(iisan_cli, ["train", "--dataset", "toy", "--pipeline", "text-only", "--cache",
                                            str(cache), "--out", str(tmp_path / "runs"), "--epochs", "1"])
    assert result.exit_code != 0
    assert "were appended to" in result.output and "extend it: iisan extract --model tiny-bert --dataset toy" \
        in result.output


def test_the_dry_run_says_a_grown_file_would_extend_the_store(env, copy, tmp_path):
    cache = tmp_path / "cache"
    assert extract(cache).exit_code == 0
    grow(copy)
    result = CliRunner().invoke(iisan_cli, ["extract", "--model", "tiny-bert", "--dataset", "toy", "--out", str(cache),
                                            "--chunk-rows", "32", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "exists for the file's first 120 items: a run would extend it with the 5 appended ones" in result.output
