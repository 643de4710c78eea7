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


def numeric_platform(device=None) -> dict[str, str]:
    """What decides the floating-point results of the same code, config and packages: on a CPU its identity
    (vendor, family, model, stepping from /proc/cpuinfo: a hypervisor may name every AMD part just "AMD EPYC")
    and the vector instructions torch's kernels dispatch to (AVX2, AVX512, ...); on a GPU its name and compute
    capability. Two runs can be bit-identical only where this and the thread count are the same."""
    import platform

    import torch

    if device is not None and getattr(device, "type", str(device)) == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"gpu": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}", "torch": torch.__version__}
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "cpu family", "model", "stepping", "model name") and key not in info:
                    info[key] = value.strip()
                if not line.strip() and info:
                    break  # the first processor's block
    except OSError:
        pass
    cpu = (f"{info.get('vendor_id', platform.processor() or platform.machine())} family {info.get('cpu family', '?')} "
           f"model {info.get('model', '?')} stepping {info.get('stepping', '?')} ({info.get('model name', '?')})")
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        isa = "unknown"
    return {"cpu": cpu, "isa": isa, "torch": torch.__version__}


# The packages whose code decides a run's numbers (data, cache, extraction, evaluation, training): a record made
# by other code than today's is told from one that moved at equal code by hashing their modules.
RESULT_PACKAGES = ("iisan.data", "iisan.cache_store", "iisan.extract", "iisan.evaluate", "iisan.train")


def code_hashes(packages: tuple[str, ...] = RESULT_PACKAGES) -> dict[str, str]:
    """{module: the first 16 hex digits of the sha256 of its source} for every module of `packages`, read from
    where they are installed (a checkout, an editable or a wheel install alike; no git needed)."""
    import hashlib
    import importlib.util

    hashes: dict[str, str] = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            for path in sorted(Path(folder).rglob("*.py")):
                parts = path.relative_to(folder).with_suffix("").parts
                name = ".".join((package, *parts)).removesuffix(".__init__")
                hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return dict(sorted(hashes.items()))


def changed_result_code(commit: str, now: str = "HEAD") -> list[str] | None:
    """The result-deciding source files (RESULT_PACKAGES) that differ between two commits of this checkout, for
    records written before their code was hashed; None where git cannot tell (no checkout, an unknown commit)."""
    import importlib.util

    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        folders = []
        for package in RESULT_PACKAGES:
            spec = importlib.util.find_spec(package)
            folders += [str(Path(f).resolve().relative_to(Path(top).resolve()))
                        for f in (spec.submodule_search_locations or [])] if spec is not None else []
        out = subprocess.run(["git", "diff", "--name-only", commit, now, "--", *folders], capture_output=True,
                             text=True, cwd=top, check=True).stdout
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None
    return [line for line in out.splitlines() if line.endswith(".py")]
