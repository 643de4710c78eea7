"""Stage 2 as one readable recipe (torchtune style): setup, train loop, evaluation, checkpoints, report.

A run folder `runs/<dataset>/<method>-<pipeline>-<UTC time>/` holds config.json, provenance.json, and per
seed: metrics.jsonl (one line per epoch), best.safetensors (the best-valid weights), last.pt (everything
needed to resume), report.json. `--resume RUN_DIR` continues each unfinished seed from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from iisan import __version__
from iisan.data.dataset import Dataset, load_dataset
from iisan.data.protocol import ProtocolConfig, SplitData
from iisan.errors import IisanError
from iisan.evaluate.metrics import RankingResult, rank_targets
from iisan.registry import load_registry
from iisan.train.config import TrainConfig, load_config
from iisan.train.data import SlotStates, load_slot, slot_sources, train_batches
from iisan.train.embedded import EmbeddedItems, RawSlot, UncachedIISANItems, check_raw_slot
from iisan.train.methods import method as method_entry
from iisan.train.model import FrozenItems, IDItems, IISANItems, Recommender
from iisan.train.san import SANConfig


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(s: "Setup") -> Recommender:
    cfg, split = s.cfg, s.split
    kind = method_entry(cfg.method).items
    if cfg.method == "iisan":
        items = IISANItems({slot: x.states for slot, x in s.slots.items()}, san_config(cfg))
    elif cfg.method == "frozen":
        items = FrozenItems({slot: x.states for slot, x in s.slots.items()}, cfg.embedding_dim)
    elif cfg.method == "iisan-uncached":
        items = UncachedIISANItems(s.raw, san_config(cfg))
    elif kind == "backbone":
        items = EmbeddedItems(s.raw, cfg.embedding_dim)
    else:
        items = IDItems(split.n_items, cfg.embedding_dim)
    return Recommender(items, split.n_items, cfg.embedding_dim, cfg.heads, cfg.blocks, cfg.max_seq_len, cfg.dropout)


def san_config(cfg: TrainConfig) -> SANConfig:
    return SANConfig(cfg.bottleneck, cfg.embedding_dim, cfg.fusion, cfg.intra, cfg.inter)


def optimizer_for(model: Recommender, cfg: TrainConfig) -> torch.optim.Adam:
    """SPEC §7 / §8 learning rates: the side network's SAN blocks, gates and DTLs at lr_san; the trainable
    part of a text backbone at lr_backbone_text, of an image backbone at lr_backbone_image; the rest (user
    encoder, heads, fusion, embeddings) at lr."""
    image_slot_is_text = bool(cfg.text2)
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("items.side.intra.") or name.startswith("items.side.inter."):
            lr = cfg.lr_san
        elif name.startswith("items.backbones.txt.") or (image_slot_is_text and name.startswith("items.backbones.img.")):
            lr = cfg.lr_backbone_text
        elif name.startswith("items.backbones.img."):
            lr = cfg.lr_backbone_image
        else:
            lr = cfg.lr
        groups.setdefault(lr, []).append(p)
    return torch.optim.Adam([{"params": params, "lr": lr} for lr, params in groups.items()],
                            betas=(0.9, 0.999), weight_decay=0.0)


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: every trainable parameter and the model's own weights, but not the frozen
    weights of a backbone (reloaded from its source; for a 70B backbone they would dwarf the run)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad and name.startswith("items.backbones.")}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_checkpoint_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad and name.startswith("items.backbones.")}
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise IisanError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def evaluate(model: Recommender, split: SplitData, which: str, cfg: TrainConfig) -> RankingResult:
    model.eval()
    device = next(model.parameters()).device
    table = model.item_table()
    inputs = torch.from_numpy(split.valid_inputs if which == "valid" else split.test_inputs).to(device)
    users = torch.cat([model.user_vectors(inputs[i:i + cfg.eval_batch_size], table)
                       for i in range(0, len(inputs), cfg.eval_batch_size)])
    targets = torch.from_numpy(split.valid_target if which == "valid" else split.test_target)
    history = torch.from_numpy(split.valid_history if which == "valid" else split.test_history)
    return rank_targets(users, table, targets, history, cfg.faithful, cfg.eval_batch_size)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from iisan.evaluate.efficiency import peak_resident_mib

    return peak_resident_mib()


@dataclass
class Setup:
    cfg: TrainConfig
    dataset: Dataset
    split: SplitData
    slots: dict[str, SlotStates]       # cached methods
    device: torch.device
    raw: dict[str, RawSlot] = dataclasses.field(default_factory=dict)  # backbone methods


def setup(cfg: TrainConfig) -> Setup:
    device = pick_device(cfg.device)
    dataset = load_dataset(cfg.dataset)
    split = dataset.split(ProtocolConfig(cfg.max_seq_len, cfg.min_seq_len))
    kind = method_entry(cfg.method).items
    slots = {slot: load_slot(cfg, dataset, split, slot, source, device)
             for slot, source in slot_sources(cfg).items()} if kind == "cached" else {}
    raw = load_raw_slots(cfg, dataset, split, device) if kind == "backbone" else {}
    return Setup(cfg, dataset, split, slots, device, raw)


def load_raw_slots(cfg: TrainConfig, dataset: Dataset, split: SplitData, device: torch.device) -> dict[str, RawSlot]:
    """Load each slot's backbone for a method that runs it, made trainable as the method says."""
    from iisan.extract.layers import select_layers
    from iisan.extract.models import describe_backbone, load_backbone, model_spec
    from iisan.train.tuning import make_trainable

    entry = method_entry(cfg.method)
    raw = {}
    for slot, source in slot_sources(cfg).items():
        spec = model_spec(source.partition("@")[0])
        check_raw_slot(slot, source, dataset, spec.kind)
        if entry.tunes in ("all", "bias") and spec.quantization in ("gptq", "bnb-8bit", "bnb-4bit"):
            raise IisanError(f"--method {cfg.method} trains the weights of {spec.name}, which are quantized "
                             f"({spec.quantization}); use --method lora or adapter, or iisan")
        decoder = spec.family == "decoder"
        if entry.name == "iisan-uncached" and (cfg.standardize == "on" or (cfg.standardize == "auto" and decoder)):
            raise IisanError(f"iisan-uncached does not standardise states ({spec.name}): the statistics need a pass "
                             f"over every item, which is what the cache is for; use --standardize off or --method iisan")
        info = describe_backbone(spec, fetch=True)
        rule = (cfg.layers_text if slot == "txt" else cfg.layers_image) or spec.layers
        trainable = entry.tunes != "none"
        # Trained weights stay fp32 (autocast runs fp16 on GPU); a frozen backbone loads as for extraction.
        backbone = load_backbone(info, device, dtype=torch.float32 if trainable and spec.quantization == "none" else None)
        make_trainable(backbone.model, entry.tunes, cfg.adapter_bottleneck, cfg.lora_rank, cfg.lora_alpha)
        raw[slot] = RawSlot.build(slot, source, backbone, dataset, split, select_layers(rule, info.n_hidden_states),
                                  cfg.text_clean)
    return raw


