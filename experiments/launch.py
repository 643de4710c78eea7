"""One launcher: every runner (study, tune, bench, scale, the cost measurement) trains through `launch`, in this
process or in a child, and gets a typed `RunResult` back.

A child (`isolate=True`) is how a runner keeps a run's memory to itself (a process's peak only grows, so runs
sharing one process would report each other's peaks), pins its torch threads, or starts several processes
under torchrun; `memory=True` samples the child's process tree every 0.1 s for RssAnon (a process's own memory,
not the page cache of a mapped file) and VmRSS. The child writes its result, or its error's type and message,
to a JSON file the parent reads: a failure comes back as `LaunchFailed`, naming the type, the message and the
last lines the child printed. `call_in_child` is the same for any function taking and returning JSON values
(the cost measurement's step timing).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from iisan.errors import IisanError
from iisan.runtime import free_port, load_mark, load_since
from iisan.train.result import RunResult, RunSpec

SAMPLE_SECONDS = 0.1
TAIL_LINES = 12


class LaunchFailed(IisanError):
    """A child run ended with an error (`kind`: its exception type, `tail`: the last lines it printed) or was
    stopped by the parent (`stopped`: why, e.g. a memory or time limit)."""

    def __init__(self, message: str, kind: str = "", tail: list[str] | None = None, stopped: str = "",
                 memory: dict[str, float] | None = None):
        super().__init__(message)
        self.kind, self.tail, self.stopped, self.memory = kind, tail or [], stopped, memory or {}


@dataclass
class ChildOutcome:
    """What `call_in_child` gives back: the function's value, the memory peaks (MiB; empty when not sampled)
    and the share of the machine's CPU other processes used meanwhile (None: not measurable)."""
    value: Any
    memory: dict[str, float] = field(default_factory=dict)
    others_cpu_share: float | None = None


