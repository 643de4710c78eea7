"""The registry (datasets by name, data roots, file-name overrides) and `iisan data stats`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from iisan.cli import main
from iisan.data.dataset import load_dataset
from iisan.data.images import PLACEHOLDER_RGB, ImageIndex, load_item_images, open_image
from iisan.errors import DataError, RegistryError
from iisan.registry import REPO_ROOT, data_roots, dataset_entry, dataset_names, locate_dataset

from conftest import SCIENTIFIC, needs_posters, needs_scientific, write_tsv


def test_registered_datasets():
    assert {"scientific", "instrument", "office", "microlens", "ml-100k"} <= set(dataset_names())
    entry = dataset_entry("instrument")
    assert "Musical_Instruments_items.tsv" in entry.items
    ml = dataset_entry("ml-100k")
    assert ml.fields == ("title", "year_genres")
    assert ml.images == ("images",) and ml.extra_images == ("ml-100k-posters/images",)
    assert ml.fetch == "ml-100k"
    with pytest.raises(RegistryError, match="unknown dataset 'nope'"):
        dataset_entry("nope")


@pytest.mark.reads_shared  # where ../shared comes in the order (it need not exist)
def test_data_roots_order(tmp_path, monkeypatch):
    monkeypatch.setenv("IISAN_DATA_DIR", str(tmp_path / "mine"))
    monkeypatch.chdir(tmp_path)
    roots = data_roots()
    assert roots[0] == (tmp_path / "mine").resolve()
    assert roots[1] == (tmp_path / "data").resolve()
    assert roots.index((REPO_ROOT.parent / "shared" / "data").resolve()) > 1


def registry(tmp_path, monkeypatch, text: str) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    monkeypatch.setenv("IISAN_PIPELINES", str(path))
    monkeypatch.setenv("IISAN_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_file_name_candidates_and_image_folders(tmp_path, monkeypatch):
    data = registry(tmp_path, monkeypatch, """
datasets:
  inst:
    dir: Instrument
    items: [items.tsv, Musical_Instruments_items.tsv]
    users: [users.tsv, am_Musical_Instruments_users_10K.tsv]
    extra_images: [posters/images, not-there/images]
