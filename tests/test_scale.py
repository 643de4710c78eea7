"""Past memory (issue 17): `--cache-mode mmap` gathers batches from a memory-mapped copy of the needed states
and trains exactly as the in-memory mode; evaluation in item tiles ranks exactly as the whole row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from iisan.train.config import resolve
from iisan.train.data import standardization, streamed_standardization
from iisan.train.recipe import train

from conftest import options


@pytest.fixture()
def cache(env, tmp_path):
    shutil.copytree(env / "cache" / "toy", tmp_path / "cache" / "toy")
    return tmp_path / "cache"


def run(env, cache, out, **extra):
    messages = []
    result = train(resolve({**options(env, out, **extra), "cache": str(cache)}), log=messages.append)
    return result, messages


@pytest.mark.slow
def test_mmap_mode_trains_exactly_as_memory_mode_and_reuses_its_file(env, cache, tmp_path, capsys):
    memory, _ = run(env, cache, tmp_path / "memory")
    mapped, _ = run(env, cache, tmp_path / "mmap", cache_mode="mmap")
    assert mapped.seeds[0].valid == memory.seeds[0].valid
    assert mapped.seeds[0].test == memory.seeds[0].test
    for store in ("tiny-bert.zarr", "tiny-dino.zarr"):
        folder = cache / "toy" / f"{store}.mmap"
        files = sorted(p.suffix for p in folder.iterdir())
        assert files == [".json", ".npy"]  # one mapped copy and its key, no leftovers
    npy = next((cache / "toy" / "tiny-bert.zarr.mmap").glob("*.npy"))
    before = npy.stat().st_mtime_ns
    again, _ = run(env, cache, tmp_path / "again", cache_mode="mmap")
    assert npy.stat().st_mtime_ns == before and again.seeds[0].test == memory.seeds[0].test
    # a copy an interrupted run left (its key not yet written) is detected and rebuilt
    npy.with_suffix(".json").unlink()
    capsys.readouterr()
    rebuilt, _ = run(env, cache, tmp_path / "rebuilt", cache_mode="mmap")
    assert "rebuilding the memory-mapped copy (left incomplete by an interrupted run)" in capsys.readouterr().err
    assert npy.with_suffix(".json").is_file() and rebuilt.seeds[0].test == memory.seeds[0].test


def test_mmap_mode_standardises_like_memory_mode(env, cache, tmp_path):
    memory, _ = run(env, cache, tmp_path / "memory", standardize="dim", pipeline="text-only")
    mapped, _ = run(env, cache, tmp_path / "mmap", standardize="dim", pipeline="text-only", cache_mode="mmap")
    for split in ("valid", "test"):
        for metric, value in getattr(memory.seeds[0], split).items():
            assert getattr(mapped.seeds[0], split)[metric] == pytest.approx(value, abs=0.02), (split, metric)
    assert len(list((cache / "toy" / "tiny-bert.zarr.mmap").glob("*-dim-*.npy"))) == 1


@pytest.mark.parametrize("per", ["dim", "layer"])
def test_streamed_statistics_equal_the_in_memory_ones(per):
    g = torch.Generator().manual_seed(0)
    states = torch.randn(1000, 3, 8, generator=g) * 5 + 2
    in_training = torch.rand(1000, generator=g) < 0.7
    mean, std = standardization(states, in_training, per)
    streamed = streamed_standardization(states, in_training, per)
    torch.testing.assert_close(streamed[0], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed[1], std, rtol=1e-5, atol=1e-5)


def test_item_tiles_give_the_metrics_of_the_whole_row(env, cache, tmp_path):
    whole, _ = run(env, cache, tmp_path / "whole")
    tiled, _ = run(env, cache, tmp_path / "tiled", eval_item_tile=7)
    assert tiled.seeds[0].test == whole.seeds[0].test
    assert tiled.seeds[0].raw["ties"]["test_tied"] == whole.seeds[0].raw["ties"]["test_tied"]
    # tiled, the users are scored in target order (evaluate): each user's rank comes back to its own row
    ranks = [np.load(next(Path(d).rglob("ranks.npz"))) for d in (tmp_path / "whole", tmp_path / "tiled")]
    for split in ("valid", "test"):
        assert np.array_equal(ranks[0][split], ranks[1][split]) and ranks[0][split].std() > 0


@pytest.mark.slow
def test_synthetic_data_trains_above_chance_and_is_deterministic(tmp_path):
    """`iisan data synth` writes a dataset and a complete, verifiable store; training on it learns the planted
    structure (HR@10 far above the 10 / items of chance); the same seed writes the same files."""
    import json

    from click.testing import CliRunner

    from iisan.cache_store import open_cache
    from iisan.cli import main as iisan_cli

    def make(out: Path, cache: Path) -> Path:
        result = CliRunner().invoke(iisan_cli, ["data", "synth", "--users", "600", "--items", "400", "--dim", "32",
                                                "--layers", "3", "--seed", "5", "--out", str(out), "--cache", str(cache)])
        assert result.exit_code == 0, result.output
        return cache / out.name / "synth.zarr"

    store = make(tmp_path / "syn", tmp_path / "cache")
    with open_cache(store) as s:
        m = s.manifest
        assert (m.rows, m.layers, m.hidden_size, m.complete, m.model) == (401, [0, 1, 2], 32, True, "synth")
    assert len((tmp_path / "syn" / "users.tsv").read_text().splitlines()) == 600
    verify = CliRunner().invoke(iisan_cli, ["data", "stats", str(tmp_path / "syn")])
    assert verify.exit_code == 0 and "600" in verify.output
    again = make(tmp_path / "other" / "syn", tmp_path / "cache2")
    for name in ("items.tsv", "users.tsv"):
        assert (tmp_path / "syn" / name).read_bytes() == (tmp_path / "other" / "syn" / name).read_bytes()
    with open_cache(store) as a, open_cache(again) as b:
        assert (a.backend.read_rows(0, 401) == b.backend.read_rows(0, 401)).all()
    result = CliRunner().invoke(iisan_cli, ["train", "--dataset", str(tmp_path / "syn"), "--text", "synth",
                                            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"),
                                            "--epochs", "4", "--no-progress", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    report = json.loads((Path(result.output.strip().splitlines()[-1]) / "report.json").read_text())
    assert report["test"]["HR@10"]["mean"] > 5 * 10 / 400  # chance is 2.5 %
    bad = CliRunner().invoke(iisan_cli, ["data", "synth", "--users", "5", "--items", "30", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "fewer than two clusters of 20" in bad.output


def test_the_scale_bench_fits_exponents():
    from iisan.experiments.scale import growth

    assert growth([1e3, 1e4, 1e5], [2.0, 20.0, 200.0]) == pytest.approx(1.0)
    assert growth([1e3, 1e4], [1.0, 100.0]) == pytest.approx(2.0) and growth([5.0], [1.0]) is None
    # its memory sampling is the launcher's (tests/test_launch.py)


def test_the_scale_report_compares_process_counts_and_keeps_the_control_out_of_the_fits(tmp_path):
    from iisan.experiments.scale import write_report

    def row(items, mode, procs, threads, hr, epoch, **extra):
        return {"items": items, "users": items // 5, "interactions": items * 2, "mode": mode, "processes": procs,
                "threads": threads, "epoch_seconds": epoch, "eval_seconds": 1.0, "peak_rss_anon_mib": 900.0,
                "peak_rss_mib": 1000.0, "test_HR@10": hr, "test": {"HR@10": hr, "NDCG@10": hr / 2},
                "state_gib": 0.1, **extra}

    rows = [row(1000, "memory", 1, 2, 0.30, 10.0), row(1000, "memory", 2, 1, 0.30, 12.0),
            row(2000, "memory", 1, 2, 0.40, 20.0), row(2000, "memory", 2, 1, 0.4005, 24.0, others_cpu_share=0.4),
            row(1000, "memory", 1, 1, 0.3002, 99.0, control=True)]
    report = json.loads((write_report(rows, tmp_path, 8, 2).with_suffix(".json")).read_text())
    # the control's 99 s would bend the 1-process fit: it is left out (10 s -> 20 s over 2x interactions)
    assert report["growth"]["memory x1"]["epoch_seconds"] == pytest.approx(1.0)
    assert "- 2 processes give the metrics of 1: 1 of 2 runs equal — missed" in report["targets"]
    assert ("- for scale (no target): 1 process at 1 thread instead of 2 at 1,000 items: differs (max 0.020 "
            "points)") in report["targets"]
    # 2 processes at 1 thread each against the control, 1 process at 1 thread: 0.30 against 0.3002
    assert ("- for scale (no target): 2 processes against 1 process, both at 1 thread(s) each, at 1,000 items: "
            "differs (max 0.020 points)") in report["targets"]
    text = (tmp_path / "bench-scale.md").read_text()
    # taken while others used 40 % of the CPU: its times and the fit through them are marked
    assert "| 2,000 | 400 | 4,000 | memory | 2 | 1 | 0.10 | 24.0 † | 1.0 † |" in text and "1 (control)" in text
    fit2 = next(t for t in report["targets"] if "(memory x2)" in t)
    fit1 = next(t for t in report["targets"] if "(memory x1)" in t)
    assert "not conclusive" in fit2 and "not conclusive" not in fit1 and "† taken under contention" in text


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="madvise / mincore: Linux")
def test_read_ahead_brings_a_mapped_files_pages_into_memory_without_touching_them(tmp_path):
    import ctypes
    import mmap
    import os
    import time

    from iisan.cache_store.reader import READ_AHEAD_STEP, read_ahead

    path = tmp_path / "states.npy"
    values = np.arange(1100 * 7 * 384, dtype=np.float32).astype(np.float16).reshape(-1, 7, 384)  # 5.6 MiB
    np.save(path, values)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # its clean pages dropped from the page cache
    os.close(fd)
    tensor = torch.from_numpy(np.lib.format.open_memmap(path, mode="r+"))
    libc = ctypes.CDLL(None, use_errno=True)

    def resident() -> float:
        start = tensor.data_ptr() - tensor.data_ptr() % mmap.PAGESIZE
        length = tensor.data_ptr() + tensor.numel() * 2 - start
        vec = (ctypes.c_ubyte * -(-length // mmap.PAGESIZE))()
        assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) == 0
        return sum(v & 1 for v in vec) / len(vec)

    if resident() > 0.5:
        pytest.skip("the page cache kept the file's pages after POSIX_FADV_DONTNEED")
    assert tensor.numel() * 2 > 8 * READ_AHEAD_STEP
    assert not read_ahead(tensor, share=1e-12)  # more than that share of the memory available: nothing asked
    assert not read_ahead(tensor.to("meta"))        # not in host memory: nothing mapped to advise
    assert resident() < 0.5
    assert read_ahead(tensor)
    for _ in range(100):  # asynchronous: the reads finish behind the calls
        if resident() == 1.0:
            break
        time.sleep(0.05)
    assert resident() == 1.0
    assert torch.equal(tensor, torch.from_numpy(values))
