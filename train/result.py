"""Training's one typed entry and exit: a `RunSpec` goes in (`recipe.run`, or `experiments.launch.launch` in
this process or a child), a `RunResult` comes out.

A run folder's `report.json` stays the record on disk (its shape is unchanged, so every run folder written
before these types still loads: `RunResult.from_run_dir`); these classes are how code reads it. Outside
`train/` no module indexes a result as a dict: it asks the result (`result.mean("HR@10", "test")`,
`result.group("test", "cold")`, `result.seconds_per_epoch`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iisan.errors import IisanError
from iisan.train.config import TrainConfig

# Fields that say where a run lives or how it is shown, not what it computes: left out of its spec hash, so a
# run is found again whatever its runs root, cache root or progress display (a study's record, another clone).
LOCAL_FIELDS = ("out", "cache", "progress")
SPLITS = ("valid", "test")


def spec_hash(cfg: TrainConfig) -> str:
    """16 hex digits of the sha256 of the resolved config (LOCAL_FIELDS aside), as canonical JSON: what a run
    folder's name ends with, and how reuse finds a run of the same spec without reading every config."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_FIELDS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """What to train: a resolved config (a new run, or with `reuse` the run of the same spec if one exists:
    finished seeds reported again, an unfinished one continued), or `resume`, a run folder to continue."""
    config: TrainConfig | None = None
    resume: Path | None = None
    reuse: bool = False

    def __post_init__(self) -> None:
        if (self.config is None) == (self.resume is None):
            raise IisanError("a run spec names a config or a run folder to resume, one of the two")

    def to_dict(self) -> dict[str, Any]:
        return {"config": None if self.config is None else self.config.to_dict(),
                "resume": None if self.resume is None else str(self.resume), "reuse": self.reuse}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSpec:
        return cls(config=None if raw.get("config") is None else TrainConfig(**raw["config"]),
                   resume=None if raw.get("resume") is None else Path(raw["resume"]), reuse=bool(raw.get("reuse")))


@dataclass(frozen=True)
class Stat:
    """A metric over seeds: mean and sample standard deviation (0 for one seed)."""
    mean: float
    std: float = 0.0

    @classmethod
    def of(cls, raw: Any) -> Stat:
        return cls(float(raw["mean"]), float(raw.get("std", 0.0))) if isinstance(raw, dict) else cls(float(raw))


@dataclass(frozen=True)
class Group:
    """One user group of a split (warm: the target occurs in training; cold: it does not): its users, each
    metric over seeds (None where the group has no users), and the 95 % bootstrap interval of HR@10 / NDCG@10
    over its users where the seeds' ranks were at hand."""
    users: int
    metrics: dict[str, Stat | None]
    ci95: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Group:
        metrics = {k: None if v is None else Stat.of(v) for k, v in raw.items()
                   if k != "users" and not k.endswith("_ci95")}
        return cls(int(raw["users"]), metrics, {k[: -len("_ci95")]: list(v) for k, v in raw.items()
                                                 if k.endswith("_ci95")})

    def mean(self, metric: str = "HR@10") -> float | None:
        value = self.metrics.get(metric)
        return None if value is None else value.mean


@dataclass(frozen=True)
class SeedResult:
    """One seed of a run: report.json of its seed folder."""
    seed: int
    best_epoch: int
    epochs: int
    seconds_per_epoch: float
    seconds_per_evaluation: float
    valid: dict[str, float]
    test: dict[str, float]
    raw: dict[str, Any]  # the whole report (groups, ties, stopped_by, peak memory, threads, processes, ...)

    @classmethod
    def of(cls, raw: dict[str, Any]) -> SeedResult:
        return cls(int(raw["seed"]), int(raw["best_epoch"]), int(raw["epochs"]), float(raw["seconds_per_epoch"]),
                   float(raw.get("seconds_per_evaluation", 0.0)), dict(raw["valid"]), dict(raw["test"]), dict(raw))

    @property
    def stopped_by(self) -> str | None:
        return self.raw.get("stopped_by")

    @property
    def trainable_parameters(self) -> int | None:
        return self.raw.get("trainable_parameters")

    @property
    def threads(self) -> int | None:
        return self.raw.get("threads")

    @property
    def peak_memory_mib(self) -> float | None:
        return self.raw.get("peak_memory_mib")

    def group(self, split: str, name: str) -> dict[str, Any] | None:
        return ((self.raw.get("groups") or {}).get(split) or {}).get(name)