""")
    folder = data / "Instrument"
    write_tsv(folder / "Musical_Instruments_items.tsv", ["a\tA", "b\tB", "c\tC"])
    write_tsv(folder / "am_Musical_Instruments_users_10K.tsv", ["u\ta b c a b"])
    (folder / "images").mkdir()
    (data / "posters" / "images").mkdir(parents=True)
    # Own images/ wins over the extra folder; .jpg wins over .png within a folder.
    for name, target in [("a.png", folder / "images"), ("a.jpg", data / "posters" / "images"),
                         ("b.png", data / "posters" / "images"), ("b.jpg", data / "posters" / "images")]:
        (target / name).write_bytes(b"x")
    loc = locate_dataset("inst")
    assert loc.folder == folder.resolve()
    assert loc.items_file.name == "Musical_Instruments_items.tsv"
    assert loc.absent_image_dirs == ("not-there/images",)
    index = ImageIndex.build(loc.image_dirs)
    assert index.get("a") == folder.resolve() / "images" / "a.png"
    assert index.get("b") == (data / "posters" / "images" / "b.jpg").resolve()
    assert index.get("c") is None


def test_missing_dataset_folder_and_files(tmp_path, monkeypatch):
    data = registry(tmp_path, monkeypatch, "datasets:\n  fetchable: {fetch: ml-100k}\n  toy: {}\n  elsewhere: {}\n")
    with pytest.raises(DataError, match=r"dataset folder not found in any data root .*run `iisan data fetch ml-100k`"):
        locate_dataset("fetchable")
    with pytest.raises(DataError, match=r"^elsewhere: dataset folder not found .*put a folder 'elsewhere' holding "
                                        r"items.tsv and users.tsv"):
        locate_dataset("elsewhere")
    write_tsv(data / "toy" / "items.tsv", ["a\tA"])
    with pytest.raises(DataError, match=r"users file not found \(looked for users.tsv in "):
        locate_dataset("toy")


def test_registry_rejects_unknown_keys(tmp_path, monkeypatch):
    registry(tmp_path, monkeypatch, "datasets:\n  toy: {itemz: x.tsv}\n")
    with pytest.raises(RegistryError, match=r"pipelines.yaml:2: datasets.toy.itemz: unknown key \(known: dir, items, "):
        dataset_entry("toy")
    registry(tmp_path, monkeypatch, "datasets:\n  toy:\n    fields: [title]\n    image_field: poster\n")
    with pytest.raises(RegistryError, match=r"pipelines.yaml:4: datasets.toy.image_field: 'poster' is not one of the "
                                            r"fields \(title\)"):
        dataset_entry("toy")


def test_every_registry_section_is_checked_with_file_line_and_field(tmp_path, monkeypatch):
    from iisan.extract.models import model_spec
    from iisan.registry import load_registry

    registry(tmp_path, monkeypatch, "datasets: {}\npipeline:\n  x: {text: m}\n")
    with pytest.raises(RegistryError, match=r"pipelines.yaml:3: pipeline: unknown key \(known: datasets, models, "
                                            r"pipelines\)"):
        load_registry()
    registry(tmp_path, monkeypatch, "pipelines:\n  x:\n    text: m\n    layers: {txt: even}\n")
    with pytest.raises(RegistryError, match=r"pipelines.yaml:4: pipelines.x.layers.txt: unknown key"):
        load_registry()
    registry(tmp_path, monkeypatch, "models:\n  m:\n    kind: txt\n    family: encoder\n    source: a/b\n"
                                    "    poolng: mean\n")
    with pytest.raises(RegistryError) as bad:
        model_spec("m")
    assert "pipelines.yaml:3: models.m.kind: Input should be 'text' or 'image'" in str(bad.value)
    assert "pipelines.yaml:6: models.m.poolng: unknown key (known: kind, family, source" in str(bad.value)
    registry(tmp_path, monkeypatch, "models:\n  m:\n    family: encoder\n    source: a/b\n    wheel: one-wheel\n")
    with pytest.raises(RegistryError, match=r"pipelines.yaml:3: models.m.kind: required, and missing"):
        model_spec("m")
    registry(tmp_path, monkeypatch, "models:\n  m: {kind: text, family: encoder, source: a/b, wheel: w, "
                                    "dtype: {cuda: bfloat16}}\n")
    spec = model_spec("m")
    assert spec.wheel == ("w",) and dict(spec.dtype) == {"cpu": "float32", "cuda": "bfloat16"}


def test_tuned_presets_live_in_their_own_file_checked_like_the_registry(tmp_path, monkeypatch):
    from iisan.registry import load_registry, save_preset
    from iisan.train.config import resolve

    registry(tmp_path, monkeypatch, "pipelines:\n  text-only:\n    text: m\n")
    presets = tmp_path / "presets.yaml"
    presets.write_text("presets:\n  fast:\n    note: by hand\n    valuez: {text: m}\n")
    with pytest.raises(RegistryError, match=r"presets.yaml:4: presets.fast.valuez: unknown key \(known: note, values\)"):
        load_registry()
    presets.write_text("presets:\n  text-only:\n    values: {text: m}\n")
    with pytest.raises(RegistryError, match=r"presets.yaml:3: presets.text-only: a pipeline of .* has this name"):
        load_registry()
    presets.unlink()
    save_preset("fast", {"text": "m", "lr": 0.001}, "tuned by hand")
    save_preset("slow", {"text": "m", "lr": 1.0e-5}, "another")
    save_preset("fast", {"text": "m", "lr": 0.002, "bogus": 1}, "tuned again")  # replaces its entry, keeps slow
    assert load_registry()["pipelines"] == {"text-only": {"text": "m"}, "fast": {"text": "m", "lr": 0.002, "bogus": 1},
                                            "slow": {"text": "m", "lr": 1.0e-5}}
    assert presets.read_text().startswith("# Tuned presets") and "note: tuned again" in presets.read_text()
    with pytest.raises(RegistryError, match=r"presets.yaml:\d+: pipeline 'fast' has unknown keys \['bogus'\]"):
        resolve({"dataset": "toy", "pipeline": "fast"})
    with pytest.raises(RegistryError, match="has a pipeline of that name"):
        save_preset("text-only", {"text": "m"}, "")


def test_missing_and_corrupt_images_are_reported_not_raised(tmp_path):
    from PIL import Image

    Image.new("RGB", (5, 4), (10, 20, 30)).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    image, why = open_image(tmp_path / "good.png")
    assert why is None and image.size == (5, 4) and image.mode == "RGB"
    image, why = open_image(tmp_path / "bad.jpg")
    assert image is None and why.startswith(f"{tmp_path / 'bad.jpg'}: corrupt image")
    assert open_image(tmp_path / "gone.jpg") == (None, f"{tmp_path / 'gone.jpg'}: file not found")
    assert open_image(None) == (None, "no image file")


def test_stats_cli_counts_corrupt_images(tmp_path, monkeypatch):
    from PIL import Image

    data = registry(tmp_path, monkeypatch, "datasets:\n  toy: {}\n")
    ids = [f"i{k}" for k in range(6)]
    write_tsv(data / "toy" / "items.tsv", [f"{i}\tTitle {i}" for i in ids] + ["i0\tdup"])
    write_tsv(data / "toy" / "users.tsv", ["u1\t" + " ".join(ids), "u2\ti1 i2 zz"])
    (data / "toy" / "images").mkdir()
    for i in ids[:3]:
        Image.new("RGB", (4, 4)).save(data / "toy" / "images" / f"{i}.jpg")
    (data / "toy" / "images" / "i3.jpg").write_bytes(b"garbage")
    result = CliRunner().invoke(main, ["data", "stats", "toy", "--check-images"])  # output holds stderr too
    assert result.exit_code == 0, result.output
    out = result.output
    assert "a duplicate item id, 1 time(s) (first at line 7)" in out
    assert "an item id not in the items file, 1 time(s) (first at line 2)" in out
    assert "items with an image        4  (2 take the missing-image path; 4 in the items file)" in out
    assert "corrupt images             1  (e.g. " in out
    strict = CliRunner().invoke(main, ["data", "stats", "toy", "--strict"])
    assert strict.exit_code == 2 and "items.tsv:7: a duplicate item id" in strict.output


@needs_scientific
def test_stats_cli_scientific():
    result = CliRunner().invoke(main, ["data", "stats", "scientific", "--data-dir", str(SCIENTIFIC)])
    assert result.exit_code == 0, result.output
    values = {line[:26].strip(): line[26:].strip() for line in result.output.splitlines()}
    assert values["users"].startswith("12,076")
    assert values["items"].startswith("20,314  (20,825 in the items file)")
    assert values["interactions"].startswith("81,711  (85,211 before truncation)")
    assert values["zero-popularity items"] == "4,008"
    assert values["repeat targets valid/test"] == "723 / 621"
    assert values["items with an image"].startswith("0 ")


@needs_posters
def test_stats_cli_ml100k(ml100k_dir):
    result = CliRunner().invoke(main, ["data", "stats", "ml-100k", "--data-dir", str(ml100k_dir)])
    assert result.exit_code == 0, result.output
    values = {line[:26].strip(): line[26:].strip() for line in result.output.splitlines()}
    assert [values[k].split()[0] for k in ("users", "items", "interactions", "zero-popularity items")] == \
        ["943", "1,304", "12,259", "41"]
    assert values["repeat targets valid/test"] == "0 / 0"
    assert values["items with an image"].startswith("1,260  (44 take the missing-image path; 1,612")


def test_fingerprint_covers_ids_fields_images_and_options(tmp_path, monkeypatch):
    data = registry(tmp_path, monkeypatch, "datasets:\n  toy: {fields: [title, blurb]}\n")
    write_tsv(data / "toy" / "items.tsv", ["a\tA\tx", "b\tB\ty"])
    write_tsv(data / "toy" / "users.tsv", ["u\ta b a b a"])
    ds = load_dataset("toy")
    base = ds.fingerprint(["title"])
    assert base == load_dataset("toy").fingerprint(["title"])  # deterministic
    assert ds.fingerprint(["title"], extra={"text_clean": "raw"}) != base
    assert ds.fingerprint(["blurb"]) != base
    (data / "toy" / "images").mkdir()
    (data / "toy" / "images" / "a.jpg").write_bytes(b"12345")
    with_image = load_dataset("toy").fingerprint(["title"], images=True)
    (data / "toy" / "images" / "a.jpg").write_bytes(b"123456")
    assert load_dataset("toy").fingerprint(["title"], images=True) != with_image
    write_tsv(data / "toy" / "items.tsv", ["a\tA\tx", "b\tB\tz"])
    assert load_dataset("toy").fingerprint(["title"]) == base  # blurb is not part of a title cache
    assert load_dataset("toy").fingerprint(["blurb"]) != ds.fingerprint(["blurb"])


def test_bad_images_become_placeholders_flagged_in_the_cache(tmp_path):
    """A batch with a good, a corrupt and a missing image: no crash, and the cache's `missing` says which."""
    import numpy as np
    from PIL import Image

    from iisan.cache_store import CacheWriter, Manifest, open_cache

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    ids = ["good", "broken", "absent"]
    images, missing, problems = load_item_images(ImageIndex.build([folder]), ids)
    assert missing == [False, True, True]
    assert images[0].size == (8, 6)
    assert images[1].size == (224, 224) and images[1].getpixel((0, 0)) == PLACEHOLDER_RGB
    assert problems[0].startswith("item 'broken': ") and "corrupt image" in problems[0]
    assert problems[1] == "item 'absent': no image file"
    manifest = Manifest(dataset="toy", dataset_fingerprint="f", model="m", model_source="s", pooling="cls",
                        layers=[0], total_layers=1, hidden_size=2, rows=4)
    path = tmp_path / "m.zarr"
    with CacheWriter.open(path, manifest, ids) as writer:
        writer.write_chunk(0, np.zeros((3, 1, 2)), missing)
    with open_cache(path) as store:
        assert store.backend.read_missing().tolist() == [False, False, True, True]


