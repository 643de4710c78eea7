"""Stage 2 end to end on tiny cached encoders: the CLI, run folders, determinism, resume, baselines, and the
errors a user meets. Seconds-scale: one or two epochs, nothing converges here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from iisan.cli import main as iisan_cli
from iisan.errors import IisanError
from iisan.train.config import resolve
from iisan.train.recipe import run_label, train

from conftest import options, toy_with_cold_targets


def test_run_folder_says_text_only_when_the_image_slot_is_emptied(env, tmp_path):
    assert run_label(resolve(options(env, tmp_path))) == "iisan-text-image"
    assert run_label(resolve(options(env, tmp_path, method="fft", image=""))) == "fft-text-image-text-only"


@pytest.mark.slow
def test_cli_trains_and_reports(env, tmp_path):
    result = CliRunner().invoke(iisan_cli, ["train", "--dataset", "toy", "--cache", str(env / "cache"), "--out",
                                            str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    run_dir = Path(lines[-1])
    assert run_dir.parent == tmp_path / "toy" and run_dir.name.startswith("iisan-text-image-")
    assert lines[-3].startswith("valid HR@10 ") and lines[-2].startswith("test HR@10 ")
    assert "seconds per epoch" in result.output and "trainable parameters" in result.output
    seed = run_dir / "seed-12345"
    assert [json.loads(l)["epoch"] for l in (seed / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert {p.name for p in seed.iterdir()} == {"metrics.jsonl", "best.safetensors", "last.pt", "report.json", "ranks.npz"}
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["text"], config["image"], config["epochs"]) == ("tiny-bert", "tiny-dino", 2)
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert set(provenance["caches"]) == {"text", "image"} and provenance["packages"]["torch"]
    again = CliRunner().invoke(iisan_cli, ["evaluate", str(run_dir)])
    assert again.exit_code == 0 and again.output.strip().endswith(lines[-2].split("test ", 1)[1])


@pytest.mark.slow
def test_fixed_seed_gives_identical_metrics_and_resume_continues_exactly(env, tmp_path):
    full = train(resolve(options(env, tmp_path / "a")), log=lambda m: None)
    same = train(resolve(options(env, tmp_path / "b")), log=lambda m: None)
    assert full.seeds[0].test == same.seeds[0].test
    assert full.seeds[0].valid == same.seeds[0].valid
    half = train(resolve(options(env, tmp_path / "c", epochs=1)), log=lambda m: None)
    run_dir = half.run_dir
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "epochs": 2}))
    (run_dir / "seed-12345" / "report.json").unlink()
    messages = []
    resumed = train(resume=run_dir, log=messages.append)
    assert any("resumed after epoch 1" in m for m in messages)
    assert resumed.seeds[0].test == full.seeds[0].test


@pytest.mark.slow
def test_seeds_and_baselines(env, tmp_path):
    result = train(resolve(options(env, tmp_path, seeds=2, epochs=1)), log=lambda m: None)
    assert [r.seed for r in result.seeds] == [12345, 12346]
    assert result.std("HR@10", "test") >= 0
    frozen = train(resolve(options(env, tmp_path, method="frozen", epochs=1)), log=lambda m: None)
    # GELU(Linear(32 -> 64)) per modality + Linear(128 -> 64) + the user encoder (100,224 at d = 64)
    assert frozen.seeds[0].trainable_parameters == 2 * (32 * 64 + 64) + 128 * 64 + 64 + 100_224
    ids = train(resolve(options(env, tmp_path, method="sasrec-id", epochs=1)), log=lambda m: None)
    n_items = json.loads((ids.run_dir / "provenance.json").read_text())["dataset"]["items"]
    assert ids.seeds[0].trainable_parameters == (n_items + 1) * 64 + 100_224


def test_text_only_dataset_default_pipeline(env, tmp_path):
    result = train(resolve({**options(env, tmp_path), "dataset": "plain"}), log=lambda m: None)
    assert result.run_dir.name.startswith("iisan-text-only-")


def test_errors_name_the_problem(env, tmp_path, monkeypatch):
    with pytest.raises(IisanError, match=r"no cache for nobody on toy .*run `iisan extract --model nobody --dataset toy`"):
        train(resolve(options(env, tmp_path, pipeline="ghost")), log=lambda m: None)
    with pytest.raises(IisanError, match=r"no cache for tiny-dino on plain"):
        train(resolve({**options(env, tmp_path), "dataset": "plain", "pipeline": "text-image"}), log=lambda m: None)
    # A changed items file no longer matches the cache's fingerprint.
    changed = tmp_path / "data"
    shutil.copytree(env / "data", changed)
    items = changed / "toy" / "items.tsv"
    items.write_text(items.read_text().replace("i005\t", "i005\tchanged "))
    monkeypatch.setenv("IISAN_DATA_DIR", str(changed))
    with pytest.raises(IisanError, match=r"dataset fingerprint is .* the dataset now gives"):
        train(resolve(options(env, tmp_path)), log=lambda m: None)


def test_standardized_uses_training_items_and_keeps_padding_zero():
    import torch

    from iisan.train.data import standardization, standardized

    torch.manual_seed(0)
    states = torch.randn(50, 3, 4) * 30 + 7
    states[0] = 0
    in_training = torch.zeros(50, dtype=torch.bool)
    in_training[1:40] = True
    out = standardized(states, standardization(states, in_training))
    assert torch.equal(out[0], torch.zeros(3, 4))
    torch.testing.assert_close(out[in_training].mean(0), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[in_training].std(0), torch.ones(3, 4), atol=1e-5, rtol=0)


def test_nan_loss_stops_with_a_message(env, tmp_path, monkeypatch):
    import torch

    from iisan.train.model import Recommender

    monkeypatch.setattr(Recommender, "calculate_loss", lambda self, *args: torch.tensor(float("nan")))
    from iisan.train.step import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match=r"loss is nan at epoch 1, step 1 \(seed 12345\): lower --lr") as caught:
        train(resolve(options(env, tmp_path)), log=lambda m: None)
    assert (caught.value.epoch, caught.value.step, caught.value.seed) == (1, 1, 12345)
    assert isinstance(caught.value, IisanError)  # the CLI prints it as one message


@pytest.mark.parametrize("method", ["iisan", "frozen"])
def test_fp16_cache_is_held_in_fp16_and_encodes_exactly_as_an_fp32_copy(env, tmp_path, method):
    import torch

    from iisan.train.recipe import build_model, setup

    s = setup(resolve(options(env, tmp_path, method=method)))
    assert {slot: x.states.dtype for slot, x in s.slots.items()} == {"text": torch.float16, "image": torch.float16}
    torch.manual_seed(0)
    held = build_model(s).items
    for x in s.slots.values():
        x.states = x.states.float()
    widened = build_model(s).items
    widened.load_state_dict(held.state_dict())
    every = torch.arange(s.slots["text"].states.shape[0])
    with torch.no_grad():
        assert torch.equal(held(every), widened(every))


@pytest.mark.slow
def test_a_run_folder_written_before_the_redesign_still_evaluates_and_resumes(env, tmp_path):
    """Version-1 run folders (no `version`, slots `txt` / `img` in checkpoint keys, `standardize: on`, ties in
    the target's favour) load for `iisan evaluate` and `--resume`; runs whose meaning changed are refused,
    naming the field."""
    import torch
    from safetensors.torch import load_file, save_file

    from iisan.train.recipe import evaluate_run

    run = train(resolve(options(env, tmp_path, epochs=1, ties="optimistic")), log=lambda m: None)
    run_dir = run.run_dir
    config = json.loads((run_dir / "config.json").read_text())
    for key in ("version", "ties"):
        config.pop(key)
    config["epochs"] = 2
    (run_dir / "config.json").write_text(json.dumps(config))
    old = lambda key: ".".join({"text": "txt", "image": "img"}.get(p, p) for p in key.split("."))  # noqa: E731
    seed = run_dir / "seed-12345"
    best = load_file(seed / "best.safetensors")
    save_file({old(k): v for k, v in best.items()}, seed / "best.safetensors")
    last = torch.load(seed / "last.pt", weights_only=False)
    last["model"] = {old(k): v for k, v in last["model"].items()}
    torch.save(last, seed / "last.pt")
    assert any(".img." in k for k in load_file(seed / "best.safetensors"))
    [(_, result)] = evaluate_run(run_dir, "test")
    assert result.metrics == run.seeds[0].test and result.ties == "optimistic"
    (seed / "report.json").unlink()
    resumed = train(resume=run_dir, log=lambda m: None)
    assert resumed.seeds[0].epochs == 2
    config["layers_text"] = "remove_first"
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(IisanError, match=r"field layers_text = remove_first"):
        evaluate_run(run_dir, "test")
    config.update(layers_text="", method="frozen", bogus=1)
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(IisanError, match=r"field method = frozen with an image slot"):
        evaluate_run(run_dir, "test")
    config.update(method="iisan")
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(IisanError, match=r"unknown field\(s\) bogus"):
        evaluate_run(run_dir, "test")


def test_standardize_per_layer_uses_one_mean_and_std_per_layer():
    import torch

    from iisan.train.data import standardization, standardized

    torch.manual_seed(0)
    states = torch.randn(40, 2, 6) * torch.tensor([1.0, 50.0, 0.01, 3.0, 7.0, 2.0]) + 5
    states[0] = 0
    in_training = torch.ones(40, dtype=torch.bool)
    in_training[0] = False
    out = standardized(states, standardization(states, in_training, per="layer"))
    rows = states[1:]
    for k in range(2):
        expected = (rows[:, k] - rows[:, k].mean()) / rows[:, k].std()
        torch.testing.assert_close(out[1:, k], expected, atol=1e-5, rtol=1e-5)
    # a near-constant dimension stays near constant (per-dimension standardisation would blow it up to std 1)
    assert out[1:, 0, 2].std() < 0.01 and standardized(states, standardization(states, in_training))[1:, 0, 2].std() > 0.99
    assert torch.equal(out[0], torch.zeros(2, 6))


def test_frozen_reads_the_final_output_and_remove_first_starts_from_h0(env, tmp_path):
    import torch

    from iisan.cache_store import find_store, load_cache
    from iisan.train.recipe import build_model, setup

    s = setup(resolve(options(env, tmp_path, method="frozen")))
    final = load_cache(find_store(env / "cache", "toy", "tiny-dino"), item_ids=s.split.item_ids, final=True)
    assert final.manifest.final_state == "stored"  # DINOv2 has a final LayerNorm the hidden states lack
    assert torch.equal(s.slots["image"].states[:, 0], final.final)
    assert not torch.equal(final.final, final.states[:, -1])
    s = setup(resolve(options(env, tmp_path, layers_text="remove_first", layers_image="remove_first")))
    assert s.slots["text"].layers == [0, 1, 3] and s.slots["text"].init_from_first  # tiny BERT: 3 blocks
    side = build_model(s).items.side
    assert len(side.intra["text"].blocks) == 2 and side.intra["text"].init_from_first
    assert len(side.inter.blocks) == 2


def test_warm_and_cold_users_are_reported_separately(env, tmp_path, monkeypatch):
    """Warm / cold computed by hand from the users file: a test target is cold when no user's training part
    (the last 13 items minus the final two) holds it; each group's HR / NDCG are those of its users' ranks."""
    from iisan.data.dataset import load_dataset
    from iisan.evaluate.metrics import metrics_from_ranks
    from iisan.train.recipe import evaluate_run

    toy_with_cold_targets(env, tmp_path, monkeypatch)
    result = train(resolve(options(env, tmp_path, seeds=2, epochs=1)), log=lambda m: None)
    dataset = load_dataset("toy")
    kept = [seq[-13:] for seq in dataset.users.sequences if len(seq) >= 5]
    trained = {item for seq in kept for item in seq[:-2]}
    cold = [seq[-1] not in trained for seq in kept]
    assert (sum(cold), len(cold)) == (COLD_TOY, 150)
    for seed, ranking in evaluate_run(result.run_dir, "test"):
        groups = ranking.groups()
        warm_ranks = ranking.ranks[[not c for c in cold]]
        cold_ranks = ranking.ranks[cold]
        assert groups["warm"] == {"users": 150 - COLD_TOY, **metrics_from_ranks(warm_ranks)}
        assert groups["cold"] == {"users": COLD_TOY, **metrics_from_ranks(cold_ranks)}
    report = json.loads((result.run_dir / "report.json").read_text())
    seeds = report["seeds"]
    for group in ("warm", "cold"):
        entry = report["groups"]["test"][group]
        assert entry["users"] == seeds[0]["groups"]["test"][group]["users"]
        assert entry["HR@10"]["mean"] == pytest.approx(sum(s["groups"]["test"][group]["HR@10"] for s in seeds) / 2)
        lo, hi = entry["HR@10_ci95"]  # over the group's users, of the seed-mean hit
        assert lo <= entry["HR@10"]["mean"] <= hi and (hi > lo or entry["HR@10"]["mean"] in (0, 1))
    from iisan.evaluate.report import report_lines

    lines = report_lines(seeds, report)
    assert lines[-4] == (f"warm test HR@10 {100 * report['groups']['test']['warm']['HR@10']['mean']:.2f} "
                         f"NDCG@10 {100 * report['groups']['test']['warm']['NDCG@10']['mean']:.2f} "
                         f"({150 - COLD_TOY} users)")
    assert lines[-3].startswith("cold test HR@10 ") and lines[-3].endswith(f"({COLD_TOY} users)")
    assert lines[-2].startswith("valid HR@10 ") and lines[-1].startswith("test HR@10 ")


COLD_TOY = 10


def test_cold_items_protocol_through_training(env, tmp_path):
    from iisan.data.dataset import dataset_stats, load_dataset
    from iisan.data.protocol import ProtocolConfig

    stats = dataset_stats(load_dataset("toy"), ProtocolConfig(cold_items=0.2, cold_seed=0))
    assert stats.cold_items > 0 and stats.cold_test > 0
    result = CliRunner().invoke(iisan_cli, ["train", "--dataset", "toy", "--cache", str(env / "cache"), "--out",
                                            str(tmp_path), "--epochs", "1", "--cold-items", "0.2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"cold test HR@10 " in result.output and f"({stats.cold_test} users)" in result.output
    run_dir = Path(result.output.strip().splitlines()[-1])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["cold_items"] == 0.2
    assert report["groups"]["test"]["cold"]["users"] == stats.cold_test
    assert report["groups"]["test"]["warm"]["users"] == stats.users - stats.cold_test
    bad = CliRunner().invoke(iisan_cli, ["train", "--dataset", "toy", "--cache", str(env / "cache"), "--out",
                                         str(tmp_path), "--cold-items", "1"])
    assert bad.exit_code == 2 and "--cold-items 1.0: a fraction in (0, 1)" in bad.output


def test_reuse_reports_a_finished_run_again_instead_of_training(env, tmp_path):
    args = ["train", "--dataset", "toy", "--cache", str(env / "cache"), "--out", str(tmp_path), "--epochs", "1",
            "--no-progress", "--reuse"]
    first = CliRunner().invoke(iisan_cli, args)
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(iisan_cli, args)
    assert second.exit_code == 0, second.output
    assert second.output.strip().splitlines()[-1] == first.output.strip().splitlines()[-1]  # the same folder
    assert "epoch 1:" not in second.output and second.output.splitlines()[-2] == first.output.splitlines()[-2]
    assert len(list((tmp_path / "toy").iterdir())) == 1


def test_a_slot_source_is_parsed_once_into_its_model_and_field(env, tmp_path):
    from iisan.train.data import SlotSource, slot_sources

    cfg = resolve(options(env, tmp_path, pipeline="text-only", text="tiny-bert@year", image=""))
    (text,) = slot_sources(cfg).values()
    assert (text.slot, text.model, text.field, text.kind, str(text)) == ("text", "tiny-bert", "year", "text",
                                                                        "tiny-bert@year")
    image = slot_sources(resolve(options(env, tmp_path)))["image"]
    assert (image.model, image.field, image.kind, str(image)) == ("tiny-dino", None, "image", "tiny-dino")
    with pytest.raises(IisanError, match=r"--text '@title': give MODEL or MODEL@FIELD"):
        SlotSource.parse("text", "@title")
