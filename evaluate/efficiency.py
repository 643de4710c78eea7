"""Training cost of one method at one batch size, measured in a child process of its own.

Why a child: peak resident memory only ever grows within a process, so each (method, batch size) needs a
fresh one to have a peak of its own; and a run that would exhaust the machine can be stopped from outside.

What is measured (`measure_step_cost`, run in the child):
- wall seconds per training step (forward, loss, backward, Adam step) after `warmup` steps, averaged over
  the timed steps on the first batches of a seeded epoch (the same batches for every method): at least one
  and at most `steps`, stopping once `budget` seconds have been timed, so a 30-second step is timed once
  and a 20-millisecond one `steps` times;
- seconds per epoch: s/step × the steps of a full epoch over all training users, labelled "projected"; when
  that projection is under `full_epoch_under` seconds the whole epoch is run and the label is "measured";
- peak memory: `torch.cuda.max_memory_allocated` on a GPU; on CPU the child's peak resident set (which
  includes Python and the imported libraries, the same floor for every method, recorded apart as `floor_mib`).
  It is read after at least two steps (warm-up included), because Adam allocates its state in the first
  step's `optimizer.step()`, after that step's activations are gone: only from the second step on do
  activations, gradients and optimizer state coexist, as they do for the rest of training;
- trainable and total parameters.

The parent (`run_measurement`) refuses to start a run whose memory, extrapolated from the same method at
smaller batch sizes, would pass `memory_fraction` of the machine's memory, and kills a child whose resident
set passes it: either way the result says "out of memory" rather than taking the machine down.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MEMORY_FRACTION = 0.8


def total_memory_mib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2**20


def resident_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_resident_mib() -> float:
    """This process's peak resident set since it started its program (VmHWM). Not `ru_maxrss`: Linux carries
    that across fork + exec, so a child's ru_maxrss starts at its parent's resident size at the fork and a
    bench parent that had just run an extraction (~1 GiB) would lift every child's peak to that."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # no /proc (macOS): the best there is; macOS reports bytes, Linux KiB

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def measure_step_cost(config: dict[str, Any], warmup: int = 1, steps: int = 3, budget: float = 20.0,
                      full_epoch_under: float = 60.0) -> dict[str, Any]:
    """Runs in the child: set up the method as `iisan train` would, then time one step at a time after
    `warmup` untimed ones, from 1 up to `steps` steps, stopping when `budget` seconds have been timed."""
    import torch

    from iisan.train.config import TrainConfig
    from iisan.train.data import train_batches
    from iisan.train.recipe import build_model, optimizer_for, peak_memory_mib, setup

    try:  # LoRA imports peft (and what peft imports): give every method the same import floor
        import peft  # noqa: F401
    except ImportError:
        pass
    floor = resident_mib(os.getpid()) or 0.0
    cfg = TrainConfig(**config)
    torch.manual_seed(cfg.seed)
    s = setup(cfg)
    device = s.device
    model = build_model(s).to(device)
    optimizer = optimizer_for(model, cfg)
    log_pop = torch.log(torch.from_numpy(s.split.popularity())).float().to(device)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = list(train_batches(s.split, cfg.batch_size, torch.Generator().manual_seed(cfg.seed)))
    steps_per_epoch = len(batches)

    def step(ids: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = model.calculate_loss(ids.to(device), log_pop)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

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


def projected_memory(previous: list[tuple[int, float]], batch_size: int) -> float | None:
    """Peak memory at `batch_size` extrapolated linearly from the two largest smaller batch sizes measured."""
    points = sorted((b, m) for b, m in previous if b < batch_size)
    if len(points) < 2:
        return None
    (b1, m1), (b2, m2) = points[-2], points[-1]
    slope = max((m2 - m1) / (b2 - b1), 0.0)
    return m2 + slope * (batch_size - b2)


def run_measurement(config: dict[str, Any], warmup: int, steps: int, budget: float, full_epoch_under: float,
                    limit_mib: float, max_seconds: float, previous: list[tuple[int, float]] | None = None,
                    log=print) -> dict[str, Any]:
    """Measure one (method, batch size) in a child process, guarding memory and time."""
    base = {"method": config["method"], "batch_size": config["batch_size"]}
    guess = projected_memory(previous or [], config["batch_size"])
    if guess is not None and guess > limit_mib:
        return {**base, "status": "out of memory", "peak_memory_mib": guess,
                "note": f"projected {guess:,.0f} MiB > limit {limit_mib:,.0f} MiB: not attempted"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = {"config": config, "warmup": warmup, "steps": steps, "budget": budget,
                "full_epoch_under": full_epoch_under}
        (Path(tmp) / "args.json").write_text(json.dumps(args))
        child = subprocess.Popen([sys.executable, "-m", "iisan.evaluate.efficiency", str(Path(tmp) / "args.json"),
                                  str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start, highest, killed = time.perf_counter(), 0.0, ""
        while child.poll() is None:
            rss = resident_mib(child.pid) or 0.0
            highest = max(highest, rss)
            if rss > limit_mib:
                killed = f"resident {rss:,.0f} MiB passed the limit {limit_mib:,.0f} MiB: stopped"
            elif time.perf_counter() - start > max_seconds:
                killed = f"still running after {max_seconds:.0f} s: stopped"
            if killed:
                child.kill()
                child.wait()
                break
            time.sleep(0.05)
        stderr = child.stderr.read() if child.stderr else ""
        if killed:
            status = "out of memory" if "limit" in killed else "timed out"
            return {**base, "status": status, "peak_memory_mib": highest, "note": killed}
        if child.returncode != 0 or not out.is_file():
            tail = stderr.strip().splitlines()[-3:]
            if any("OutOfMemoryError" in line or "out of memory" in line.lower() for line in tail):
                return {**base, "status": "out of memory", "note": " ".join(tail)}
            return {**base, "status": "failed", "note": " | ".join(tail)}
        return json.loads(out.read_text())


def tpme(rows: list[dict[str, Any]], weights: tuple[float, float, float] = (0.45, 0.1, 0.45)) -> None:
    """TPME = α1·time + α2·params + α3·memory, each min-max normalised over the rows (SPEC §9.1); set in place.
    Rows that did not run get none. Lower is better."""
    done = [r for r in rows if r.get("status") == "ok"]
    keys = ("seconds_per_epoch", "trainable_parameters", "peak_memory_mib")

    def normalised(value: float, key: str) -> float:
        values = [r[key] for r in done]
        low, high = min(values), max(values)
        return 0.0 if math.isclose(high, low) else (value - low) / (high - low)

    for r in done:
        r["tpme"] = sum(w * normalised(r[k], k) for w, k in zip(weights, keys))


def _child(args_path: str, out_path: str) -> None:
    args = json.loads(Path(args_path).read_text())
    result = measure_step_cost(args["config"], args["warmup"], args["steps"], args["budget"],
                               args["full_epoch_under"])
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
