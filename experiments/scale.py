"""`make bench-scale` (`python -m iisan.experiments.scale`): training and evaluation cost against size, on
synthetic data (`iisan data synth`), in memory and mmap cache modes, written to reports/bench-scale.{md,json}
with a plot and a fitted growth exponent per figure.

Each (size, mode, processes) is one `iisan train` child (one epoch, then the final evaluation; with 2
processes under torchrun), its process tree sampled every 0.1 s for RssAnon (a process's own memory, not
counting the page cache of a mapped file) and VmRSS: the peak of the largest process and of their sum. Every
child uses the whole machine: --threads torch threads per process, by default the cores divided by the
process count (on 2 cores: 1 process at 2 threads, 2 processes at 1 each). The report
fits, per mode and process count, log(figure) against log(interactions) (epoch time) or log(items × users)
(evaluation time): the slope is the growth exponent; and it compares each 2-process run's metrics with the
1-process run's. The report is rewritten after every row and its JSON (reports/bench-scale.json, committed)
holds the finished rows, so an interrupted bench continues where it stopped, also on a fresh clone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from iisan.errors import IisanError
from iisan.extract.synth import SynthConfig, synth
from iisan.runtime import CONTENDED, git_commit, load_mark, load_since

# (items, users): the ladder, up to 1M items x 7 layers x 384 (fp16, 5.4 GB of states) and 200k users
FULL = ((125_000, 25_000), (250_000, 50_000), (500_000, 100_000), (1_000_000, 200_000))
MODES = ("memory", "mmap")
# Options every bench run trains with: evaluation scores 256 users at a time in tiles of 65,536 items, so that
# its score block (256 x 65,536 fp32: 64 MiB) stays well inside the mmap mode's 2 GB target; with the users in
# target order (train/recipe.py, evaluate) these tiles score 1M items about 3x faster than the default 262,144
# (1.85 against 5.8 ns per score, 2 threads, 1,024 users x 1M items at the density of 200k users).
TRAIN_OPTIONS = ("--eval-batch-size", "256", "--eval-item-tile", "65536")
TRAIN_FIELDS = {"eval_batch_size": 256, "eval_item_tile": 65536}  # the same, as TrainConfig fields


def growth(x: list[float], y: list[float]) -> float | None:
    """The slope of log y against log x (least squares); None with fewer than two points."""
    if len(x) < 2:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def bench_scale(sizes=FULL, modes=MODES, dim: int = 384, layers: int = 7, work: Path = Path("runs/bench-scale"),
                out: Path = Path("reports"), log=print, procs: tuple[int, ...] = (1, 2), threads: int | None = None,
                control: bool = True) -> Path:
    import os

    need = sum(i * layers * dim * 2 for i, _ in sizes[-1:]) * (2 if "mmap" in modes else 1) * 1.2 / 2**30
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / 2**30
    log(f"the largest size needs about {need:.1f} GiB of disk (its store and mmap copy); {free:.1f} GiB free")
    if free < need:
        raise IisanError(f"{work}: {free:.1f} GiB free, the bench needs about {need:.1f} GiB (fewer --sizes?)")
    kept = out / "bench-scale.json"  # committed: a later session (a fresh clone) continues from its rows
    done = json.loads(kept.read_text()).get("rows", []) if kept.is_file() else []
    stale = [r for r in done if r.get("options") != list(TRAIN_OPTIONS)]
    if stale:  # measured with other training options: not comparable, measured again
        log(f"{len(stale)} row(s) of {kept} were measured with other options: they are measured again")
        done = [r for r in done if r not in stale]
    rows = []
    for items, users in sizes:
        name = f"synth-{items}-{users}"
        folder, cache = work / "data" / name, work / "cache"
        if not (cache / name / "synth.zarr").exists():
            log(f"synth {name}")
            synth(SynthConfig(users=users, items=items, out=folder, dim=dim, layers=layers, cache=cache, force=True),
                  log=lambda message: None)
        for mode in modes:
            for n in procs:
                per = threads or max(1, (os.cpu_count() or 1) // n)
                previous = [r for r in done if not r.get("control") and (r["items"], r["users"], r["mode"],
                                                                         r.get("processes", 1),
                                                r.get("threads"), r.get("options")) ==
                            (items, users, mode, n, per, list(TRAIN_OPTIONS))]
                if previous:
                    rows.append(previous[0])
                    log(f"{name} {mode} x{n}: measured before ({kept})")
                    continue
                rows.append(_measure_row(folder, cache, work / "runs" / f"{mode}-{n}", name, items, users, mode, n,
                                         per, dim, layers, log))
                write_report(rows + [r for r in done if r not in rows], out, dim, layers)
    cores = threads or os.cpu_count() or 1
    if control and cores > 1 and 1 in procs and "memory" in modes:
        # The smallest size once more at 1 thread: how far the float summation order alone (2 threads' sums
        # against 1's) moves the metrics, the yardstick for the 2-process rows' differences.
        items, users = sizes[0]
        name = f"synth-{items}-{users}"
        previous = [r for r in done if r.get("control") and (r["items"], r["users"], r.get("threads"),
                                                            r.get("options")) == (items, users, 1, list(TRAIN_OPTIONS))]
        if previous:
            rows.append(previous[0])
        else:
            row = _measure_row(work / "data" / name, work / "cache", work / "runs" / "control", name, items, users,
                               "memory", 1, 1, dim, layers, log)
            rows.append({**row, "control": True})
    return write_report(rows + [r for r in done if r not in rows], out, dim, layers)


def _measure_row(folder: Path, cache: Path, runs: Path, name: str, items: int, users: int, mode: str, n: int,
                 threads: int, dim: int, layers: int, log) -> dict:
    from iisan.experiments.launch import LaunchFailed, launch
    from iisan.train.config import resolve
    from iisan.train.result import RunSpec

    shutil.rmtree(runs / name, ignore_errors=True)
    cfg = resolve({"dataset": str(folder), "text": "synth", "cache": str(cache), "out": str(runs), "epochs": 1,
                   "progress": False, "cache_mode": mode, "device": "cpu", **TRAIN_FIELDS})
    began, mark = time.perf_counter(), load_mark()
    try:
        result = launch(RunSpec(cfg), isolate=True, threads=threads, processes=n, memory=True)
    except LaunchFailed as e:
        raise IisanError(f"{name} ({mode}, {n} processes) failed: {e}") from None
    peaks = {**result.memory, "others_cpu_share": load_since(mark)[1]}
    seed = result.seeds[0]
    epoch = json.loads((result.run_dir / f"seed-{seed.seed}" / "metrics.jsonl").read_text().splitlines()[0])
    interactions = sum(len(line.split("\t", 1)[1].split()) for line in
                       (folder / "users.tsv").read_text().splitlines())
    row = {"commit": git_commit(), "items": items, "users": users, "interactions": interactions, "mode": mode, "processes": n,
           "threads": threads, "options": list(TRAIN_OPTIONS), "epoch_seconds": seed.seconds_per_epoch,
           "eval_seconds": seed.seconds_per_evaluation, "peak_rss_anon_mib": peaks["RssAnon"],
           "peak_rss_mib": peaks["VmRSS"], "total_rss_anon_mib": peaks["RssAnon total"],
           "wall_seconds": time.perf_counter() - began, "test_HR@10": result.mean("HR@10", "test"),
           "test": result.means("test"), "loss": epoch["loss"],
           "state_gib": (items + 1) * layers * dim * 2 / 2**30, "others_cpu_share": peaks["others_cpu_share"]}
    log(f"{name} {mode} x{n}: epoch {row['epoch_seconds']:.1f} s, evaluation {row['eval_seconds']:.1f} s, peak "
        f"RssAnon {row['peak_rss_anon_mib']:.0f} MiB per process (VmRSS {row['peak_rss_mib']:.0f}), test HR@10 "
        f"{100 * row['test_HR@10']:.2f}{_contended_note(row)}")
    return row


def _contended(row: dict) -> bool:
    """Whether other processes used more than CONTENDED of the machine's CPU while the row ran."""
    return (row.get("others_cpu_share") or 0.0) > CONTENDED


