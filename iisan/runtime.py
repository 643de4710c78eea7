"""Small facts about where the code runs, shared by every stage: the torch device to use and the git commit
of the checkout (for reports and provenance)."""

from __future__ import annotations

import subprocess
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
