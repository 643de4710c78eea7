"""Training cost of one method at one batch size, measured in a child process of its own (what is measured:
evaluate/efficiency.py's docstring).

Why a child: peak resident memory only ever grows within a process, so each (method, batch size) needs a
fresh one to have a peak of its own; and a run that would exhaust the machine can be stopped from outside.
The child (experiments/launch.py's `call_in_child`, the one launcher) times `TrainStep`, the step `iisan train`
runs.
"""

from __future__ import annotations

import os
import time
from typing import Any

from iisan.evaluate.efficiency import peak_memory_mib, projected_memory, resident_mib


def measure_step_cost(config: dict[str, Any], warmup: int = 1, steps: int = 3, budget: float = 20.0,
                      full_epoch_under: float = 60.0) -> dict[str, Any]:
    """Runs in the child: set up the method as `iisan train` would, then time one step at a time after
    `warmup` untimed ones, from 1 up to `steps` steps, stopping when `budget` seconds have been timed."""
    import torch

    from iisan.train.config import TrainConfig
    from iisan.train.data import train_batches
    from iisan.train.recipe import build_model, optimizer_for, setup
    from iisan.train.step import TrainStep

    try:  # LoRA imports peft (and what peft imports): give every method the same import floor
        import peft  # noqa: F401
    except ImportError:
        pass
    floor = resident_mib(os.getpid()) or 0.0
    cfg = TrainConfig(**config)
    torch.manual_seed(cfg.seed)
    s = setup(cfg)
    device = s.device
    model = build_model(s)
    step = TrainStep.create(model, optimizer_for(model, cfg), s.split, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = list(train_batches(s.split, cfg.batch_size, torch.Generator().manual_seed(cfg.seed)))
    steps_per_epoch = len(batches)

    def timed(run: list[torch.Tensor]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for ids in run:
            step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    model.train()
    warm = min(warmup, steps_per_epoch - 1) if steps_per_epoch > 1 else 0
    warmup_seconds = timed(batches[:warm])
    step_seconds: list[float] = []
    for ids in batches[warm:warm + max(steps, 1)]:
        step_seconds.append(timed([ids]))
        if sum(step_seconds) >= budget:
            break
    per_step = sum(step_seconds) / len(step_seconds)
    projected = per_step * steps_per_epoch
    epoch = "projected"
    seconds_per_epoch = projected
    if projected <= full_epoch_under:
        seconds_per_epoch = timed(batches)
        epoch = "measured"
    peak = peak_memory_mib(device)
    return {"method": cfg.method, "batch_size": cfg.batch_size, "status": "ok",
            "seconds_per_step": per_step, "steps_timed": len(step_seconds), "step_seconds": step_seconds,
            "warmup_steps": warm, "warmup_seconds": warmup_seconds, "steps_per_epoch": steps_per_epoch,
            "seconds_per_epoch": seconds_per_epoch, "epoch": epoch, "peak_memory_mib": peak,
            "memory_kind": "GPU allocated" if device.type == "cuda" else "peak resident set (VmHWM)",
            "floor_mib": 0.0 if device.type == "cuda" else floor,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device), "threads": torch.get_num_threads()}


def run_measurement(config: dict[str, Any], warmup: int, steps: int, budget: float, full_epoch_under: float,
                    limit_mib: float, max_seconds: float, previous: list[tuple[int, float]] | None = None,
                    log=print) -> dict[str, Any]:
    """Measure one (method, batch size) in a child process, guarding memory and time."""
    base = {"method": config["method"], "batch_size": config["batch_size"]}
    guess = projected_memory(previous or [], config["batch_size"])
    if guess is not None and guess > limit_mib:
        return {**base, "status": "out of memory", "peak_memory_mib": guess,
                "note": f"projected {guess:,.0f} MiB > limit {limit_mib:,.0f} MiB: not attempted"}
    from iisan.experiments.launch import LaunchFailed, call_in_child

    try:
        return call_in_child("iisan.experiments.cost:measure_step_cost",
                             {"config": config, "warmup": warmup, "steps": steps, "budget": budget,
                              "full_epoch_under": full_epoch_under},
                             limit_mib=limit_mib, max_seconds=max_seconds).value
    except LaunchFailed as e:
        if e.stopped:
            status = "out of memory" if "limit" in e.stopped else "timed out"
            return {**base, "status": status, "peak_memory_mib": e.memory.get("VmRSS", 0.0), "note": e.stopped}
        tail = e.tail[-3:]
        if e.kind == "OutOfMemoryError" or any("out of memory" in line.lower() for line in tail):
            return {**base, "status": "out of memory", "note": " ".join(tail)}
        return {**base, "status": "failed", "note": " | ".join(tail)}
