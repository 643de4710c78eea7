"""A dataset is a name or a path: folders without a registry entry, dataset.yaml, the default pipeline by
modality, and the commands that take `--dataset PATH`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from iisan.cli import main
from iisan.data.dataset import dataset_stats, default_pipeline, load_dataset
from iisan.errors import DataError, RegistryError
from iisan.registry import dataset_name, is_dataset_path, locate_dataset

from conftest import write_tsv

ITEMS = ["a\tAlpha\tred", "b\tBeta\tblue", "c\tGamma\tgreen", "d\tDelta\t", "e\tEpsilon\tgrey"]
USERS = ["u1\ta b c d e", "u2\tb c d e a", "u3\tc d", "u4\te d c b a b"]


def folder_dataset(root: Path, name: str = "mine", yaml_text: str | None = None) -> Path:
    folder = root / name
    write_tsv(folder / "items.tsv", ITEMS)
    write_tsv(folder / "users.tsv", USERS)
    if yaml_text is not None:
        (folder / "dataset.yaml").write_text(yaml_text)
    return folder


def test_what_counts_as_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_dataset_path("ml-100k")
    assert is_dataset_path("data/ml-100k") and is_dataset_path("./x") and is_dataset_path("/abs/x")
    (tmp_path / "here").mkdir()
    assert is_dataset_path("here")  # names an existing directory
    assert dataset_name("scientific") == "scientific"
    assert dataset_name(str(tmp_path / "here")) == "here"


def test_a_folder_without_any_description(tmp_path):
    folder = folder_dataset(tmp_path)
    dataset = load_dataset(str(folder))
    assert dataset.name == "mine"
    assert dataset.location.folder == folder.resolve()
    assert list(dataset.items.fields) == ["title", "field2"]  # the columns after the item id
    assert dataset.field_texts("field2") == ["red", "blue", "green", "", "grey"]
    assert dataset.location.described_by == "the items file's columns"
    stats = dataset_stats(dataset)
    assert (stats.users, stats.items, stats.interactions) == (3, 5, 16)  # u3 has fewer than 5 items
    assert default_pipeline(dataset.location) == ("text-only", "dataset 'mine' has no images")
    (folder / "images").mkdir()
    assert default_pipeline(locate_dataset(str(folder)))[0] == "text-only"  # an empty folder is no image
    (folder / "images" / "a.jpg").write_bytes(b"not decoded here")
    assert default_pipeline(locate_dataset(str(folder))) == ("text-image", "dataset 'mine' has images")


def test_dataset_yaml_names_fields_images_and_pipeline(tmp_path):
    folder = folder_dataset(tmp_path, "raw-folder", "name: shop\nfields: [title, picture]\nimage_field: picture\n"
                                                   "pipeline: text-only\n")
    (folder / "pics").mkdir()
    (folder / "pics" / "red.png").write_bytes(b"x")
    (folder / "pics" / "blue.png").write_bytes(b"y")
    write_tsv(folder / "items.tsv", ["a\tAlpha\tpics/red.png", "b\tBeta\tpics/blue.png", "c\tGamma\tpics/none.png",
                                     "d\tDelta\t", "e\tEpsilon\t"])
    dataset = load_dataset(str(folder))
    assert dataset.name == "shop" and dataset_name(str(folder)) == "shop"
    assert dataset.location.described_by == "dataset.yaml"
    assert dataset.images.get("a") == (folder / "pics" / "red.png").resolve()
    assert dataset.images.get("b") == (folder / "pics" / "blue.png").resolve()
    assert dataset.images.get("c") is None and dataset.images.get("d") is None
    assert [m for m in dataset.report.messages() if "does not exist" in m] == [
        f"{folder / 'items.tsv'}: an image path to a file that does not exist, 1 time(s) (first at line 3); "
        f"e.g. 'c': pics/none.png; the item takes the missing-image path"]
    assert default_pipeline(dataset.location) == ("text-only", "set for dataset 'shop' in dataset.yaml")
    with pytest.raises(DataError, match=r"refused by --strict"):
        load_dataset(str(folder), strict=True)


def test_bad_dataset_yaml_and_escaping_image_paths(tmp_path):
    folder = folder_dataset(tmp_path, "bad", "fields: [title, colour]\nimgs: pics\n")
    with pytest.raises(RegistryError, match=r"bad/dataset.yaml:2: imgs: unknown key \(known: dir, items, users, fields"):
        load_dataset(str(folder))
    (folder / "dataset.yaml").write_text("fields: [title, colour]\nimage_field: picture\n")
    with pytest.raises(RegistryError, match=r"dataset.yaml:2: image_field: 'picture' is not one of the fields "
                                            r"\(title, colour\)"):
        load_dataset(str(folder))
    (folder / "dataset.yaml").write_text("fields: [title, colour\n")
    with pytest.raises(RegistryError, match=r"dataset.yaml:2: not valid YAML"):
        load_dataset(str(folder))
    (folder / "dataset.yaml").write_text("fields: [title, picture]\nimage_field: picture\n")
    (tmp_path / "secret.png").write_bytes(b"x")
    write_tsv(folder / "items.tsv", ["a\tAlpha\t", "b\tBeta\t../secret.png"])
    with pytest.raises(DataError, match=r"items.tsv:2: image path '../secret.png' \(column picture\) leads outside "
                                        r"the dataset folder"):
        load_dataset(str(folder))
    with pytest.raises(DataError, match=r"nowhere: dataset folder not found"):
        load_dataset(str(tmp_path / "nowhere"))


def test_a_registered_name_supplies_settings_for_its_folder(tmp_path, monkeypatch):
    registry = tmp_path / "pipelines.yaml"
    registry.write_text("datasets:\n  shop:\n    items: [items.tsv, Shop_items.tsv]\n    fields: [title, colour]\n"
                        "    pipeline: text-only\n")
    monkeypatch.setenv("IISAN_PIPELINES", str(registry))
    folder = tmp_path / "elsewhere" / "shop"
    write_tsv(folder / "Shop_items.tsv", ITEMS)
    write_tsv(folder / "users.tsv", USERS)
    (folder / "images").mkdir()
    (folder / "images" / "a.jpg").write_bytes(b"x")
    dataset = load_dataset(str(folder))
    assert dataset.items.path.name == "Shop_items.tsv" and list(dataset.items.fields) == ["title", "colour"]
    assert dataset.location.described_by == "the registry entry 'shop'"
    assert default_pipeline(dataset.location)[0] == "text-only"  # the entry's own pipeline wins over images
    # A registered entry without a pipeline follows the modalities its folder has.
    registry.write_text("datasets:\n  shop:\n    items: [items.tsv, Shop_items.tsv]\n")
    assert default_pipeline(locate_dataset(str(folder))) == ("text-image", "dataset 'shop' has images")
    shutil.rmtree(folder / "images")
    assert default_pipeline(locate_dataset(str(folder))) == ("text-only", "dataset 'shop' has no images")


def test_data_stats_takes_a_path(tmp_path):
    folder = folder_dataset(tmp_path)
    result = CliRunner().invoke(main, ["data", "stats", str(folder)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split(None, 1) == ["dataset", f"mine ({folder.resolve()}; described by the items file's columns)"]
    assert "text fields" in lines[1] and lines[1].endswith("title, field2")
    assert any(line.startswith("users") and line.split()[1] == "3" for line in lines)


def test_extract_train_and_evaluate_a_folder_dataset(env, tmp_path):
    """The whole path with `--dataset PATH` for a folder no registry names: cache under cache/<name>/, the
    pipeline chosen by modality and said so, runs under runs/<name>/, the absolute folder in the config."""
    folder = tmp_path / "mine"
    shutil.copytree(env / "data" / "plain", folder)
    runner = CliRunner()
    cache, out = tmp_path / "cache", tmp_path / "runs"
    extracted = runner.invoke(main, ["extract", "--model", "tiny-bert", "--dataset", str(folder), "--out", str(cache),
                                     "--no-progress"])
    assert extracted.exit_code == 0, extracted.output
    assert (cache / "mine" / "tiny-bert.zarr").is_dir()
    trained = runner.invoke(main, ["train", "--dataset", str(folder), "--cache", str(cache), "--out", str(out),
                                   "--epochs", "1", "--no-progress"])
    assert trained.exit_code == 0, trained.output
    assert "pipeline text-only (dataset 'mine' has no images; --pipeline chooses another)" in trained.output
    run_dir = Path(trained.output.strip().splitlines()[-1])
    assert run_dir.parent == out / "mine" and run_dir.name.startswith("iisan-text-only-")
    assert json.loads((run_dir / "config.json").read_text())["dataset"] == str(folder.resolve())
    evaluated = runner.invoke(main, ["evaluate", str(run_dir)])
    assert evaluated.exit_code == 0, evaluated.output
    seed = json.loads((run_dir / "report.json").read_text())["seeds"][0]
    hr = 100 * seed["test"]["HR@10"]
    assert evaluated.output.strip().endswith(f"test HR@10 {hr:.2f} NDCG@10 {100 * seed['test']['NDCG@10']:.2f}")
