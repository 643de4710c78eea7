"""Small facts about where the code runs, shared by every stage: the torch device to use, the git commit of
the checkout (for reports and provenance), and how busy the machine was meanwhile (to mark timings taken under
contention)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from iisan.errors import IisanError


def pick_device(device: str = "auto"):
    """`auto`: CUDA when present, else CPU; `cpu`, `cuda`, `cuda:N` as given (CUDA asked for without one is an
    error naming it)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise IisanError(f"device '{device}' asked for, but no CUDA device is available")
    return chosen


def git_commit(short: bool = False) -> str:
    """The commit of the repository this package runs from ("" outside a git checkout)."""
    args = ["git", "rev-parse"] + (["--short"] if short else []) + ["HEAD"]
    try:
        return subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a torchrun rendezvous in tests and benches)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A timing counts as taken under contention when other processes used more than this share of the machine's CPU
# meanwhile (a study may run in the background while a session works on something else).
CONTENDED = 0.10


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; None where there is none)."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children waited for (a torchrun's ranks included)."""
    import resource  # (POSIX only: imported where used)

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def others_cpu_share(seconds: float, busy: float | None, own: float) -> float | None:
    """The share of the machine's CPU (all cores) that other processes used over `seconds` of wall time, in
    which the machine was `busy` CPU seconds and this process tree `own` (None: not measurable)."""
    if busy is None or seconds <= 0:
        return None
    return max(0.0, busy - own) / (seconds * (os.cpu_count() or 1))


def load_mark() -> tuple[float, float | None, float]:
    """Now, for `load_since`: wall clock, the machine's busy CPU seconds, this process tree's."""
    return time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()


def load_since(mark: tuple[float, float | None, float]) -> tuple[float, float | None]:
    """Wall seconds since `mark` and the share of the CPU other processes used meanwhile (`others_cpu_share`)."""
    began, busy, own = mark
    seconds, after = time.perf_counter() - began, machine_busy_seconds()
    return seconds, others_cpu_share(seconds, None if busy is None or after is None else after - busy,
                                 own_cpu_seconds() - own)
