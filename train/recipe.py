"""Stage 2 as one readable recipe (torchtune style): setup, train loop, evaluation, checkpoints, report.

Training's one entry is `run(RunSpec) -> RunResult` (train/result.py). A run folder
`runs/<dataset>/<method>-<pipeline>-<UTC time>-<spec hash>/` holds config.json, provenance.json, and per
seed: metrics.jsonl (one line per epoch), best.safetensors (the best-valid weights), last.pt (everything
needed to resume), report.json. `--resume RUN_DIR` continues each unfinished seed from its last checkpoint.
Everything that differs between methods comes from the method's registry entry (train/methods.py); the
step is train/step.py's, shared with the bench.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from iisan import __version__
from iisan.cache_store.reader import read_ahead
from iisan.data.dataset import Dataset, load_dataset
from iisan.data.protocol import ProtocolConfig, SplitData
from iisan.errors import IisanError
from iisan.evaluate.efficiency import peak_memory_mib
from iisan.evaluate.metrics import RankingResult, metrics_from_ranks, rank_targets
from iisan.evaluate.report import report_lines, summarize
from iisan.registry import dataset_name, load_registry
from iisan.runtime import code_hashes, git_commit, numeric_platform, pick_device
from iisan.train.config import TrainConfig, load_config, saved_version
from iisan.train.data import SlotStates, layer_rule, load_slot, slot_sources, train_batches
from iisan.train.distributed import World, collective_errors, join, leave
from iisan.train.result import LOCAL_FIELDS, RunResult, RunSpec, spec_hash
from iisan.train.methods import ItemSource, Method, method as method_entry
from iisan.train.model import Objective, Recommender
from iisan.train.san import SANConfig, Slot
from iisan.train.step import CatalogueColumns, NonFiniteLoss, TrainStep, lr_factor


@dataclass
class Setup:
    """What every seed of a run shares: the config, the data, the method and the cached states."""

    cfg: TrainConfig
    dataset: Dataset
    split: SplitData
    method: Method
    slots: dict[str, SlotStates]       # cached methods
    device: torch.device
    world: World = World()             # the training processes (train/distributed.py)


@dataclass
class ItemContext:
    """What a method's `build` gets to make its item encoder from."""

    setup: Setup

    @property
    def cfg(self) -> TrainConfig:
        return self.setup.cfg

    @property
    def split(self) -> SplitData:
        return self.setup.split

    def cached_states(self) -> dict[str, torch.Tensor]:
        return {slot: x.states for slot, x in self.setup.slots.items()}

    def san_config(self) -> SANConfig:
        cfg = self.cfg
        if self.setup.slots:  # cached: as each slot's states were read (the rule, else the cache's own)
            first = tuple(slot for slot, x in self.setup.slots.items() if x.init_from_first)
        else:
            first = tuple(slot for slot in slot_sources(cfg) if layer_rule(cfg, slot).strip() == "remove_first")
        return SANConfig(cfg.bottleneck, cfg.embedding_dim, cfg.fusion, cfg.intra, cfg.inter, init_from_first=first)

    def raw_slots(self):
        """The backbones loaded afresh and made trainable as the method says (end-to-end methods)."""
        from iisan.train.end_to_end import load_raw_slots

        s = self.setup
        return load_raw_slots(s.cfg, s.method, s.dataset, s.split, s.device)


def protocol_config(cfg: TrainConfig) -> ProtocolConfig:
    return ProtocolConfig(cfg.max_seq_len, cfg.min_seq_len, cfg.cold_items, cfg.cold_seed)


def join_world(cfg: TrainConfig) -> World:
    """The world of processes a launcher (torchrun) started this one in, joined (World() when alone)."""
    return join(pick_device(cfg.device))[0]