@dataclass
class RunResult:
    """A finished run: its folder, config, seeds, the summary over seeds of every valid / test metric and of
    the warm / cold groups. `memory`: the peaks a launcher sampled from the process that trained it (MiB of
    RssAnon / VmRSS, largest process and sum; empty when not asked)."""
    run_dir: Path
    config: dict[str, Any]
    seeds: list[SeedResult]
    valid: dict[str, Stat]
    test: dict[str, Stat]
    groups: dict[str, dict[str, Group]]
    memory: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, report: dict[str, Any], run_dir: str | Path) -> RunResult:
        """From a report.json's content (or the dict `to_dict` gives)."""
        return cls(Path(run_dir), dict(report.get("config") or {}), [SeedResult.of(s) for s in report["seeds"]],
                   {k: Stat.of(v) for k, v in report["valid"].items()},
                   {k: Stat.of(v) for k, v in report["test"].items()},
                   {split: {name: Group.of(e) for name, e in by_group.items()}
                    for split, by_group in (report.get("groups") or {}).items()},
                   dict(report.get("memory") or {}))

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> RunResult:
        path = Path(run_dir) / "report.json"
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise IisanError(f"{path}: cannot read the run's report ({e}); is the run finished?") from None
        return cls.of(report, run_dir)

    def to_dict(self) -> dict[str, Any]:
        """report.json's shape, with `run_dir` (and `memory` where sampled)."""
        def stat(s: Stat | None) -> dict[str, float] | None:
            return None if s is None else {"mean": s.mean, "std": s.std}

        out: dict[str, Any] = {"run_dir": str(self.run_dir), "config": self.config,
                               "seeds": [s.raw for s in self.seeds],
                               "valid": {k: stat(v) for k, v in self.valid.items()},
                               "test": {k: stat(v) for k, v in self.test.items()}}
        if self.groups:
            out["groups"] = {split: {name: {"users": g.users, **{k: stat(v) for k, v in g.metrics.items()},
                                            **{f"{k}_ci95": v for k, v in g.ci95.items()}}
                                     for name, g in by_group.items()} for split, by_group in self.groups.items()}
        if self.memory:
            out["memory"] = self.memory
        return out

    def split(self, split: str) -> dict[str, Stat]:
        if split not in SPLITS:
            raise IisanError(f"unknown split '{split}': {', '.join(SPLITS)}")
        return self.valid if split == "valid" else self.test

    def mean(self, metric: str = "HR@10", split: str = "test") -> float:
        return self.split(split)[metric].mean

    def std(self, metric: str = "HR@10", split: str = "test") -> float:
        return self.split(split)[metric].std

    def means(self, split: str = "test") -> dict[str, float]:
        return {k: v.mean for k, v in self.split(split).items()}

    def group(self, split: str, name: str) -> Group | None:
        """The warm or cold group of a split (None for runs written before groups existed)."""
        return (self.groups.get(split) or {}).get(name)

    def groups_of(self, split: str) -> dict[str, Group]:
        return dict(self.groups.get(split) or {})

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([s.seconds_per_epoch for s in self.seeds]))

    @property
    def run_seconds(self) -> float:
        """Its seeds' epochs and valid passes, in whichever session ran them."""
        return float(sum(s.epochs * (s.seconds_per_epoch + s.seconds_per_evaluation) for s in self.seeds))

    @property
    def trainable_parameters(self) -> int | None:
        return self.seeds[0].trainable_parameters if self.seeds else None

    @property
    def threads(self) -> list[int] | None:
        return sorted({s.threads for s in self.seeds if s.threads is not None}) or None

    @property
    def capped(self) -> bool:
        """Whether the epoch cap, not early stopping, ended any seed."""
        return any(s.stopped_by == "epoch cap" for s in self.seeds)

    def ranks(self, split: str = "test") -> list[np.ndarray] | None:
        """Each seed's per-user ranks of a split (seed-*/ranks.npz), None where a seed has none."""
        files = [self.run_dir / f"seed-{s.seed}" / "ranks.npz" for s in self.seeds]
        if not files or not all(f.is_file() for f in files):
            return None
        return [np.load(f)[split] for f in files]