def _contended_note(row: dict) -> str:
    return (f" (taken under contention: others used {100 * row['others_cpu_share']:.0f} % of the CPU)"
            if _contended(row) else "")



def _group(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        if not r.get("control"):  # the thread-count control is no point of the ladder
            out.setdefault(f"{r['mode']} x{r.get('processes', 1)}", []).append(r)
    return out


def _same_as_one(row: dict, rows: list[dict]) -> str:
    """For a multi-process row (and the 1-thread control): whether its test metrics equal those of the
    1-process run of the same size and mode."""
    if row.get("processes", 1) == 1 and not row.get("control"):
        return ""
    one = _one_process_row(row, rows)
    return "no 1-process run" if one is None else _compare(row, one)


def _compare(row: dict, other: dict) -> str:
    """Whether two runs' test metrics are equal, else by how much the furthest one moved."""
    if other.get("test") == row.get("test"):
        return "equal"
    moved = max(abs(other["test"][k] - row["test"][k]) for k in row["test"])
    return f"differs (max {100 * moved:.3f} points)"


def _one_process_row(row: dict, rows: list[dict]) -> dict | None:
    """The ladder's 1-process run (not the control) of the row's size and mode."""
    return next((r for r in rows if (r["items"], r["users"], r["mode"], r.get("processes", 1)) ==
                 (row["items"], row["users"], row["mode"], 1) and not r.get("control")), None)


def targets(rows: list[dict], fits: dict) -> list[str]:
    """The issue's targets on 2 CPU cores, each as held / missed with its figure."""
    out, groups = [], _group(rows)
    doubt = " (from a time taken under contention †: not conclusive)"
    for group, fit in sorted(fits.items()):
        e = fit["epoch_seconds"]
        if e is not None:
            out.append(f"- epoch time linear in interactions ({group}): exponent {e:.2f} "
                       f"{'≤' if e <= 1.1 else '>'} 1.1 — {'holds' if e <= 1.1 else 'missed'}"
                       f"{doubt if any(_contended(r) for r in groups.get(group, [])) else ''}")
    largest = max((r["items"] for r in rows), default=0)
    big = {(r["mode"], r.get("processes", 1)): r for r in rows if r["items"] == largest and not r.get("control")}
    if ("mmap", 1) in big:
        m = big[("mmap", 1)]
        ok = m["peak_rss_anon_mib"] <= 2048
        out.append(f"- mmap peak RssAnon at {largest:,} items: {m['peak_rss_anon_mib']:,.0f} MiB "
                   f"{'≤' if ok else '>'} 2,048 — {'holds' if ok else 'missed'}")
        if ("memory", 1) in big:
            ratio = m["epoch_seconds"] / big[("memory", 1)]["epoch_seconds"]
            out.append(f"- mmap epoch time at {largest:,} items: {ratio:.2f} × memory mode's "
                       f"{'≤' if ratio <= 1.5 else '>'} 1.5 — {'holds' if ratio <= 1.5 else 'missed'}"
                       f"{doubt if _contended(m) or _contended(big[('memory', 1)]) else ''}")
    multi = [r for r in rows if r.get("processes", 1) > 1]
    if multi:
        same = [_same_as_one(r, rows) == "equal" for r in multi]
        out.append(f"- 2 processes give the metrics of 1: {sum(same)} of {len(same)} runs equal — "
                   f"{'holds' if all(same) else 'missed'}")
    for r in rows:
        if r.get("control"):
            one = _one_process_row(r, rows)
            out.append(f"- for scale (no target): 1 process at 1 thread instead of "
                       f"{one.get('threads') if one else '?'} at {r['items']:,} items: {_same_as_one(r, rows)}")
            # The same threads per process on both sides: what the process count alone moves.
            two = next((m for m in multi if (m["items"], m["users"], m["mode"], m.get("threads")) ==
                        (r["items"], r["users"], r["mode"], r.get("threads"))), None)
            if two is not None:
                out.append(f"- for scale (no target): {two.get('processes')} processes against 1 process, both at "
                           f"{r.get('threads')} thread(s) each, at {r['items']:,} items: {_compare(two, r)}")
    return out


def write_report(rows: list[dict], out: Path, dim: int, layers: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iisan.evaluate.efficiency import device_name
    from iisan.runtime import pick_device

    groups = _group(rows)
    fits = {}
    for group, mine in groups.items():
        fits[group] = {"epoch_seconds": growth([r["interactions"] for r in mine], [r["epoch_seconds"] for r in mine]),
                       "eval_seconds": growth([r["items"] * r["users"] for r in mine],
                                              [r["eval_seconds"] for r in mine]),
                       "peak_rss_anon_mib": growth([r["items"] for r in mine], [r["peak_rss_anon_mib"] for r in mine])}
    out.mkdir(parents=True, exist_ok=True)
    threads = sorted({r.get("threads", 0) for r in rows})
    meta = {"commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(pick_device()), "threads_per_process": threads, "dim": dim, "layers": layers,
            "command": "python -m iisan.experiments.scale " + " ".join(sys.argv[1:]), "rows": rows, "growth": fits,
            "targets": targets(rows, fits)}
    (out / "bench-scale.json").write_text(json.dumps(meta, indent=2))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for (group, mine), marker in zip(sorted(groups.items()), "os^v"):
        axes[0].loglog([r["interactions"] for r in mine], [r["epoch_seconds"] for r in mine], marker + "-",
                       label=group)
        axes[1].loglog([r["items"] * r["users"] for r in mine], [r["eval_seconds"] for r in mine], marker + "-",
                       label=group)
        axes[2].loglog([r["items"] for r in mine], [r["peak_rss_anon_mib"] for r in mine], marker + "-", label=group)
    for ax, (x, y) in zip(axes, [("interactions", "s / epoch"), ("items x users", "s / evaluation"),
                                 ("items", "peak RssAnon per process (MiB)")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench-scale.png", dpi=110)
    plt.close(fig)
    lines = ["# Scale bench: cost against size (synthetic data)", "",
             f"- command: `{meta['command']}`", f"- commit {meta['commit']}, {meta['date']}; {meta['device']}, "
             f"each row on the whole machine (torch threads per process: cores / processes); states {layers} x "
             f"{dim}, fp16; one epoch, then the test pass (s / evaluation: the epoch's full-ranking valid pass "
             f"over every user and item); every run with `{' '.join(TRAIN_OPTIONS)}`; commit / date: the "
             "report's; each row's own commit is its last column", "",
             "| items | users | interactions | mode | processes | threads each | states (GiB) | s / epoch "
             "| s / evaluation | peak RssAnon per process (MiB) | peak RssAnon, all (MiB) | peak VmRSS (MiB) "
             "| test HR@10 | metrics vs 1 process | commit |", "|---" * 15 + "|"]
    lines += [f"| {r['items']:,} | {r['users']:,} | {r['interactions']:,} | {r['mode']} | {r.get('processes', 1)} "
              f"| {r.get('threads', '')}{' (control)' if r.get('control') else ''} | {r['state_gib']:.2f} | {r['epoch_seconds']:.1f}{' †' if _contended(r) else ''} "
              f"| {r['eval_seconds']:.1f}{' †' if _contended(r) else ''} "
              f"| {r['peak_rss_anon_mib']:,.0f} | {r.get('total_rss_anon_mib', r['peak_rss_anon_mib']):,.0f} "
              f"| {r['peak_rss_mib']:,.0f} | {100 * r['test_HR@10']:.2f} | {_same_as_one(r, rows)} "
              f"| {r.get('commit', '')[:7]} |" for r in rows]
    if any(_contended(r) for r in rows):
        lines += ["", f"† taken under contention: other processes used more than {CONTENDED:.0%} of the machine's CPU "
                      "while the row ran (`others_cpu_share` in the JSON); its times are high, its metrics and "
                      "memory are not affected. Rows measured before this was recorded carry no share."]
    lines += ["", "Growth exponents (slope of log figure against log size):", ""]
    for group, fit in sorted(fits.items()):
        shown = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in fit.items())
        lines.append(f"- {group}: {shown} (epoch time against interactions, evaluation against items x users, "
                     f"RssAnon against items)")
    lines += ["", "Targets (2 CPU cores):", "", *meta["targets"], "", "![scale](bench-scale.png)", ""]
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
    parser.add_argument("--procs", default="1,2", help="process counts (torchrun past 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: the cores divided by the process count)")
    args = parser.parse_args()
    sizes = tuple(tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",") if s) or FULL
    try:
        print(bench_scale(sizes, tuple(args.modes.split(",")), args.dim, args.layers, args.work, args.out,
                          procs=tuple(int(n) for n in args.procs.split(",")), threads=args.threads))
    except IisanError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