def _tree(pid: int) -> list[int]:
    """pid and its descendants (torchrun's workers)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _status(pid: int) -> dict[str, float]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("RssAnon", "VmRSS"):
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


class _Sampler:
    """The peaks of RssAnon / VmRSS of the largest process of a tree and of the tree's sum, sampled in a thread;
    `limit_mib` (on the largest process's VmRSS) and `max_seconds` stop the child, saying why."""

    def __init__(self, child: subprocess.Popen, limit_mib: float | None, max_seconds: float | None):
        self.child, self.limit, self.max_seconds = child, limit_mib, max_seconds
        self.peaks = {"RssAnon": 0.0, "VmRSS": 0.0, "RssAnon total": 0.0, "VmRSS total": 0.0}
        self.stopped = ""
        self.done = threading.Event()
        self.began = time.perf_counter()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            totals = {"RssAnon": 0.0, "VmRSS": 0.0}
            for pid in _tree(self.child.pid):
                for key, value in _status(pid).items():
                    self.peaks[key] = max(self.peaks[key], value)
                    totals[key] += value
            for key, value in totals.items():
                self.peaks[f"{key} total"] = max(self.peaks[f"{key} total"], value)
            if self.limit is not None and self.peaks["VmRSS"] > self.limit:
                self.stopped = f"resident {self.peaks['VmRSS']:,.0f} MiB passed the limit {self.limit:,.0f} MiB: stopped"
            elif self.max_seconds is not None and time.perf_counter() - self.began > self.max_seconds:
                self.stopped = f"still running after {self.max_seconds:.0f} s: stopped"
            if self.stopped:
                self.child.kill()
                return
            time.sleep(SAMPLE_SECONDS)

    def close(self) -> dict[str, float]:
        self.done.set()
        self.thread.join()
        return self.peaks


def call_in_child(target: str, payload: dict[str, Any], *, threads: int | None = None, processes: int = 1,
                  memory: bool = False, limit_mib: float | None = None, max_seconds: float | None = None,
                  show_output: bool = False) -> ChildOutcome:
    """Call `target` ("module:function") with `payload` as keyword arguments in a fresh Python process (under
    torchrun with `processes` > 1: every rank calls it, rank 0's value comes back). `threads` pins the child's
    torch threads; `memory` samples its process tree, `limit_mib` / `max_seconds` stop it. The child's output
    goes to a log whose last lines a failure names (`show_output`: to this process's terminal instead)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), IISAN_CHILD_THREADS=str(threads))
    launcher = [sys.executable] if processes == 1 else [
        str(Path(sys.executable).parent / "torchrun"), "--nnodes", "1", "--nproc-per-node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    with tempfile.TemporaryDirectory(prefix="iisan-launch-") as tmp:
        args, out, log_path = Path(tmp) / "payload.json", Path(tmp) / "result.json", Path(tmp) / "output.log"
        args.write_text(json.dumps({"target": target, "payload": payload}, default=str))
        mark = load_mark()
        with open(log_path, "w") as log_file:
            sink = None if show_output else log_file
            child = subprocess.Popen([*launcher, "-m", "iisan.experiments.launch", str(args), str(out)], env=env,
                                     stdout=sink, stderr=subprocess.STDOUT if sink else None)
            sampler = _Sampler(child, limit_mib, max_seconds) if (memory or limit_mib or max_seconds) else None
            try:
                child.wait()
            finally:  # interrupted: the child goes too (its runs resume from their checkpoints)
                if child.poll() is None:
                    child.terminate()
                    try:
                        child.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
                peaks = sampler.close() if sampler is not None else {}
        tail = [] if show_output else log_path.read_text(errors="replace").strip().splitlines()[-TAIL_LINES:]
        answer = json.loads(out.read_text()) if out.is_file() else None
    others = load_since(mark)[1]
    if sampler is not None and sampler.stopped:
        raise LaunchFailed(f"{target}: {sampler.stopped}", stopped=sampler.stopped, tail=tail, memory=peaks)
    if answer is None or "error" in answer:
        error = (answer or {}).get("error") or {}
        where = "its output is above" if show_output else " | ".join(tail[-5:])
        raise LaunchFailed(f"{target} failed in a child process (exit code {child.returncode})"
                           + (f": {error.get('type')}: {error.get('message')}" if error else "") + f"; {where}",
                           kind=error.get("type", ""), tail=tail, memory=peaks)
    return ChildOutcome(answer["value"], peaks if memory else {}, others)


def launch(spec: RunSpec, isolate: bool = False, *, threads: int | None = None, processes: int = 1,
           memory: bool = False, log: Callable[[str], None] = print, show_output: bool = False,
           on_epoch: Callable[[int, float], None] | None = None) -> RunResult:
    """Run a spec and return its `RunResult`: in this process (`log`, `on_epoch` apply), or in a child
    (`isolate`: its own memory, `threads` torch threads, `processes` ranks under torchrun; `memory` records its
    peaks in `result.memory`)."""
    if not isolate:
        if processes != 1 or memory:
            raise IisanError("several processes and memory peaks need a child process: launch(..., isolate=True)")
        from iisan.train.recipe import run

        if threads is None:
            return run(spec, log=log, on_epoch=on_epoch)
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run(spec, log=log, on_epoch=on_epoch)
        finally:
            torch.set_num_threads(before)
    if on_epoch is not None:
        raise IisanError("on_epoch is called in the training process: launch(..., isolate=False)")
    outcome = call_in_child("iisan.experiments.launch:_run_spec", {"spec": spec.to_dict()}, threads=threads,
                            processes=processes, memory=memory, show_output=show_output)
    result = RunResult.of(outcome.value, outcome.value["run_dir"])
    result.memory = outcome.memory
    return result


def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    from iisan.train.recipe import run

    log = (lambda message: print(message, file=sys.stderr, flush=True))
    return run(RunSpec.from_dict(spec), log=log).to_dict()


def _child(args_path: str, out_path: str) -> None:
    request = json.loads(Path(args_path).read_text())
    if os.environ.get("IISAN_CHILD_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["IISAN_CHILD_THREADS"]))
    module, _, name = request["target"].partition(":")
    main = os.environ.get("RANK", "0") == "0"
    try:
        value = getattr(importlib.import_module(module), name)(**request["payload"])
    except BaseException as e:  # noqa: BLE001 - the parent gets its type and message, then this child fails
        traceback.print_exc()
        if main:
            Path(out_path).write_text(json.dumps({"error": {"type": type(e).__name__, "message": str(e)}}))
        raise SystemExit(1) from None
    if main:
        Path(out_path).write_text(json.dumps({"value": value}, default=str))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
