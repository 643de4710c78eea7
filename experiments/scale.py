"""`make bench-scale` (`python -m iisan.experiments.scale`): training and evaluation cost against size, on
synthetic data (`iisan data synth`), in memory and mmap cache modes, written to reports/bench-scale.{md,json}
with a plot and a fitted growth exponent per figure.

Each (size, mode) is one `iisan train` child (one epoch, then the final evaluation), sampled every 0.1 s for
its RssAnon (the process's own memory, not counting the page cache of a mapped file) and VmRSS. The report
fits, per mode, log(figure) against log(interactions) (epoch time) or log(items × users) (evaluation time):
the slope is the growth exponent. Distributed training (2 processes) is not part of this bench yet.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from iisan.errors import IisanError
from iisan.runtime import git_commit

# (items, users): the ladder, up to 1M items x 7 layers x 384 (fp16, 5.4 GB of states) and 200k users
FULL = ((125_000, 25_000), (250_000, 50_000), (500_000, 100_000), (1_000_000, 200_000))
MODES = ("memory", "mmap")


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


def measure(cmd: list[str], interval: float = 0.1) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """Run `cmd`, sampling its memory; returns the result and the peaks (MiB) of RssAnon and VmRSS."""
    peaks = {"RssAnon": 0.0, "VmRSS": 0.0}
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in _status(child.pid).items():
                peaks[key] = max(peaks[key], value)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, stderr = child.communicate()
    done.set()
    thread.join()
    return subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr), peaks


def growth(x: list[float], y: list[float]) -> float | None:
    """The slope of log y against log x (least squares); None with fewer than two points."""
    if len(x) < 2:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def bench_scale(sizes=FULL, modes=MODES, dim: int = 384, layers: int = 7, work: Path = Path("runs/bench-scale"),
                out: Path = Path("reports"), log=print) -> Path:
    need = sum(i * layers * dim * 2 for i, _ in sizes[-1:]) * (2 if "mmap" in modes else 1) * 1.2 / 2**30
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / 2**30
    log(f"the largest size needs about {need:.1f} GiB of disk (its store and mmap copy); {free:.1f} GiB free")
    if free < need:
        raise IisanError(f"{work}: {free:.1f} GiB free, the bench needs about {need:.1f} GiB (fewer --sizes?)")
    rows = []
    for items, users in sizes:
        name = f"synth-{items}-{users}"
        folder, cache = work / "data" / name, work / "cache"
        if not (cache / name / "synth.zarr").exists():
            log(f"synth {name}")
            subprocess.run([sys.executable, "-m", "iisan.cli", "data", "synth", "--users", str(users), "--items",
                            str(items), "--dim", str(dim), "--layers", str(layers), "--out", str(folder), "--cache",
                            str(cache), "--force"], check=True, capture_output=True)
        for mode in modes:
            runs = work / "runs" / mode
            shutil.rmtree(runs / name, ignore_errors=True)
            cmd = [sys.executable, "-m", "iisan.cli", "train", "--dataset", str(folder), "--text", "synth",
                   "--cache", str(cache), "--out", str(runs), "--epochs", "1", "--no-progress", "--cache-mode", mode]
            began = time.perf_counter()
            result, peaks = measure(cmd)
            if result.returncode != 0:
                raise IisanError(f"{name} ({mode}) failed: {result.stderr.strip().splitlines()[-3:]}")
            report = json.loads((Path(result.stdout.strip().splitlines()[-1]) / "report.json").read_text())
            seed = report["seeds"][0]
            interactions = sum(len(line.split("\t", 1)[1].split()) for line in
                               (folder / "users.tsv").read_text().splitlines())
            row = {"items": items, "users": users, "interactions": interactions, "mode": mode,
                   "epoch_seconds": seed["seconds_per_epoch"], "eval_seconds": seed["seconds_per_evaluation"],
                   "peak_rss_anon_mib": peaks["RssAnon"], "peak_rss_mib": peaks["VmRSS"],
                   "wall_seconds": time.perf_counter() - began, "test_HR@10": report["test"]["HR@10"]["mean"],
                   "state_gib": (items + 1) * layers * dim * 2 / 2**30}
            rows.append(row)
            log(f"{name} {mode}: epoch {row['epoch_seconds']:.1f} s, evaluation {row['eval_seconds']:.1f} s, peak "
                f"RssAnon {row['peak_rss_anon_mib']:.0f} MiB (VmRSS {row['peak_rss_mib']:.0f}), test HR@10 "
                f"{100 * row['test_HR@10']:.2f}")
    return write_report(rows, out, dim, layers)


def write_report(rows: list[dict], out: Path, dim: int, layers: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import torch

    from iisan.evaluate.efficiency import device_name
    from iisan.runtime import pick_device

    fits = {}
    for mode in {r["mode"] for r in rows}:
        mine = [r for r in rows if r["mode"] == mode]
        fits[mode] = {"epoch_seconds": growth([r["interactions"] for r in mine], [r["epoch_seconds"] for r in mine]),
                      "eval_seconds": growth([r["items"] * r["users"] for r in mine], [r["eval_seconds"] for r in mine]),
                      "peak_rss_anon_mib": growth([r["items"] for r in mine], [r["peak_rss_anon_mib"] for r in mine])}
    out.mkdir(parents=True, exist_ok=True)
    meta = {"commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(pick_device()), "threads": torch.get_num_threads(), "dim": dim, "layers": layers,
            "command": "python -m iisan.experiments.scale " + " ".join(sys.argv[1:]), "rows": rows, "growth": fits}
    (out / "bench-scale.json").write_text(json.dumps(meta, indent=2))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for mode, marker in zip(sorted(fits), "os"):
        mine = [r for r in rows if r["mode"] == mode]
        axes[0].loglog([r["interactions"] for r in mine], [r["epoch_seconds"] for r in mine], marker + "-", label=mode)
        axes[1].loglog([r["items"] * r["users"] for r in mine], [r["eval_seconds"] for r in mine], marker + "-", label=mode)
        axes[2].loglog([r["items"] for r in mine], [r["peak_rss_anon_mib"] for r in mine], marker + "-", label=mode)
    for ax, (x, y) in zip(axes, [("interactions", "s / epoch"), ("items x users", "s / evaluation"),
                                 ("items", "peak RssAnon (MiB)")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench-scale.png", dpi=110)
    plt.close(fig)
    lines = ["# Scale bench: cost against size (synthetic data)", "",
             f"- command: `{meta['command']}`", f"- commit {meta['commit']}, {meta['date']}; {meta['device']}, "
             f"{meta['threads']} threads; states {layers} x {dim}, fp16; one epoch, then the final evaluation", "",
             "| items | users | interactions | mode | states (GiB) | s / epoch | s / evaluation | peak RssAnon (MiB) "
             "| peak VmRSS (MiB) | test HR@10 |", "|---" * 10 + "|"]
    lines += [f"| {r['items']:,} | {r['users']:,} | {r['interactions']:,} | {r['mode']} | {r['state_gib']:.2f} | "
              f"{r['epoch_seconds']:.1f} | {r['eval_seconds']:.1f} | {r['peak_rss_anon_mib']:,.0f} | "
              f"{r['peak_rss_mib']:,.0f} | {100 * r['test_HR@10']:.2f} |" for r in rows]
    lines += ["", "Growth exponents (slope of log figure against log size):", ""]
    for mode, fit in sorted(fits.items()):
        shown = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in fit.items())
        lines.append(f"- {mode}: {shown} (epoch time against interactions, evaluation against items x users, "
                     f"RssAnon against items)")
    lines += ["", "![scale](bench-scale.png)", ""]
    path = out / "bench-scale.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="", help="items:users,... (default: the full ladder up to 1M:200k)")
    parser.add_argument("--modes", default="memory,mmap")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args()
    sizes = tuple(tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",") if s) or FULL
    try:
        print(bench_scale(sizes, tuple(args.modes.split(",")), args.dim, args.layers, args.work, args.out))
    except IisanError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