def provenance(s: Setup) -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:
            return "not installed"

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"iisan_version": __version__, "commit": commit, "python": sys.version.split()[0],
            "platform": platform.platform(), "device": str(s.device),
            "packages": {p: version(p) for p in ("torch", "transformers", "zarr", "numpy", "safetensors")},
            "caches": {slot: {"path": str(x.path), "manifest": x.manifest.to_dict(), "layers_read": x.layers,
                              "standardized": x.standardized} for slot, x in s.slots.items()},
            "dataset": {"name": s.dataset.name, "folder": str(s.dataset.location.folder), "users": s.split.n_users,
                        "items": s.split.n_items, "interactions": s.split.n_interactions}}


def train_seed(s: Setup, seed: int, folder: Path, log) -> dict[str, Any]:
    """Train one seed to early stopping (resuming from folder/last.pt if present); returns its report."""
    cfg, split, device = s.cfg, s.split, s.device
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "report.json").exists():
        return json.loads((folder / "report.json").read_text())
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(s).to(device)
    optimizer = optimizer_for(model, cfg)
    log_pop = torch.log(torch.from_numpy(split.popularity())).float().to(device)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = {"epoch": 0, "best_hr": -1.0, "best_epoch": 0, "bad_epochs": 0, "train_seconds": [], "eval_seconds": []}
    if (folder / "last.pt").exists():
        checkpoint = torch.load(folder / "last.pt", map_location=device, weights_only=False)
        load_checkpoint_state(model, checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
        torch.set_rng_state(checkpoint["rng"])
        generator.set_state(checkpoint["generator"])
        log(f"seed {seed}: resumed after epoch {state['epoch']} (best valid HR@10 {100 * state['best_hr']:.2f} "
            f"at epoch {state['best_epoch']})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"] + 1
        model.train()
        start, total, steps = time.perf_counter(), 0.0, 0
        batches = list(train_batches(split, cfg.batch_size, generator))
        for ids in tqdm(batches, desc=f"seed {seed} epoch {epoch}", unit="step", leave=False,
                        disable=not cfg.progress, file=sys.stderr):
            ids = ids.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = model.calculate_loss(ids, log_pop)
            if not torch.isfinite(loss):
                raise IisanError(f"loss is {loss.item()} at epoch {epoch}, step {steps + 1} (seed {seed}): lower "
                                 f"--lr / --lr-san, or standardise the cached states (--standardize on)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item()
            steps += 1
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        valid = evaluate(model, split, "valid", cfg)
        eval_seconds = time.perf_counter() - start
        hr = valid.metrics["HR@10"]
        improved = hr > state["best_hr"]
        state.update(epoch=epoch, train_seconds=state["train_seconds"] + [train_seconds],
                     eval_seconds=state["eval_seconds"] + [eval_seconds])
        if improved:
            state.update(best_hr=hr, best_epoch=epoch, bad_epochs=0)
            save_file({k: v.contiguous() for k, v in checkpoint_state(model).items()}, folder / "best.safetensors")
        else:
            state["bad_epochs"] += 1
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"epoch": epoch, "loss": total / max(steps, 1), "train_seconds": train_seconds,
                                "eval_seconds": eval_seconds, "valid": valid.metrics, "best": improved}) + "\n")
        torch.save({"model": checkpoint_state(model), "optimizer": optimizer.state_dict(), "state": state,
                    "rng": torch.get_rng_state(), "generator": generator.get_state()}, folder / "last.pt.tmp")
        (folder / "last.pt.tmp").replace(folder / "last.pt")
        log(f"seed {seed} epoch {epoch}: loss {total / max(steps, 1):.4f}, valid HR@10 {100 * hr:.2f} "
            f"NDCG@10 {100 * valid.metrics['NDCG@10']:.2f} ({train_seconds:.1f} s train, {eval_seconds:.1f} s eval)"
            + (" *" if improved else ""))
    load_checkpoint_state(model, load_file(folder / "best.safetensors", device=str(device)))
    valid, test = evaluate(model, split, "valid", cfg), evaluate(model, split, "test", cfg)
    report = {"seed": seed, "best_epoch": state["best_epoch"], "epochs": state["epoch"],
              # Whether early stopping ended the run or the epoch cap cut it while valid HR@10 could still rise.
              "stopped_by": "patience" if state["bad_epochs"] >= cfg.patience else "epoch cap",
              "seconds_per_epoch": statistics.mean(state["train_seconds"]),
              "seconds_per_evaluation": statistics.mean(state["eval_seconds"]),
              "peak_memory_mib": peak_memory_mib(device), "trainable_parameters": trainable_parameters(model),
              "valid": valid.metrics, "test": test.metrics}
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    return report


