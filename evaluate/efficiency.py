"""Efficiency primitives: memory readings, the memory projection that guards a benchmark, and TPME.

The training-cost measurement that uses them (`measure_step_cost`, one method at one batch size in a child
process of its own) is in experiments/cost.py; it measures:
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

Its parent (`run_measurement`) refuses to start a run whose memory, extrapolated from the same method at
smaller batch sizes, would pass `memory_fraction` of the machine's memory, and kills a child whose resident
set passes it: either way the result says "out of memory" rather than taking the machine down.
"""

from __future__ import annotations

import math
import os
import sys
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


def device_name(device) -> str:
    """The GPU's name, or the CPU's model and the machine's memory, for report headers."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU ({cpu}, {os.cpu_count()} cores, {total_memory_mib() / 1024:.0f} GiB)"


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


def peak_memory_mib(device) -> float:
    """Peak memory of this process so far: GPU memory allocated on a CUDA device, else the resident set."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_resident_mib()


def projected_memory(previous: list[tuple[int, float]], batch_size: int) -> float | None:
    """Peak memory at `batch_size` extrapolated linearly from the two largest smaller batch sizes measured."""
    points = sorted((b, m) for b, m in previous if b < batch_size)
    if len(points) < 2:
        return None
    (b1, m1), (b2, m2) = points[-2], points[-1]
    slope = max((m2 - m1) / (b2 - b1), 0.0)
    return m2 + slope * (batch_size - b2)


def tpme(rows: list[dict[str, Any]], weights: tuple[float, float, float] = (0.45, 0.1, 0.45)) -> None:
    """TPME = α1·time + α2·params + α3·memory, each min-max normalised over the rows (docs/method.md §9.1); set in place.
    Rows that did not run get none. Lower is better."""
    done = [r for r in rows if r.get("status") == "ok"]
    keys = ("seconds_per_epoch", "trainable_parameters", "peak_memory_mib")

    def normalised(value: float, key: str) -> float:
        values = [r[key] for r in done]
        low, high = min(values), max(values)
        return 0.0 if math.isclose(high, low) else (value - low) / (high - low)

    for r in done:
        r["tpme"] = sum(w * normalised(r[k], k) for w, k in zip(weights, keys))
