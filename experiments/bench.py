"""`iisan bench`: every method on the same data, encoders, seed and batch size; cost (and with --full, quality)
side by side, written to reports/bench-<dataset>.md with two PNG plots.

Cached IISAN's cost excludes the one-off extraction, which is reported apart (read from the cache manifests;
the caches are extracted first if they are missing, which is resumable and a no-op when complete).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from iisan.evaluate.efficiency import MEMORY_FRACTION, device_name, total_memory_mib, tpme
from iisan.experiments.cost import run_measurement
from iisan.experiments.launch import launch
from iisan.registry import dataset_name
from iisan.runtime import git_commit, pick_device
from iisan.train.methods import BENCH_METHODS as DEFAULT_METHODS
from iisan.train.result import RunSpec

PAPER_RATIOS = {"fft_over_cached_time": (443 / 22, "443 s / 22 s"),
                "uncached_over_cached_time": (179 / 22, "179 s / 22 s"),
                "fft_over_cached_memory": (46.76 / 3.11, "46.76 GB / 3.11 GB")}


@dataclass
class BenchConfig:
    dataset: str = field(metadata={"help": "Dataset: a name in the registry, or a dataset folder (a path)"})
    pipeline: str = field(default="", metadata={"help": "Pipeline (default: the dataset's)"})
    text: str = field(default="", metadata={"help": "Text encoder (MODEL[@FIELD]); default: the pipeline's"})
    image: str = field(default="", metadata={"help": "Image encoder; default: the pipeline's"})
    text_only: bool = field(default=False, metadata={"help": "drop the pipeline's image slot"})
    methods: tuple[str, ...] = field(default=DEFAULT_METHODS, metadata={"help": "methods, in table order"})
    batch_size: int = field(default=0, metadata={"help": "Users per batch of the table's steps (0: 8 on CPU, 32 on GPU)"})
    sweep: tuple[int, ...] = field(default=(), metadata={
        "help": "batch sizes for the memory plot (default: 1, 2, 4, 8 on CPU; up to 32 on a GPU)"})
    warmup: int = field(default=1, metadata={"help": "untimed steps before timing"})
    steps: int = field(default=3, metadata={"help": "at most this many timed steps at the table's batch size"})
    budget: float = field(default=20.0, metadata={
        "help": "stop timing (after at least one step) once this many seconds have been timed"})
    full_epoch_under: float = field(default=60.0, metadata={
        "help": "run the whole epoch (label 'measured') when its projection is under this many seconds"})
    max_seconds: float = field(default=900.0, metadata={"help": "stop one measurement after this long"})
    cache: str = field(default="", metadata={"help": "Cache root (default $IISAN_CACHE_DIR, else cache/)",
                                             "option": "--cache-dir"})
    device: str = field(default="auto", metadata={"help": "Device: auto | cpu | cuda"})
    out: str = field(default="reports", metadata={"help": "Reports folder", "option": "--reports-dir"})
    full: bool = field(default=False, metadata={"help": "also train every method to convergence (test metrics)"})
    epochs: int = field(default=0, metadata={"help": "Maximum epochs of every method with --full (0: its own)"})
    patience: int = field(default=0, metadata={"help": "Early-stopping patience of every method with --full (0: each method's own)"})
    runs: str = field(default="runs", metadata={"help": "Runs root of --full", "option": "--runs-dir"})
    command: str = field(default="", metadata={"help": "the command line, for the report header"})


def train_options(bench: BenchConfig, method: str, batch_size: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {"dataset": bench.dataset, "method": method, "cache": bench.cache,
                               "device": bench.device, "progress": False, "out": bench.runs,
                               "epochs": bench.epochs or None, "patience": bench.patience or None}
    if bench.pipeline:
        options["pipeline"] = bench.pipeline
    if bench.text:
        options["text"] = bench.text
    if bench.image:
        options["image"] = bench.image
    if bench.text_only:
        options["image"] = options["text2"] = ""
    if batch_size:
        options["batch_size"] = batch_size
    return options


def ensure_caches(cfg, log) -> dict[str, float]:
    """Extract any missing or unfinished cache the cached methods read; returns each source's recorded
    extraction seconds."""
    from iisan.cache_store import open_cache
    from iisan.extract.run import ExtractConfig, run_extraction
    from iisan.train.data import slot_sources, slot_store

    seconds = {}
    name = dataset_name(cfg.dataset)
    for slot, source in slot_sources(cfg).items():
        path, _ = slot_store(cfg, name, source)
        complete = False
        if path is not None:
            with open_cache(path) as store:
                complete = store.manifest.complete
        if not complete:
            log(f"extracting {source} on {cfg.dataset} (once; cached IISAN reads it)")
            run_extraction(ExtractConfig(model=source.model, dataset=cfg.dataset, text_field=source.field,
                                         out=cfg.cache, progress=False), log=log)
            path, _ = slot_store(cfg, name, source)
        with open_cache(path) as store:
            seconds[str(source)] = store.manifest.extraction_seconds
    log("caches ready: " + ", ".join(f"{s} (extraction {v:.0f} s)" if v else f"{s} (extraction time not recorded)"
                                     for s, v in seconds.items()))
    return seconds


def run_bench(bench: BenchConfig, log=print) -> Path:
    import torch

    from iisan.train.config import resolve

    device = pick_device(bench.device)
    gpu = device.type == "cuda"
    batch = bench.batch_size or (32 if gpu else 8)
    sweep = sorted(set(bench.sweep or ((1, 2, 4, 8, 16, 32) if gpu else (1, 2, 4, 8))) | {batch})
    if gpu:
        limit = MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory / 2**20
    else:
        limit = MEMORY_FRACTION * total_memory_mib()
    base_cfg = resolve(train_options(bench, "iisan", batch))
    extraction = ensure_caches(base_cfg, log)
    rows: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    for method in bench.methods:
        previous: list[tuple[int, float]] = []
        for b in sweep:
            cfg = resolve(train_options(bench, method, b))
            main = b == batch
            # Every point runs warm-up + at least one step, so its peak includes Adam's state (allocated in
            # the first step) alongside a step's activations; the sweep points time that one step only.
            result = run_measurement(cfg.to_dict(), warmup=max(bench.warmup, 1),
                                     steps=bench.steps if main else 1, budget=bench.budget if main else 0.0,
                                     full_epoch_under=bench.full_epoch_under if main else 0.0,
                                     limit_mib=limit, max_seconds=bench.max_seconds, previous=previous, log=log)
            if result.get("status") == "ok":
                previous.append((b, result["peak_memory_mib"]))
            log(_progress_line(result, main))
            sweep_rows.append(result)
            if main:
                rows.append(result)
    tpme(rows)
    if bench.full:
        for row in rows:
            log(f"--full: training {row['method']} with its own presets (a finished run with the same config "
                f"is reused, an unfinished one resumed)")
            # its own process: a process's peak memory only grows, so in one process each run's recorded peak
            # would include every earlier method's
            result = launch(RunSpec(resolve(train_options(bench, row["method"], None)), reuse=True), isolate=True,
                            show_output=True)
            summary = result.to_dict()
            row["test"] = summary["test"]
            row["groups"] = (summary.get("groups") or {}).get("test") or {}
            row["full_run"] = str(result.run_dir)
            row["full_epochs"] = [(s.best_epoch, s.epochs) for s in result.seeds]
            row["full_capped"] = result.capped
            row["full_seconds_per_epoch"] = result.seconds_per_epoch
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(bench)
    report = out / f"{stem}.md"
    plots = plot(rows, sweep_rows, out, stem, bench.dataset)
    report.write_text(markdown(bench, base_cfg, device, batch, rows, sweep_rows, extraction, plots, limit))
    # the figures as data: what tests and later tools read (the markdown is their rendering)
    (out / f"{stem}.json").write_text(json.dumps(
        {"command": bench.command, "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
         "dataset": bench.dataset, "device": device_name(device), "batch_size": batch, "limit_mib": limit,
         "extraction_seconds": extraction, "rows": rows, "sweep": sweep_rows}, indent=2, default=str))
    log(f"wrote {report} ({stem}.json) and {', '.join(str(p) for p in plots)}")
    return report


def _group_cell(entry: dict[str, Any] | None) -> str:
    """`x (n)`: a group's test HR@10 in percent and its user count; empty for runs without the split."""
    if not entry:
        return ""
    hr = entry["HR@10"]
    return f"{100 * hr['mean']:.2f} ({entry['users']:,})" if hr is not None else f"n/a ({entry['users']:,})"