def setup(cfg: TrainConfig, world: World = World()) -> Setup:
    device = pick_device(cfg.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)  # one GPU per rank
    dataset = load_dataset(cfg.dataset)
    split = dataset.split(protocol_config(cfg))
    method = method_entry(cfg.method)
    slots = {}
    if world.distributed and method.items is ItemSource.END_TO_END:
        raise IisanError(f"method '{cfg.method}' trains its backbones end to end, which distributed training does not "
                         f"cover (their own dropout and unused weights would make the result depend on the process "
                         f"count); run it in one process, or train a cached method (iisan, iisan-hybrid, frozen) or "
                         f"sasrec-id on {world.size} processes")
    if world.distributed:
        # (where each rank keeps its caches and runs may differ: their contents are compared below)
        world.same_everywhere("config", {k: v for k, v in cfg.to_dict().items()
                                         if k not in ("progress", "cache", "out")})
    if method.items is ItemSource.CACHED:
        # rank 0 lays out an mmap copy first, the others then open it; a rank that cannot load stops them all
        slots = world.everywhere(lambda: {slot: load_slot(cfg, dataset, split, slot, source, device,
                                                          final=method.reads == "final")
                                          for slot, source in slot_sources(cfg).items()},
                                 main_first=cfg.cache_mode == "mmap")
    elif method.items is ItemSource.END_TO_END:
        from iisan.train.end_to_end import check_end_to_end

        check_end_to_end(cfg, method, dataset)
    if world.distributed:  # refused on every rank before training when a rank's data or caches differ
        world.same_everywhere("split", (split.n_users, split.n_items, split.n_interactions,
                                        _digest(split.train.tobytes())))
        for slot, x in slots.items():
            m = x.manifest
            world.same_everywhere(f"{slot} cache ({x.path})", (
                m.dataset_fingerprint, m.model, m.model_revision, m.model_weights_sha256, m.rows, m.storage_dtype,
                m.pooling, x.layers, x.standardized, tuple(x.states.shape),
                _digest(b"".join(t.numpy().tobytes() for t in x.statistics)) if x.statistics else ""))
    return Setup(cfg, dataset, split, method, slots, device, world)


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


def build_model(s: Setup) -> Recommender:
    """The method's item encoder (built now, under the caller's seed: an end-to-end method's backbones load
    afresh here, so every seed starts from the pretrained weights) and the user encoder."""
    cfg = s.cfg
    items = s.method.build(ItemContext(s))
    return Recommender(items, s.split.n_items, cfg.embedding_dim, cfg.heads, cfg.blocks, cfg.max_seq_len,
                       cfg.dropout, objective_of(cfg)).to(s.device)


def objective_of(cfg: TrainConfig) -> Objective:
    return Objective(cfg.loss, cfg.score, cfg.temperature, cfg.learn_temperature, cfg.softmax_chunk)


def optimizer_for(model: Recommender, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with the learning rates the item encoder's modules ask for (`lr_groups(cfg)`: SAN blocks, gates and
    DTLs at lr_san; text / image backbones at lr_backbone_text / lr_backbone_image) and lr for the rest (user
    encoder, heads, fusion, embeddings). Groups are formed by learning rate in parameter order. With
    --weight-decay, AdamW (decoupled decay) whose groups are also split by decay: weight matrices and embedding
    tables decay, vectors and scalars (biases, norms, gates, the temperature) do not."""
    lr_of: dict[int, float] = {}
    for params, lr in getattr(model.items, "lr_groups", lambda cfg: [])(cfg):
        lr_of.update({id(p): lr for p in params})
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            decay = cfg.weight_decay if p.dim() >= 2 else 0.0
            groups.setdefault((lr_of.get(id(p), cfg.lr), decay), []).append(p)
    if not cfg.weight_decay:
        return torch.optim.Adam([{"params": params, "lr": lr} for (lr, _), params in groups.items()],
                                betas=(0.9, 0.999), weight_decay=0.0)
    return torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": decay}
                              for (lr, decay), params in groups.items()], betas=(0.9, 0.999))


def scheduler_for(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                  ) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The learning-rate schedule per optimisation step (`lr_factor`: warm-up, then constant or cosine to 0 at
    the epoch cap); None when constant without warm-up (the optimiser as it is)."""
    if cfg.schedule == "constant" and not cfg.warmup_steps:
        return None
    total = cfg.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total, cfg.schedule))