def test_shipped_files_are_found_in_each_install_layout(tmp_path, monkeypatch):
    import iisan.registry as registry

    monkeypatch.delenv("IISAN_PIPELINES", raising=False)
    monkeypatch.setattr(registry, "REPO_ROOT", tmp_path / "target")
    monkeypatch.setattr(registry.sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.setattr(registry.site, "getuserbase", lambda: str(tmp_path / "user"))
    assert registry.registry_path() == tmp_path / "target" / "pipelines.yaml"  # none: the error names this one
    for base in ("user", "prefix", "target"):  # later in the loop = earlier in the search order
        (tmp_path / base / "share" / "iisan-versa" / "plans").mkdir(parents=True)
        (tmp_path / base / "share" / "iisan-versa" / "pipelines.yaml").write_text("datasets: {}\n")
        assert registry.registry_path() == tmp_path / base / "share" / "iisan-versa" / "pipelines.yaml"
        assert registry.installed_file("plans") == tmp_path / base / "share" / "iisan-versa" / "plans"
    (tmp_path / "target" / "pipelines.yaml").write_text("datasets: {}\n")  # a source checkout's own copy wins
    assert registry.registry_path() == tmp_path / "target" / "pipelines.yaml"
    monkeypatch.setenv("IISAN_PIPELINES", str(tmp_path / "elsewhere.yaml"))
    assert registry.registry_path() == tmp_path / "elsewhere.yaml"


@pytest.mark.slow
def test_a_target_install_of_the_wheel_finds_its_registry_and_plans(tmp_path):
    """`pip install --target DIR` (how `make gpu-check` installs) puts the wheel's data files under
    DIR/share/iisan-versa, not under sys.prefix: the installed package must find them there."""
    import os
    import subprocess
    import sys

    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl"), str(REPO_ROOT)],
                   check=True, cwd=REPO_ROOT)
    wheel = next((tmp_path / "whl").glob("iisan_versa-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True)
    env = {k: v for k, v in os.environ.items() if k != "IISAN_PIPELINES"} | {"PYTHONPATH": str(tmp_path / "site")}
    probe = ("import iisan.registry as r, iisan.experiments.study as s; "
             "print(r.__file__); print(r.registry_path()); print(s.PLANS_DIR); print(s.load_plan('quick').name); "
             "print('iisan-tuned-ml100k-title' in r.load_registry()['pipelines'])")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env).stdout.split()
    share = tmp_path / "site" / "share" / "iisan-versa"
    assert out == [str(tmp_path / "site" / "iisan" / "registry.py"), str(share / "pipelines.yaml"),
                   str(share / "plans"), "quick", "True"]  # the tuned presets ship too (presets.yaml)
