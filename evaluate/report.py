"""Report writing for training runs: the summary over seeds and the lines a run ends with."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np


BOOTSTRAP_SAMPLES = 2000


def bootstrap_interval(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95,
                       seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean of `values` (one per user), resampling users with a fixed
    seed; [nan, nan] without users."""
    if len(values) == 0:
        return [float("nan"), float("nan")]
    means = bootstrap_means(values, samples, seed)
    tail = (1 - level) / 2
    return [float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))]


# Resampled index entries held at once (int64 + the gathered float64: 64 MiB); 200k users x 2,000 samples
# in one array took 6 GB.
BOOTSTRAP_BLOCK = 2**22


def bootstrap_means(values: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """The means of `samples` resamples of `values` with replacement, drawn from one seeded generator in
    blocks of resamples (the same stream, so the same means, as one [samples, n] draw, in bounded memory)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    block = max(1, BOOTSTRAP_BLOCK // max(n, 1))
    return np.concatenate([values[rng.integers(0, n, size=(min(block, samples - a), n))].mean(axis=1)
                           for a in range(0, samples, block)])


def per_user(ranks: np.ndarray, metric: str) -> np.ndarray:
    """HR@K (1 or 0) or NDCG@K (1 / log2(rank + 1) within the top K) of each user."""
    k = int(metric.split("@")[1])
    hit = ranks <= k
    return hit.astype(np.float64) if metric.startswith("HR") else np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)


def summarize(reports: list[dict[str, Any]], ranks: list[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Mean and std over seeds of every valid / test metric, and (`groups`) of the warm and the cold users'.
    With each seed's per-user `ranks` (and `<split>_warm` masks), every group also gets a 95 % bootstrap
    interval over its users of the seed-mean HR@10 / NDCG@10 (`HR@10_ci95`, `NDCG@10_ci95`)."""
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    out: dict[str, Any] = {}
    for split in ("valid", "test"):
        out[split] = {k: stats([r[split][k] for r in reports]) for k in reports[0][split]}
    if all(r.get("groups") for r in reports):  # seeds finished before the split existed have none
        out["groups"] = {}
        for split in ("valid", "test"):
            out["groups"][split] = {}
            for group, first in reports[0]["groups"][split].items():
                entry: dict[str, Any] = {"users": first["users"]}
                for k in first:
                    if k != "users":
                        values = [r["groups"][split][group][k] for r in reports]
                        entry[k] = None if any(v is None for v in values) else stats(values)
                if ranks is not None:
                    mask = ranks[0][f"{split}_warm"] if group == "warm" else ~ranks[0][f"{split}_warm"]
                    for metric in ("HR@10", "NDCG@10"):
                        values = np.mean([per_user(r[split], metric) for r in ranks], axis=0)[mask]
                        entry[f"{metric}_ci95"] = bootstrap_interval(values)
                out["groups"][split][group] = entry
    return out


def group_line(group: str, split: str, metrics: dict[str, Any], users: int) -> str:
    """`<group> <split> HR@10 <x> NDCG@10 <y> (<n> users)`, percent (n/a where a group has no users).
    `metrics` values are floats, None, or {"mean": ...} summaries over seeds."""
    def percent(value: Any) -> str:
        value = value["mean"] if isinstance(value, dict) else value
        return "n/a" if value is None else f"{100 * value:.2f}"

    return f"{group} {split} HR@10 {percent(metrics['HR@10'])} NDCG@10 {percent(metrics['NDCG@10'])} ({users} users)"


def report_lines(reports: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    """Cost, the tie rule, the spread over seeds, the warm / cold test lines (users whose target occurs in
    training, and the others), and the two final lines `valid HR@10 <x> NDCG@10 <y>` and
    `test HR@10 <x> NDCG@10 <y>` (percent, means over seeds)."""
    first = reports[0]
    lines = [f"seconds per epoch {statistics.mean(r['seconds_per_epoch'] for r in reports):.2f}, "
             f"seconds per evaluation {statistics.mean(r['seconds_per_evaluation'] for r in reports):.2f}, "
             f"peak memory {max(r['peak_memory_mib'] for r in reports):.0f} MiB, "
             f"trainable parameters {first['trainable_parameters']:,}"]
    if "ties" in first:
        tied = {split: [r["ties"][f"{split}_tied"] for r in reports] for split in ("valid", "test")}
        lines.append(f"ties: {first['ties']['rule']} (a target ranks after every other unmasked item scoring "
                     + (">=" if first["ties"]["rule"] == "pessimistic" else ">")
                     + f" it); targets with a bit-identical tie: valid {max(tied['valid']):,}, "
                       f"test {max(tied['test']):,}" + (" (most over seeds)" if len(reports) > 1 else ""))
    if len(reports) > 1:
        for split in ("valid", "test"):
            hr, ndcg = summary[split]["HR@10"], summary[split]["NDCG@10"]
            lines.append(f"{split} over {len(reports)} seeds: HR@10 {100 * hr['mean']:.2f} ± {100 * hr['std']:.2f}, "
                         f"NDCG@10 {100 * ndcg['mean']:.2f} ± {100 * ndcg['std']:.2f}")
    if "groups" in summary:
        lines += [group_line(group, "test", entry, entry["users"])
                  for group, entry in summary["groups"]["test"].items()]
    for split in ("valid", "test"):
        hr, ndcg = summary[split]["HR@10"]["mean"], summary[split]["NDCG@10"]["mean"]
        lines.append(f"{split} HR@10 {100 * hr:.2f} NDCG@10 {100 * ndcg:.2f}")
    return lines
