"""The embedded baselines and uncached IISAN on tiny encoders (tiny BERT + tiny DINOv2, 3 blocks, 32-d):
which parameters train, that one step moves exactly those, that training lowers the loss, that LoRA keeps the
pretrained weights, and that uncached IISAN equals cached IISAN."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from iisan.train.config import resolve
from iisan.train.data import train_batches
from iisan.train.recipe import build_model, checkpoint_state, optimizer_for, setup, train

from conftest import options

BACKBONE_METHODS = ("iisan-uncached", "fft", "adapter", "lora", "bitfit")
BLOCKS, HIDDEN, BOTTLENECK = 3, 32, 64


def built(env, tmp_path, method: str, **extra):
    cfg = resolve(options(env, tmp_path, method=method, **extra))
    s = setup(cfg)
    torch.manual_seed(0)
    return cfg, s, build_model(s)


def backbone_trainable(model) -> dict[str, set[str]]:
    return {slot: {n for n, p in backbone.named_parameters() if p.requires_grad}
            for slot, backbone in model.items.backbones.items()}


def expected_trainable(method: str, names: set[str]) -> set[str]:
    if method in ("iisan-uncached",):
        return set()
    if method == "fft":
        return {n for n in names if not n.startswith("pooler.") and not n.endswith("mask_token")}
    if method == "bitfit":
        return {n for n in names if n.endswith("bias") and not n.startswith("pooler.")}
    if method == "adapter":
        return {n for n in names if ".adapter." in n}
    return {n for n in names if "lora_" in n}


@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_trainable_parameter_sets(env, tmp_path, method):
    _, _, model = built(env, tmp_path, method)
    trainable = backbone_trainable(model)
    for slot, backbone in model.items.backbones.items():
        names = {n for n, _ in backbone.named_parameters()}
        assert trainable[slot] == expected_trainable(method, names), slot
        assert not any(n.startswith("pooler.") for n in trainable[slot])
    # Everything outside the backbones (user encoder, heads, fusion, side network) trains.
    outside = [(n, p) for n, p in model.named_parameters() if not n.startswith("items.backbones.")]
    assert outside and all(p.requires_grad for _, p in outside)
    per_layer = {"adapter": 2, "lora": 2}.get(method)
    if per_layer:  # two adapters / two LoRA pairs per block, in every block of both backbones
        for slot in ("text", "image"):
            marker = ".adapter.down.weight" if method == "adapter" else ".lora_A.default.weight"
            assert sum(n.endswith(marker) for n in trainable[slot]) == per_layer * BLOCKS
    if method == "adapter":
        adapters = sum(p.numel() for slot in trainable for n, p in model.items.backbones[slot].named_parameters()
                       if p.requires_grad)
        assert adapters == 2 * 2 * BLOCKS * (HIDDEN * BOTTLENECK + BOTTLENECK + BOTTLENECK * HIDDEN + HIDDEN)
    if method == "lora":  # r = 8 on query and value: A [8, 32] and B [32, 8] each
        lora = sum(p.numel() for slot in trainable for n, p in model.items.backbones[slot].named_parameters()
                   if p.requires_grad)
        assert lora == 2 * 2 * BLOCKS * (8 * HIDDEN + HIDDEN * 8)


def one_step(model, cfg, split, ids):
    optimizer = optimizer_for(model, cfg)
    log_pop = torch.log(torch.from_numpy(split.popularity())).float()
    model.train()
    loss = model.calculate_loss(ids, log_pop)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_one_step_moves_every_trainable_parameter_and_no_frozen_one(env, tmp_path, method):
    cfg, s, model = built(env, tmp_path, method)
    ids = next(iter(train_batches(s.split, 16, torch.Generator().manual_seed(0))))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = one_step(model, cfg, s.split, ids)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "lora":
        # B starts at zero, so A's first gradient is exactly zero: A moves from the second step on.
        lora_a = {n for n in trainable if ".lora_A." in n}
        assert lora_a and moved == trainable - lora_a
        log_pop = torch.log(torch.from_numpy(s.split.popularity())).float()
        loss = model.calculate_loss(ids, log_pop)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable


@pytest.mark.slow
@pytest.mark.parametrize("method", BACKBONE_METHODS)
def test_twenty_steps_on_a_fixed_batch_lower_the_loss(env, tmp_path, method):
    # the dot score for every method (iisan-uncached takes iisan's cosine preset, whose logits are bounded by 1 / τ:
    # its loss on this batch falls more slowly; what is tested here is that each method's parameters learn)
    fast = dict(lr=5e-3, lr_san=5e-3, lr_backbone_text=1e-3, lr_backbone_image=1e-3, score="dot")
    cfg, s, model = built(env, tmp_path, method, **fast)
    ids = next(iter(train_batches(s.split, 16, torch.Generator().manual_seed(1))))
    log_pop = torch.log(torch.from_numpy(s.split.popularity())).float()

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model.calculate_loss(ids, log_pop).item()

    start = eval_loss()
    optimizer = optimizer_for(model, cfg)
    for _ in range(20):
        model.train()
        loss = model.calculate_loss(ids, log_pop)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Random toy users leave little to learn: the drop is small (0.07-0.1 nats at these settings), but real.
    assert eval_loss() < start - 0.05


def test_lora_at_initialisation_equals_the_pretrained_backbone(env, tmp_path):
    from transformers import AutoModel

    _, s, model = built(env, tmp_path, "lora")
    registry = (env / "pipelines.yaml").read_text()
    for slot, name in (("text", "bert"), ("image", "dino")):
        assert str(env / name) in registry
        fresh = AutoModel.from_pretrained(env / name).eval()
        wrapped = model.items.backbones[slot].eval()
        assert any("lora_B" in n for n, _ in wrapped.named_parameters())
        inputs = model.items.feeds[slot].inputs([1, 2, 3, 5, 8])
        with torch.no_grad():
            expected = fresh(**inputs).last_hidden_state
            got = wrapped(**inputs).last_hidden_state
        assert torch.equal(got, expected)
        # The pretrained query weights are kept, not replaced by freshly initialised ones.
        base = dict(wrapped.named_parameters())
        query = next(n for n in base if n.endswith(("query.base_layer.weight", "q_proj.base_layer.weight")))

        original = dict(fresh.named_parameters())[query.replace(".base_layer", "")]
        assert torch.equal(base[query], original)


def test_uncached_iisan_equals_cached_iisan(env, tmp_path):
    _, _, uncached = built(env, tmp_path, "iisan-uncached")
    cfg = resolve({**options(env, tmp_path), "cache": str(env / "cache32")})
    s = setup(cfg)
    cached = build_model(s)
    assert s.slots["text"].manifest.storage_dtype == "float32"
    missing, unexpected = cached.load_state_dict(checkpoint_state(uncached), strict=False)
    assert not missing and not unexpected
    uncached.eval()
    cached.eval()
    torch.testing.assert_close(uncached.item_table(), cached.item_table(), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "iisan-uncached"])
def test_embedded_run_end_to_end_saves_only_what_trains(env, tmp_path, method):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from iisan.cli import main as iisan_cli

    result = train(resolve(options(env, tmp_path, method=method, epochs=1, batch_size=32)), log=lambda m: None)
    run_dir = result.run_dir
    assert run_dir.name.startswith(f"{method}-text-image-")
    saved = load_file(run_dir / "seed-12345" / "best.safetensors")
    frozen_weights = [k for k in saved if k.startswith("items.backbones.") and "lora_" not in k]
    assert not frozen_weights
    if method == "lora":
        assert sum(".lora_" in k for k in saved) == 2 * 2 * 2 * BLOCKS  # A and B, query and value, 2 backbones
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == method
    again = CliRunner().invoke(iisan_cli, ["evaluate", str(run_dir)])
    assert again.exit_code == 0, again.output
    test_hr = result.seeds[0].test["HR@10"]
    assert f"HR@10 {100 * test_hr:.2f}" in again.output


def test_method_presets_sit_under_the_command_line(env, tmp_path):
    fft = resolve(options(env, tmp_path, method="fft"))
    assert (fft.batch_size, fft.lr, fft.lr_backbone_text, fft.lr_backbone_image) == (32, 1e-4, 5e-5, 1e-4)
    adapter = resolve(options(env, tmp_path, method="adapter", batch_size=8))
    assert (adapter.batch_size, adapter.lr, adapter.lr_backbone_text) == (8, 2e-4, 4e-4)
    assert resolve(options(env, tmp_path)).batch_size == 64
    # uncached IISAN is the same model as cached IISAN: it resolves to the same objective and learning rates
    cached, uncached = resolve(options(env, tmp_path)), resolve(options(env, tmp_path, method="iisan-uncached"))
    same = ("score", "temperature", "lr", "lr_san", "loss", "batch_size")
    assert [getattr(uncached, f) for f in same] == [getattr(cached, f) for f in same]
    assert (cached.score, cached.lr) == ("cosine", 8e-4)


@pytest.mark.slow
def test_bench_writes_report_and_plots(env, tmp_path):
    from click.testing import CliRunner

    from iisan.cli import main as iisan_cli

    out, runs_root = tmp_path / "reports", tmp_path / "runs"

    def bench(*extra: str) -> str:
        result = CliRunner().invoke(iisan_cli, ["bench", "--dataset", "toy", "--cache", str(env / "cache"),
                                                "--out", str(out), "--batch-size", "4", "--sweep", "4",
                                                "--steps", "1", "--full", "--runs", str(runs_root), *extra])
        assert result.exit_code == 0, result.output
        return (out / "bench-toy-full.md").read_text()

    def rows() -> dict[str, dict]:
        return {r["method"]: r for r in json.loads((out / "bench-toy-full.json").read_text())["rows"]}

    report = bench("--methods", "fft,lora,iisan")
    by = rows()
    assert list(by) == ["fft", "lora", "iisan"]
    fft, lora, iisan = by["fft"], by["lora"], by["iisan"]
    assert [r["steps_timed"] for r in by.values()] == [1, 1, 1]  # --steps 1
    # time ÷ FFT is a ratio in the table; which is faster is the bench's finding, not a test
    assert f"| {iisan['seconds_per_epoch'] / fft['seconds_per_epoch']:.3f} |" in report
    # Trainable parameters: everything for FFT but DINOv2's unused mask token; far fewer for LoRA.
    assert fft["total_parameters"] - fft["trainable_parameters"] == HIDDEN
    assert lora["trainable_parameters"] < lora["total_parameters"]
    assert "cached iisan excludes the one-off extraction: tiny-bert" in report.lower()
    assert "| fft | " in report.split("Peak memory (MiB) by batch size")[1]
    assert "| iisan | " in report.split("Seconds per step")[1]
    # --full trained each method (the toy pipeline presets 2 epochs) and put its test metrics in the table.
    runs = sorted(p.name.split("-text-image-")[0] for p in (runs_root / "toy").iterdir())
    assert runs == ["fft", "iisan", "lora"]
    for row, method in ((fft, "fft"), (lora, "lora"), (iisan, "iisan")):
        run = next((runs_root / "toy").glob(f"{method}-text-image-*"))
        saved = json.loads((run / "report.json").read_text())
        assert Path(row["full_run"]) == run and row["test"] == saved["test"]
        assert row["groups"] == saved["groups"]["test"] and row["full_epochs"] == [[saved["seeds"][0]["best_epoch"], 2]]
        assert row["full_capped"] == (saved["seeds"][0]["stopped_by"] == "epoch cap")
        assert f"| {method} | 4 | " in report and f" {100 * saved['test']['HR@10']['mean']:.2f} | " in report
    # Each method trained in its own process: in one, the peak only grows and cached IISAN, trained last,
    # would record at least FFT's peak.
    peaks = {m: json.loads(next((runs_root / "toy").glob(f"{m}-text-image-*/report.json")).read_text())
             ["seeds"][0]["peak_memory_mib"] for m in ("fft", "iisan")}
    assert peaks["iisan"] < peaks["fft"], peaks
    for name in ("bench-toy-full-cost.png", "bench-toy-full-memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same config again: the finished run is reused, not retrained. A changed config (an epoch cap) trains anew.
    bench("--methods", "iisan")
    assert rows()["iisan"]["test"] == iisan["test"] and len(list((runs_root / "toy").iterdir())) == 3
    bench("--methods", "iisan", "--epochs", "1")
    assert rows()["iisan"]["full_capped"] and rows()["iisan"]["full_epochs"][0][1] == 1
    assert len(list((runs_root / "toy").glob("iisan-*"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("budget, steps_timed", [(0.0, 1), (1e9, 3)])
def test_step_timing_budget(env, tmp_path, budget, steps_timed):
    from iisan.experiments.cost import measure_step_cost
    from iisan.train.config import resolve

    cfg = resolve(options(env, tmp_path, method="iisan", batch_size=2))
    result = measure_step_cost(cfg.to_dict(), warmup=1, steps=3, budget=budget, full_epoch_under=0.0)
    assert (result["warmup_steps"], result["steps_timed"], len(result["step_seconds"])) == (1, steps_timed, steps_timed)
    assert result["seconds_per_step"] == pytest.approx(sum(result["step_seconds"]) / steps_timed)
    assert result["seconds_per_epoch"] == pytest.approx(result["seconds_per_step"] * result["steps_per_epoch"])
    assert result["steps_per_epoch"] > 4 and result["epoch"] == "projected"


def test_tpme_and_memory_projection():
    from iisan.evaluate.efficiency import projected_memory, tpme

    rows = [{"status": "ok", "seconds_per_epoch": 100.0, "trainable_parameters": 1000, "peak_memory_mib": 50.0},
            {"status": "ok", "seconds_per_epoch": 10.0, "trainable_parameters": 100, "peak_memory_mib": 10.0},
            {"status": "ok", "seconds_per_epoch": 55.0, "trainable_parameters": 100, "peak_memory_mib": 20.0},
            {"status": "out of memory"}]
    tpme(rows)
    assert rows[0]["tpme"] == pytest.approx(1.0) and rows[1]["tpme"] == pytest.approx(0.0)
    assert rows[2]["tpme"] == pytest.approx(0.45 * 0.5 + 0.1 * 0 + 0.45 * 0.25)
    assert "tpme" not in rows[3]
    assert projected_memory([(1, 100.0), (2, 150.0), (4, 250.0)], 8) == pytest.approx(450.0)
    assert projected_memory([(1, 100.0)], 8) is None


def test_child_peak_memory_is_its_own(tmp_path):
    """A child's peak must not start at its parent's resident size (Linux carries ru_maxrss across exec)."""
    import subprocess
    import sys

    import numpy as np

    from iisan.evaluate.efficiency import resident_mib

    ballast = np.ones(2**27)  # 1 GiB, touched, in this (the parent) process
    assert resident_mib(os.getpid()) > 1024
    code = "from iisan.evaluate.efficiency import peak_resident_mib; print(peak_resident_mib())"
    child_peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.split()[-1])
    assert 5 < child_peak < 512, child_peak
    del ballast


@pytest.mark.slow
def test_seed_two_of_a_two_seed_lora_run_equals_a_run_started_at_seed_two(env, tmp_path):
    """Each seed builds its item encoder afresh after seeding: the backbones reload from their pretrained
    weights and LoRA's init is under the seed. (Before, seed 2 started from seed 1's fine-tuned backbone.)"""
    common = dict(method="lora", pipeline="text-only", epochs=1, batch_size=32)
    two = train(resolve(options(env, tmp_path / "two", seeds=2, **common)), log=lambda m: None)
    alone = train(resolve(options(env, tmp_path / "alone", seed=12346, **common)), log=lambda m: None)
    assert two.seeds[1].seed == alone.seeds[0].seed == 12346
    assert two.seeds[1].valid == alone.seeds[0].valid
    assert two.seeds[1].test == alone.seeds[0].test
    lines = lambda run: (run.run_dir / "seed-12346" / "metrics.jsonl").read_text()  # noqa: E731
    assert lines(two).split('"train_seconds"')[0] == lines(alone).split('"train_seconds"')[0]  # same loss


@pytest.mark.slow
def test_a_registered_toy_method_trains_through_the_cli(env, tmp_path):
    """Adding a method is one registry entry: here an item encoder that averages the cached layers of each
    slot through one Linear, trained and evaluated by the real CLI."""
    from click.testing import CliRunner
    from torch import nn

    from iisan.cli import main as iisan_cli
    from iisan.train.methods import METHODS, ItemSource, Method, register_method

    class MeanOfLayers(nn.Module):
        def __init__(self, states, dim):
            super().__init__()
            self.slots = list(states)
            for slot, tensor in states.items():
                self.register_buffer(f"states_{slot}", tensor, persistent=False)
            self.proj = nn.Linear(sum(t.shape[2] for t in states.values()), dim)

        def lr_groups(self, cfg):
            return [(list(self.proj.parameters()), 3 * cfg.lr)]

        def forward(self, index):
            return self.proj(torch.cat([getattr(self, f"states_{s}")[index].float().mean(1) for s in self.slots], -1))

    register_method(Method("toy-mean", ItemSource.CACHED, lambda ctx: MeanOfLayers(ctx.cached_states(),
                                                                                    ctx.cfg.embedding_dim),
                           "mean of the cached layers", presets={"lr": 1e-3}))
    try:
        result = CliRunner().invoke(iisan_cli, ["train", "--dataset", "toy", "--cache", str(env / "cache"),
                                                "--out", str(tmp_path), "--method", "toy-mean", "--epochs", "2",
                                                "--no-progress"])
        assert result.exit_code == 0, result.output
        run_dir = Path(result.output.strip().splitlines()[-1])
        assert run_dir.name.startswith("toy-mean-text-image-")
        saved = json.loads((run_dir / "seed-12345" / "report.json").read_text())
        assert saved["trainable_parameters"] == (32 + 32) * 64 + 64 + 100_224  # proj + the user encoder
        assert json.loads((run_dir / "config.json").read_text())["lr"] == 1e-3  # the method's preset
        _, s, model = built(env, tmp_path, "toy-mean")
        optimizer = optimizer_for(model, s.cfg)
        assert sorted(g["lr"] for g in optimizer.param_groups) == [1e-3, 3e-3]  # groups from its modules
        again = CliRunner().invoke(iisan_cli, ["evaluate", str(run_dir)])
        assert again.exit_code == 0 and f"HR@10 {100 * saved['test']['HR@10']:.2f}" in again.output
    finally:
        METHODS.pop("toy-mean", None)