def report_stem(bench: BenchConfig) -> str:
    """bench-<dataset>, with -text-only and -full when those apply, so that they do not overwrite the default."""
    return f"bench-{dataset_name(bench.dataset)}" + ("-text-only" if bench.text_only else "") + ("-full" if bench.full else "")


def _progress_line(r: dict[str, Any], main: bool) -> str:
    what = f"{r['method']} batch {r['batch_size']}"
    if r.get("status") != "ok":
        return f"{what}: {r.get('status')} ({r.get('note', '')})"
    timing = f"{r['seconds_per_step']:.3f} s/step"
    timing += f" ({r['steps_timed']} timed), {r['seconds_per_epoch']:.1f} s/epoch ({r['epoch']}), " if main else ", "
    return f"{what}: {timing}peak {r['peak_memory_mib']:,.0f} MiB"


def _ratio(rows: dict[str, dict[str, Any]], top: str, bottom: str, key: str) -> float | None:
    a, b = rows.get(top), rows.get(bottom)
    if not a or not b or a.get("status") != "ok" or b.get("status") != "ok" or not b[key]:
        return None
    return a[key] / b[key]


def markdown(bench: BenchConfig, cfg, device, batch: int, rows: list[dict[str, Any]],
             sweep_rows: list[dict[str, Any]], extraction: dict[str, float], plots: list[Path], limit: float) -> str:
    import torch

    commit = git_commit(short=True) or "unknown"
    encoders = cfg.text + (f" + {cfg.image}" if cfg.image else "") + (f" + {cfg.text2}" if cfg.text2 else "")
    first_ok = next((r for r in rows if r.get("status") == "ok"), {})
    lines = [f"# Training cost on {bench.dataset}: {encoders}", "",
             f"- command: `{bench.command or 'iisan bench --dataset ' + bench.dataset}`",
             f"- commit {commit}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- device: {device_name(device)}; torch {torch.__version__}, {first_ok.get('threads', torch.get_num_threads())} "
             f"threads; Python {sys.version.split()[0]}",
             f"- every method: same data, encoders, seed {cfg.seed}, batch size {batch} users; s/step is the mean "
             f"of the timed steps after {max(bench.warmup, 1)} warm-up step(s): 1 to {bench.steps}, stopping once "
             f"{bench.budget:.0f} s are timed (column \"timed\"); s/epoch = s/step × steps per epoch "
             f"(\"projected\"), or a whole epoch run when that is under {bench.full_epoch_under:.0f} s (\"measured\")",
             f"- peak memory: {first_ok.get('memory_kind', 'peak resident set (VmHWM)')} of a fresh process per "
             f"(method, batch size)"
             + ("" if device.type == "cuda" else ", which includes Python and the imported libraries (torch, "
                                                 "transformers, peft): the same floor for every method, given apart; "
                                                 "\"above floor\" is what the method itself (data, model, "
                                                 "activations, optimizer) added")
             + f"; a run past {limit:,.0f} MiB ({MEMORY_FRACTION:.0%} of memory) is recorded as out of memory",
             "- TPME = 0.45·time + 0.1·params + 0.45·memory, each min-max normalised over this table (lower is better)",
             *([f"- test HR@10 / NDCG@10 (%): each method trained with its own presets (batch size, learning rates) "
                f"by `iisan train`, early stopping on valid HR@10 with patience "
                f"{bench.patience or 'per method'}, "
                + (f"capped at {bench.epochs} epochs" if bench.epochs else "up to each method's maximum epochs")
                + "; \"epochs\" is best / run, \"(cap)\" where the cap, not early stopping, ended the run (valid "
                  "HR@10 may still have been rising), and \"train s/epoch\" the mean epoch time of that run"]
               if bench.full else []),
             "- cached IISAN excludes the one-off extraction: " + (", ".join(
                 f"{s} {v:.0f} s" if v else f"{s} not recorded" for s, v in extraction.items()) or "none"), "",
             "| method | batch | s/step | timed | s/epoch | epoch | peak memory (MiB) | above floor (MiB) "
             "| trainable params | total params | TPME | time ÷ FFT | memory ÷ FFT |"
             + (" test HR@10 | test NDCG@10 | warm HR@10 (users) | cold HR@10 (users) | epochs | train s/epoch |"
                if bench.full else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|---|---|" if bench.full else "")]
    by_method = {r["method"]: r for r in rows}
    fft = by_method.get("fft")
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['batch_size']} | {r['status']} | | | | "
                         f"{r.get('peak_memory_mib', 0):,.0f} | | | | | | |" + (" | | | | | |" if bench.full else ""))
            continue
        time_ratio = f"{r['seconds_per_epoch'] / fft['seconds_per_epoch']:.3f}" if fft and fft.get("status") == "ok" else ""
        mem_ratio = f"{r['peak_memory_mib'] / fft['peak_memory_mib']:.3f}" if fft and fft.get("status") == "ok" else ""
        quality = ""
        if bench.full and "test" in r:
            epochs = ", ".join(f"{best}/{run}" for best, run in r["full_epochs"])
            epochs += " (cap)" if r.get("full_capped") else ""
            groups = " | ".join(_group_cell(r.get("groups", {}).get(g)) for g in ("warm", "cold"))
            quality = (f" {100 * r['test']['HR@10']['mean']:.2f} | {100 * r['test']['NDCG@10']['mean']:.2f} "
                       f"| {groups} | {epochs} | {r['full_seconds_per_epoch']:.1f} |")
        elif bench.full:
            quality = " | | | | | |"
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['seconds_per_step']:.3f} | {r['steps_timed']} "
                     f"| {r['seconds_per_epoch']:.1f} "
                     f"| {r['epoch']} | {r['peak_memory_mib']:,.0f} | {r['peak_memory_mib'] - r.get('floor_mib', 0):,.0f} "
                     f"| {r['trainable_parameters']:,} "
                     f"| {r['total_parameters']:,} | {r.get('tpme', 0):.3f} | {time_ratio} | {mem_ratio} |{quality}")
    lines += ["", "Ratios that matter (ours, this table; the papers' on one A6000 with BERT-base + ViT-base):", ""]
    for key, (top, bottom, measure) in {"fft_over_cached_time": ("fft", "iisan", "seconds_per_epoch"),
                                         "uncached_over_cached_time": ("iisan-uncached", "iisan", "seconds_per_epoch"),
                                         "fft_over_cached_memory": ("fft", "iisan", "peak_memory_mib")}.items():
        ours = _ratio(by_method, top, bottom, measure)
        paper, how = PAPER_RATIOS[key]
        label = {"seconds_per_epoch": "s/epoch", "peak_memory_mib": "peak memory"}[measure]
        extra = ""
        if measure == "peak_memory_mib" and ours is not None and device.type != "cuda":
            a, b = by_method[top], by_method[bottom]
            above = (a["peak_memory_mib"] - a["floor_mib"]) / max(b["peak_memory_mib"] - b["floor_mib"], 1e-9)
            extra = f"; above the import floor: **{above:.1f}×**"
        lines.append(f"- {top} ÷ cached iisan, {label}: "
                     + (f"**{ours:.1f}×**" if ours is not None else "n/a") + extra + f" (papers: {paper:.1f}×, {how})")
    sizes = sorted({r["batch_size"] for r in sweep_rows})
    for title, cell in (("Peak memory (MiB)", lambda r: f"{r['peak_memory_mib']:,.0f}"),
                        ("Seconds per step (one step after warm-up; the table's batch size: as above)",
                         lambda r: f"{r['seconds_per_step']:.3f}")):
        lines += ["", f"{title} by batch size:", "", "| method | " + " | ".join(str(b) for b in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for method in bench.methods:
            cells = []
            for b in sizes:
                r = next((x for x in sweep_rows if x["method"] == method and x["batch_size"] == b), None)
                cells.append("" if r is None else cell(r) if r.get("status") == "ok" else f"{r.get('status')}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], sweep_rows: list[dict[str, Any]], out: Path, stem: str,
         dataset: str) -> list[Path]:
    """Time and memory per method (the papers' Figure 5), and memory against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("status") == "ok"]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in done]
    for ax, key, label in ((axes[0], "seconds_per_epoch", "seconds per epoch (log scale)"),
                           (axes[1], "peak_memory_mib", "peak memory (MiB)")):
        bars = ax.bar(names, [r[key] for r in done], color=["#c44e52" if n == "iisan" else "#4c72b0" for n in names])
        ax.set_ylabel(label)
        if key == "seconds_per_epoch":
            ax.set_yscale("log")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.tick_params(axis="x", rotation=30)
    batch = done[0]["batch_size"] if done else 0
    fig.suptitle(f"{dataset}: training cost per method, batch size {batch}")
    fig.tight_layout()
    paths.append(out / f"{stem}-cost.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in sweep_rows):
        points = sorted((r["batch_size"], r["peak_memory_mib"]) for r in sweep_rows
                        if r["method"] == method and r.get("status") == "ok")
        if points:
            ax.plot([b for b, _ in points], [m for _, m in points], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (users)")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(f"{dataset}: peak memory vs batch size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / f"{stem}-memory.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
