"""Pinned regression runs (torchtune's recipe tests): tiny fixed runs through the real CLI, one per kind of item
encoder, whose per-epoch losses and final metrics are written here. A change that moves any of them changes
what the product computes; such a change updates these numbers in its own commit and says why they moved.

Toy world (tests/conftest.py), 2 epochs, seed 7, CPU. History of the numbers:
- first pinned before the stage-2 redesign (issue 12), which then left them unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from iisan.cli import main as iisan_cli

RUNS = {
    "iisan": ["--method", "iisan"],
    "frozen": ["--method", "frozen"],
    "sasrec-id": ["--method", "sasrec-id"],
    "lora": ["--method", "lora", "--pipeline", "text-only", "--batch-size", "32"],
}

EXPECTED = {
    "iisan": {"loss": [5.734318, 5.756421], "valid": (0.08, 0.039965044), "test": (0.08, 0.037737232)},
    "frozen": {"loss": [5.734904, 5.756491], "valid": (0.106666667, 0.045562888), "test": (0.12, 0.049451687)},
    "sasrec-id": {"loss": [6.077323, 6.060317], "valid": (0.12, 0.053971779), "test": (0.12, 0.066003256)},
    "lora": {"loss": [5.441987, 5.396942], "valid": (0.1, 0.050519736), "test": (0.113333333, 0.057211696)},
}


def pinned_run(env: Path, out: Path, method: str) -> dict:
    args = ["train", "--dataset", "toy", "--cache", str(env / "cache"), "--out", str(out), "--epochs", "2",
            "--patience", "5", "--seed", "7", "--no-progress", *RUNS[method]]
    result = CliRunner().invoke(iisan_cli, args)
    assert result.exit_code == 0, result.output
    run_dir = Path(result.output.strip().splitlines()[-1])
    seed = run_dir / "seed-7"
    losses = [json.loads(line)["loss"] for line in (seed / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((seed / "report.json").read_text())
    return {"loss": losses, **{split: (report[split]["HR@10"], report[split]["NDCG@10"]) for split in ("valid", "test")}}


@pytest.mark.parametrize("method", list(RUNS))
def test_pinned_run(env, tmp_path, method):
    got = pinned_run(env, tmp_path, method)
    want = EXPECTED[method]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-6, rel=0), got
    for split in ("valid", "test"):
        assert got[split] == pytest.approx(want[split], abs=1e-6, rel=0), got