def run_label(cfg: TrainConfig) -> str:
    """<method>-<pipeline>, plus "-text-only" when the command line emptied the second slot of a pipeline that
    has one (`--image ""`), so that a folder's name never claims a tower its run did not train."""
    preset = (load_registry().get("pipelines") or {}).get(cfg.pipeline) or {}
    dropped = bool(preset.get("image") or preset.get("text2")) and not (cfg.image or cfg.text2)
    return f"{cfg.method}-{cfg.pipeline}" + ("-text-only" if dropped else "")


def run_dir_for(cfg: TrainConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(cfg.out) / cfg.dataset / f"{run_label(cfg)}-{stamp}"


def matching_run(cfg: TrainConfig) -> Path | None:
    """The newest run folder under OUT/<dataset>/ trained with exactly this config (progress display aside),
    finished or not; None if there is none."""
    wanted = {k: v for k, v in cfg.to_dict().items() if k != "progress"}
    for folder in sorted((Path(cfg.out) / cfg.dataset).glob(f"{run_label(cfg)}-*"), reverse=True):
        try:
            saved = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if {k: v for k, v in saved.items() if k != "progress"} == wanted:
            return folder
    return None


def train_or_reuse(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Train, unless a run with the same config exists: then its finished seeds are reused and an unfinished
    one resumes from its last checkpoint (what makes `iisan bench --full` resumable)."""
    found = matching_run(cfg)
    if found is None:
        return train(cfg, log=log)
    return train(resume=found, log=log)


def train(cfg: TrainConfig | None = None, resume: Path | None = None, log=print) -> dict[str, Any]:
    if resume is not None:
        if not (resume / "config.json").is_file():
            raise IisanError(f"{resume}: not a run folder (no config.json)")
        cfg = load_config(resume / "config.json")
        run_dir = resume
        log(f"resuming {run_dir}")
    else:
        assert cfg is not None
        run_dir = run_dir_for(cfg)
        run_dir.mkdir(parents=True, exist_ok=False)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    s = setup(cfg)
    (run_dir / "provenance.json").write_text(json.dumps(provenance(s), indent=2, default=str))
    reports = [train_seed(s, cfg.seed + i, run_dir / f"seed-{cfg.seed + i}", log) for i in range(cfg.seeds)]
    summary = summarize(reports)
    (run_dir / "report.json").write_text(json.dumps({"config": cfg.to_dict(), "seeds": reports, **summary},
                                                    indent=2))
    for line in report_lines(reports, summary):
        log(line)
    return {"run_dir": str(run_dir), "seeds": reports, **summary}


def summarize(reports: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    out: dict[str, Any] = {}
    for split in ("valid", "test"):
        out[split] = {k: stats([r[split][k] for r in reports]) for k in reports[0][split]}
    return out


def report_lines(reports: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    first = reports[0]
    lines = [f"seconds per epoch {statistics.mean(r['seconds_per_epoch'] for r in reports):.2f}, "
             f"seconds per evaluation {statistics.mean(r['seconds_per_evaluation'] for r in reports):.2f}, "
             f"peak memory {max(r['peak_memory_mib'] for r in reports):.0f} MiB, "
             f"trainable parameters {first['trainable_parameters']:,}"]
    if len(reports) > 1:
        for split in ("valid", "test"):
            hr, ndcg = summary[split]["HR@10"], summary[split]["NDCG@10"]
            lines.append(f"{split} over {len(reports)} seeds: HR@10 {100 * hr['mean']:.2f} ± {100 * hr['std']:.2f}, "
                         f"NDCG@10 {100 * ndcg['mean']:.2f} ± {100 * ndcg['std']:.2f}")
    for split in ("valid", "test"):
        hr, ndcg = summary[split]["HR@10"]["mean"], summary[split]["NDCG@10"]["mean"]
        lines.append(f"{split} HR@10 {100 * hr:.2f} NDCG@10 {100 * ndcg:.2f}")
    return lines