def _frozen_backbone_weights(model: torch.nn.Module) -> set[str]:
    backbones = getattr(model.items, "backbones", None)
    if backbones is None:
        return set()
    return {f"items.backbones.{name}" for name, p in backbones.named_parameters() if not p.requires_grad}


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: every trainable parameter and the model's own weights, but not the frozen
    weights of a backbone (reloaded from its source; for a 70B backbone they would dwarf the run)."""
    frozen = _frozen_backbone_weights(model)
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def upgrade_checkpoint_keys(state: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Checkpoint keys of a version-1 run (slots `txt` / `img`, DTLs `map_txt` / `map_img`) in today's names."""
    second = Slot.TEXT2.value if cfg.text2 else Slot.IMAGE.value
    names = {"txt": Slot.TEXT.value, "img": second, "map_txt": "map_text", "map_img": "map_second"}
    return {".".join(names.get(part, part) for part in key.split(".")): value for key, value in state.items()}


def load_checkpoint_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = _frozen_backbone_weights(model)
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise IisanError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _chunk_spans(n: int, chunk: int, world: World) -> tuple[tuple[int, int], list[int]]:
    """This rank's rows [start, stop) of n when whole chunks of `chunk` rows are shared out (so that every
    chunk is computed exactly as one process computes it), and every rank's row count."""
    chunks = world.counts((n + chunk - 1) // chunk)
    ends = [min(n, chunk * sum(chunks[:r + 1])) for r in range(world.size)]
    rows = [end - (ends[r - 1] if r else 0) for r, end in enumerate(ends)]
    start = ends[world.rank - 1] if world.rank else 0
    return (start, ends[world.rank]), rows


def evaluate(model: Recommender, split: SplitData, which: str, cfg: TrainConfig, world: World = World()
             ) -> RankingResult:
    """Full-ranking evaluation of one split. Distributed, the item table's chunks and the users' scoring
    batches are shared out over the ranks (each computed as one process computes it) and the exact ranks
    gathered, so every rank gets one process's result."""
    model.eval()
    device = next(model.parameters()).device
    (a, b), rows = _chunk_spans(model.n_items + 1, getattr(model.items, "table_batch_size", 4096), world)
    table = world.gather_rows(model.item_table(a, b), rows)
    inputs = torch.from_numpy(split.valid_inputs if which == "valid" else split.test_inputs)
    targets = torch.from_numpy(split.valid_target if which == "valid" else split.test_target)
    history = torch.from_numpy(split.valid_history if which == "valid" else split.test_history)
    order = None
    if cfg.eval_item_tile is not None and cfg.eval_item_tile < len(table):
        # Tiled scoring first takes each target's score from its tile's product (rank_targets): with the users
        # in target order a batch's targets lie in one or two tiles, so that pass costs about one tile, not all.
        order = torch.argsort(targets, stable=True)
        inputs, targets, history = inputs[order], targets[order], history[order]
    (a, b), rows = _chunk_spans(len(inputs), cfg.eval_batch_size, world)
    mine = inputs[a:b].to(device)
    users = table.new_empty((len(mine), table.shape[1]))  # filled batch by batch (no list and its concatenation)
    for i in range(0, len(mine), cfg.eval_batch_size):
        users[i:i + cfg.eval_batch_size] = model.user_vectors(mine[i:i + cfg.eval_batch_size], table)
    result = rank_targets(users, model.ranking_table(table), targets[a:b], history[a:b], cfg.faithful,
                          cfg.eval_batch_size, ties=cfg.ties, item_tile=cfg.eval_item_tile)
    ranks, tied = result.ranks, result.tied
    if world.distributed:
        ranks = world.gather_rows(ranks.to(device), rows).cpu()  # (NCCL gathers device tensors)
        tied = int(world.sum(torch.tensor(tied, device=device)))
    if order is not None:  # back in the split's user order
        ranks = torch.empty_like(ranks).index_copy_(0, order, ranks)
    if world.distributed or order is not None:  # the metrics of every user, summed in the split's order
        result = RankingResult(ranks, metrics_from_ranks(ranks), result.ties, tied)
    result.warm = torch.from_numpy(split.warm_targets(which))
    return result


def run_config(run_dir: Path) -> TrainConfig:
    """A run folder's saved config (an error naming the folder when it is none)."""
    if not (Path(run_dir) / "config.json").is_file():
        raise IisanError(f"{run_dir}: not a run folder (no config.json)")
    return load_config(Path(run_dir) / "config.json")


def load_best(s: Setup, run_dir: Path, seed: int) -> Recommender:
    """The model of one seed of a run at its best-valid checkpoint, built under that seed, in eval mode."""
    best = Path(run_dir) / f"seed-{seed}" / "best.safetensors"
    if not best.is_file():
        raise IisanError(f"{best}: no checkpoint (the run has not finished an epoch)")
    torch.manual_seed(seed)
    model = build_model(s)
    load_checkpoint_state(model, _read_checkpoint(best, s.cfg, saved_version(Path(run_dir) / "config.json"),
                                                  s.device))
    return model.eval()


def evaluate_run(run_dir: Path, split: str = "test", ties: str | None = None) -> list[tuple[int, RankingResult]]:
    """Re-score a saved run's best checkpoint of every seed on `split` (valid | test), under the run's tie rule
    or `ties`."""
    cfg = run_config(run_dir)
    if ties is not None:
        cfg = dataclasses.replace(cfg, ties=ties)
    s = setup(cfg)
    return [(cfg.seed + i, evaluate(load_best(s, run_dir, cfg.seed + i), s.split, split, cfg))
            for i in range(cfg.seeds)]


def _read_checkpoint(path: Path, cfg: TrainConfig, version: int, device: torch.device) -> dict[str, torch.Tensor]:
    state = load_file(path, device=str(device))
    return upgrade_checkpoint_keys(state, cfg) if version < 2 else state


@dataclass
class LoopState:
    """Where a seed's training stands; saved in last.pt (as a dict) after every epoch."""

    epoch: int = 0
    best_hr: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    train_seconds: list[float] = dataclasses.field(default_factory=list)
    eval_seconds: list[float] = dataclasses.field(default_factory=list)


STANDARDIZATION_FILE = "standardization.safetensors"


def save_standardization(s: Setup, run_dir: Path) -> None:
    """The mean and std each standardised slot used (statistics of the training items), so that items embedded
    later (`iisan recommend`, new items) are standardised the same way: `<slot>.mean`, `<slot>.std`."""
    tensors = {f"{slot}.{name}": t.contiguous().cpu() for slot, x in s.slots.items() if x.statistics is not None
               for name, t in zip(("mean", "std"), x.statistics)}
    if tensors:
        save_file(tensors, str(run_dir / STANDARDIZATION_FILE))


def load_standardization(run_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    path = Path(run_dir) / STANDARDIZATION_FILE
    if not path.is_file():
        return {}
    state = load_file(str(path))
    return {key[:-5]: (state[key], state[key[:-5] + ".std"]) for key in state if key.endswith(".mean")}


def provenance(s: Setup) -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:
            return "not installed"

    return {"iisan_version": __version__, "commit": git_commit(), "python": sys.version.split()[0],
            "platform": platform.platform(), "device": str(s.device),
            # what `iisan study check` compares to tell a record made elsewhere or by other code from a moved result
            "numerics": numeric_platform(s.device), "code": code_hashes(),
            "packages": {p: version(p) for p in ("torch", "transformers", "zarr", "numpy", "safetensors")},
            "caches": {slot: {"path": str(x.path), "manifest": x.manifest.to_dict(), "layers_read": x.layers,
                              "standardized": x.standardized} for slot, x in s.slots.items()},
            "dataset": {"name": s.dataset.name, "folder": str(s.dataset.location.folder), "users": s.split.n_users,
                        "items": s.split.n_items, "interactions": s.split.n_interactions}}


def _truncate_metrics(path: Path, epochs: int) -> None:
    """Keep the per-epoch lines of the epochs the checkpoint holds: a kill between an epoch's line and its
    checkpoint would otherwise log that epoch twice after resuming."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["epoch"] <= epochs]
        if len(kept) != len(lines):
            path.write_text("".join(line + "\n" for line in kept))


def train_seed(s: Setup, seed: int, folder: Path, log, version: int = 2,
               on_epoch: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train one seed to early stopping (resuming from folder/last.pt if present); returns its report.
    `version`: the config version the run folder was written with (older checkpoints' keys are upgraded).
    `on_epoch(epoch, valid HR@10)` is called after each epoch's checkpoint is saved (a tuner's pruner may
    raise from it to stop the run there; the run folder then resumes like any interrupted one)."""
    cfg, split, device, world = s.cfg, s.split, s.device, s.world
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "report.json").exists():
        return json.loads((folder / "report.json").read_text())
    torch.manual_seed(seed)  # the same on every rank: the same model, and masks drawn per global sample
    generator = torch.Generator().manual_seed(seed)
    model = build_model(s)
    optimizer = optimizer_for(model, cfg)
    scheduler = scheduler_for(optimizer, cfg, -(-len(split.train) // cfg.batch_size))
    state = LoopState()
    if (folder / "last.pt").exists():  # written by a run at any process count: nothing in it is per rank
        checkpoint = torch.load(folder / "last.pt", map_location=device, weights_only=False)
        saved = checkpoint["model"]
        load_checkpoint_state(model, upgrade_checkpoint_keys(saved, cfg) if version < 2 else saved)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        state = LoopState(**checkpoint["state"])
        if world.main:
            _truncate_metrics(folder / "metrics.jsonl", state.epoch)
        torch.set_rng_state(checkpoint["rng"])
        generator.set_state(checkpoint["generator"])
        log(f"seed {seed}: resumed after epoch {state.epoch} (best valid HR@10 {100 * state.best_hr:.2f} "
            f"at epoch {state.best_epoch})")
    step = TrainStep.create(distributed_model(model, world, device), optimizer, split, device, world,
                            CatalogueColumns.of(split, cfg.loss, cfg.negatives, cfg.sampler), cfg.clip, scheduler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    latest = None  # (epoch, valid result) of this process's last epoch
    while state.epoch < cfg.epochs and state.bad_epochs < cfg.patience:
        epoch = state.epoch + 1
        model.train()
        start, total, steps = time.perf_counter(), 0.0, 0
        if cfg.cache_mode == "mmap":  # the mapped states' pages read ahead, where they fit (timed with the epoch)
            for x in s.slots.values():
                read_ahead(x.states)
        batches = list(train_batches(split, cfg.batch_size, generator))
        drawn = step.draw(len(batches), generator)  # the sampled loss's columns of each batch (else None)
        for k, ids in enumerate(tqdm(batches, desc=f"seed {seed} epoch {epoch}", unit="step", leave=False,
                                     disable=not (cfg.progress and world.main), file=sys.stderr)):
            try:
                total += step(ids, None if drawn is None else drawn[k])
            except NonFiniteLoss as e:
                raise e.at(epoch, steps + 1, seed) from None
            steps += 1
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        valid = evaluate(model, split, "valid", cfg, world)
        eval_seconds = time.perf_counter() - start
        latest = (epoch, valid)
        hr = valid.metrics["HR@10"]
        improved = hr > state.best_hr
        state.epoch = epoch
        state.train_seconds.append(train_seconds)
        state.eval_seconds.append(eval_seconds)
        if improved:
            state.best_hr, state.best_epoch, state.bad_epochs = hr, epoch, 0
        else:
            state.bad_epochs += 1
        if world.main:  # rank 0 writes; the ranks' models, optimizers and generators are the same
            if improved:
                save_file({k: v.contiguous() for k, v in checkpoint_state(model).items()},
                          folder / "best.safetensors")
            with open(folder / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch, "loss": total / max(steps, 1), "train_seconds": train_seconds,
                                    "eval_seconds": eval_seconds, "valid": valid.metrics, "best": improved}) + "\n")
            torch.save({"model": checkpoint_state(model), "optimizer": optimizer.state_dict(),
                        **({"scheduler": scheduler.state_dict()} if scheduler is not None else {}),
                        "state": dataclasses.asdict(state), "rng": torch.get_rng_state(),
                        "generator": generator.get_state()}, folder / "last.pt.tmp")
            (folder / "last.pt.tmp").replace(folder / "last.pt")
        log(f"seed {seed} epoch {epoch}: loss {total / max(steps, 1):.4f}, valid HR@10 {100 * hr:.2f} "
            f"NDCG@10 {100 * valid.metrics['NDCG@10']:.2f} ({train_seconds:.1f} s train, {eval_seconds:.1f} s eval)"
            + (" *" if improved else ""))
        if on_epoch is not None:
            on_epoch(epoch, hr)
    world.barrier()  # rank 0's best.safetensors is written
    best = load_file(folder / "best.safetensors", device=str(device))
    load_checkpoint_state(model, upgrade_checkpoint_keys(best, cfg) if version < 2 else best)
    # The best epoch's valid pass is the one just run when the best is the last epoch: the same weights, the
    # same result (the evaluation is deterministic), so it is not computed twice.
    valid = latest[1] if latest is not None and latest[0] == state.best_epoch else evaluate(model, split, "valid",
                                                                                            cfg, world)
    test = evaluate(model, split, "test", cfg, world)
    # Each user's rank and group, for intervals and paired comparisons over the users (the summary, studies).
    if world.main:
        np.savez_compressed(folder / "ranks.npz", valid=valid.ranks.numpy(), test=test.ranks.numpy(),
                            valid_warm=valid.warm.numpy(), test_warm=test.warm.numpy())
    report = {"seed": seed, "best_epoch": state.best_epoch, "epochs": state.epoch,
              # Whether early stopping ended the run or the epoch cap cut it while valid HR@10 could still rise.
              "stopped_by": "patience" if state.bad_epochs >= cfg.patience else "epoch cap",
              "seconds_per_epoch": statistics.mean(state.train_seconds),
              "seconds_per_evaluation": statistics.mean(state.eval_seconds),
              "peak_memory_mib": peak_memory_mib(device), "trainable_parameters": trainable_parameters(model),
              # CPU results depend on the thread count (float sums): that of the process that finished the seed
              "threads": torch.get_num_threads(),
              "processes": world.size,
              "valid": valid.metrics, "test": test.metrics,
              "groups": {"valid": valid.groups(), "test": test.groups()},
              "ties": {"rule": cfg.ties, "valid_tied": valid.tied, "test_tied": test.tied}}
    if world.main:
        (folder / "report.json").write_text(json.dumps(report, indent=2))
    world.barrier()
    return report


def distributed_model(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The model a step trains through: itself alone, else a DistributedDataParallel of it that neither
    broadcasts nor reduces the buffers (the cached states: the same on every rank, and possibly gigabytes)
    or the frozen backbone weights."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    fixed = [name for name, _ in model.named_buffers()] + \
        [name for name, p in model.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, fixed)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def run_label(cfg: TrainConfig) -> str:
    """<method>-<pipeline>, plus "-text-only" when the command line emptied the second slot of a pipeline that
    has one (`--image ""`), so that a folder's name never claims a tower its run did not train."""
    preset = (load_registry().get("pipelines") or {}).get(cfg.pipeline) or {}
    dropped = bool(preset.get("image") or preset.get("text2")) and not (cfg.image or cfg.text2)
    return f"{cfg.method}-{cfg.pipeline}" + ("-text-only" if dropped else "")


def run_dir_for(cfg: TrainConfig) -> Path:
    """A new, created run folder OUT/<dataset>/<label>-<UTC time>-<spec hash>; runs started in the same second
    (a tuner's short trials) get -2, -3, ... after the time."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.out) / dataset_name(cfg.dataset) / f"{run_label(cfg)}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    digest = spec_hash(cfg)
    for k in range(1, 1000):
        candidate = base.with_name(f"{base.name}{'' if k == 1 else f'-{k}'}-{digest}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise IisanError(f"{base}: too many runs started in the same second")


def find_run(cfg: TrainConfig, root: Path | None = None) -> Path | None:
    """The newest run folder under ROOT/<dataset>/ (ROOT: the config's OUT) of exactly this spec, finished or
    not; None if there is none. Found by the spec hash its name ends with; a folder named before spec hashes
    existed (or by a version whose config had other fields) is found by comparing its upgraded config, the
    upgrade path that keeps old runs and study records reusable."""
    root = Path(cfg.out) if root is None else root
    folder = root / dataset_name(cfg.dataset)
    for hit in sorted(folder.glob(f"{run_label(cfg)}-*-{spec_hash(cfg)}"), reverse=True):
        if (hit / "config.json").is_file():
            return hit
    return _matching_by_config(cfg, folder)


def _matching_by_config(cfg: TrainConfig, folder: Path) -> Path | None:
    from iisan.train.config import upgrade_config

    wanted = {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_FIELDS}
    for candidate in sorted(folder.glob(f"{run_label(cfg)}-*"), reverse=True):
        try:
            saved = upgrade_config(json.loads((candidate / "config.json").read_text()), str(candidate))
            saved = TrainConfig(**saved).to_dict()  # fields added since the run was written take their defaults
        except (OSError, ValueError, TypeError, IisanError):
            continue  # unreadable, or a run of an earlier version that this one cannot continue
        if {k: v for k, v in saved.items() if k not in LOCAL_FIELDS} == wanted:
            return candidate
    return None


def run(spec: RunSpec, log=print, on_epoch: Callable[[int, float], None] | None = None) -> RunResult:
    """Training's one entry: a spec in, a typed result out. `spec.reuse`: a run of the same spec is reported
    again (finished seeds) or continued (an unfinished one), what makes `--reuse`, bench --full, tune and study
    resumable. `on_epoch(epoch, valid HR@10)` after each epoch (train_seed)."""
    if spec.resume is not None:
        return train(resume=spec.resume, log=log, on_epoch=on_epoch)
    cfg = spec.config
    assert cfg is not None
    found = join_world(cfg).decide(lambda: find_run(cfg)) if spec.reuse else None
    if found is None:
        return train(cfg, log=log, on_epoch=on_epoch)
    return train(resume=found, log=log, on_epoch=on_epoch)


def train(cfg: TrainConfig | None = None, resume: Path | None = None, log=print,
          on_epoch: Callable[[int, float], None] | None = None) -> RunResult:
    """Train every seed of a run (a new one for `cfg`, or `resume` a run folder) and report. Under torchrun
    every rank calls this: rank 0 picks the folder and writes the files and the log, all ranks train
    (train/distributed.py); a run may be resumed at another process count."""
    if resume is not None:
        if not (resume / "config.json").is_file():
            raise IisanError(f"{resume}: not a run folder (no config.json)")
        cfg = load_config(resume / "config.json")
    assert cfg is not None
    world = join_world(cfg)
    if not world.main:
        log = lambda message: None  # noqa: E731 - rank 0 logs
    if resume is not None:
        version = saved_version(resume / "config.json")
        run_dir = resume
        log(f"resuming {run_dir}" + (f" on {world.size} processes" if world.distributed else ""))
    else:
        version = cfg.version

        def new_run() -> Path:
            folder = run_dir_for(cfg)
            (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            return folder

        run_dir = world.decide(new_run)
        # rank 0 wrote config.json there: every rank must see it (run folders on storage all ranks share)
        world.same_everywhere("view of the run folder (config.json present)", (run_dir / "config.json").is_file())
        if world.distributed:
            log(f"training on {world.size} processes ({'NCCL' if pick_device(cfg.device).type == 'cuda' else 'gloo'})"
                f", global batch {cfg.batch_size}")
    finished = False
    try:
        with collective_errors(world):
            result = _train_seeds(cfg, world, run_dir, version, log, on_epoch)
        finished = True
        return result
    finally:
        leave(world, finished)


def _train_seeds(cfg: TrainConfig, world: World, run_dir: Path, version: int, log,
                 on_epoch: Callable[[int, float], None] | None) -> RunResult:
    s = setup(cfg, world)
    if world.main:
        (run_dir / "provenance.json").write_text(json.dumps({**provenance(s), "processes": world.size}, indent=2,
                                                            default=str))
        save_standardization(s, run_dir)
    reports = [train_seed(s, cfg.seed + i, run_dir / f"seed-{cfg.seed + i}", log, version, on_epoch)
               for i in range(cfg.seeds)]
    ranks = [run_dir / f"seed-{cfg.seed + i}" / "ranks.npz" for i in range(cfg.seeds)]
    summary = summarize(reports, [dict(np.load(path)) for path in ranks] if all(p.is_file() for p in ranks) else None)
    if world.main:
        (run_dir / "report.json").write_text(json.dumps({"config": cfg.to_dict(), "seeds": reports, **summary},
                                                        indent=2))
    for line in report_lines(reports, summary):
        log(line)
    return RunResult.of({"config": cfg.to_dict(), "seeds": reports, **summary}, run_dir)
