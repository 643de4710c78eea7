"""Stage 1 on tiny models built from configs: pooling, layer slices, item order, bad content, resume after
SIGKILL, 2-process sharding."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from iisan.cache_store import open_cache
from iisan.runtime import free_port
from iisan.cache_store.backends import backend_for
from iisan.cache_store.inspect import verify_store
from iisan.cli import main as iisan_cli
from iisan.extract.encode import ChunkEncoder, clean_text
from iisan.extract.models import describe_backbone, load_backbone, model_spec
from iisan.extract.run import ExtractConfig, run_extraction
from iisan.data.dataset import load_dataset

from conftest import forget_final_state, write_tsv
from tiny_models import WORDS, build_tiny_bert, build_tiny_dinov2, build_tiny_llama, write_registry

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {"bert": build_tiny_bert(root / "bert"), "bert-wide": build_tiny_bert(root / "bert-wide", 4, 128),
            "llama": build_tiny_llama(root / "llama"), "dino": build_tiny_dinov2(root / "dino")}


def toy_items(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for k in range(n):
        title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        if k % 17 == 5:
            title = f"  {title} &amp; {rng.choice(WORDS)}"
        if k == 7:
            title = ""
        lines.append(f"it{k:05d}\t{title}")
    return lines


@pytest.fixture
def toy(tmp_path, monkeypatch, zoo):
    """Dataset `toy` (300 items, some with images) and `big` (3,000 items), and a registry of tiny models."""
    data = tmp_path / "data"
    items = toy_items(300)
    write_tsv(data / "toy" / "items.tsv", items)
    write_tsv(data / "toy" / "users.tsv", [f"u{u}\t" + " ".join(f"it{(u * 7 + j) % 250:05d}" for j in range(6))
                                           for u in range(40)])
    write_tsv(data / "big" / "items.tsv", toy_items(3000, seed=1))
    write_tsv(data / "big" / "users.tsv", ["u0\tit00000 it00001 it00002 it00003 it00004"])
    models = {
        "tiny-bert": {"source": str(zoo["bert"]), "kind": "text", "family": "encoder", "max_tokens": 16},
        "tiny-bert-mean": {"source": str(zoo["bert"]), "kind": "text", "family": "encoder", "pooling": "mean"},
        "wide-bert": {"source": str(zoo["bert-wide"]), "kind": "text", "family": "encoder", "batch_size": 8},
        "tiny-llama": {"source": str(zoo["llama"]), "kind": "text", "family": "decoder"},
        "tiny-dino": {"source": str(zoo["dino"]), "kind": "image", "family": "vision", "batch_size": 16},
    }
    registry = write_registry(tmp_path / "pipelines.yaml", models, {"toy": {}, "big": {}})
    monkeypatch.setenv("IISAN_PIPELINES", str(registry))
    monkeypatch.setenv("IISAN_DATA_DIR", str(data))
    return tmp_path


def states_of(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    backend = backend_for(path).open(path)
    try:
        rows = backend.shape()[0]
        return backend.read_rows(0, rows), backend.read_item_ids(), backend.read_missing()
    finally:
        backend.close()


def extract(toy, **kwargs):
    cfg = ExtractConfig(**{"dataset": "toy", "out": toy / "cache", "chunk_rows": 32, "progress": False, **kwargs})
    return run_extraction(cfg, log=lambda m: None)


@pytest.mark.parametrize("model, padding_side", [("tiny-bert", "right"), ("tiny-bert-mean", "right"),
                                                 ("tiny-llama", "right"), ("tiny-llama", "left")])
def test_pooling_a_padded_batch_equals_each_item_alone(toy, model, padding_side):
    spec = model_spec(model)
    backbone = load_backbone(describe_backbone(spec), "cpu")
    backbone.preprocessor.padding_side = padding_side
    dataset = load_dataset("toy")
    layers = list(range(backbone.info.n_hidden_states))
    encoder = ChunkEncoder(backbone, dataset, layers, batch_size=16)
    positions = range(0, 16)  # titles of 1..12 words: real padding in the batch
    batch_inputs, _ = encoder.inputs(positions)
    assert (batch_inputs["attention_mask"] == 0).any()
    assert (batch_inputs["input_ids"][batch_inputs["attention_mask"].bool()] > 8).float().mean() > 0.5  # real words
    pad_column = 0 if padding_side == "left" else -1
    assert (batch_inputs["attention_mask"][:, pad_column] == 0).any()
    together = encoder.pooled(batch_inputs, encoder.forward(batch_inputs))
    for i, p in enumerate(positions):
        alone_inputs, _ = encoder.inputs([p])
        alone = encoder.pooled(alone_inputs, encoder.forward(alone_inputs))
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=0)


def test_pool_reads_only_real_tokens_on_either_side():
    from iisan.extract.pooling import pool

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert torch.equal(pool(hidden, left, "cls"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    assert torch.equal(pool(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))
    assert torch.equal(pool(hidden, right, "cls"), torch.stack([hidden[0, 0], hidden[1, 0]]))
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    assert torch.allclose(pool(hidden, left, "mean"), torch.stack([hidden[0, 2:].mean(0), hidden[1, 1:].mean(0)]))
    assert torch.allclose(pool(hidden, None, "mean"), hidden.mean(1))
    assert torch.equal(pool(hidden, None, "cls"), hidden[:, 0])


def test_extraction_keeps_every_item_in_file_order_and_the_selected_slices(toy):
    full = extract(toy, model="tiny-bert", layers="all", storage_dtype="float32", out=toy / "all")
    even = extract(toy, model="tiny-bert", storage_dtype="float32")
    assert even.complete and full.complete and even.items_encoded == 300
    states_all, ids, missing = states_of(full.path)
    states_even, ids_even, _ = states_of(even.path)
    assert ids == ids_even == [""] + [f"it{k:05d}" for k in range(300)]  # items no user touches included
    assert states_all.shape == (301, 4, 32) and states_even.shape == (301, 3, 32)
    assert np.array_equal(states_even, states_all[:, [0, 1, 3]])       # even for 3 blocks: [0, 1, 3]
    assert missing.tolist() == [False] + [k == 7 for k in range(300)]   # the empty title
    with open_cache(even.path) as store:
        m = store.manifest
        assert (m.layers, m.total_layers, m.layer_selection, m.pooling) == ([0, 1, 3], 4, "even", "cls")
        assert m.fingerprint_inputs == {"fields": ["title"], "images": False, "extra": {"text_clean": "clean"}}
        assert m.preprocessing["max_tokens"] == 16 and m.model_revision.startswith("local:")
    assert verify_store(even.path) == []
    # Slow reference: each item alone, straight through the model.
    backbone = load_backbone(describe_backbone(model_spec("tiny-bert")), "cpu")
    texts = [clean_text(line.split("\t", 1)[1], "clean") for line in toy_items(300)]
    for k in (0, 5, 7, 150, 299):
        text = texts[k] or backbone.preprocessor.unk_token  # an empty title is encoded as [UNK], flagged
        x = backbone.preprocessor([text], truncation=True, max_length=16, return_tensors="pt")
        with torch.inference_mode():
            hs = backbone.model(**x, output_hidden_states=True).hidden_states
        expected = torch.stack([hs[i][0, 0] for i in range(4)]).numpy()
        np.testing.assert_allclose(states_all[k + 1], expected, atol=1e-5)


def test_text_cleaning_is_part_of_the_fingerprint(toy):
    clean = extract(toy, model="tiny-bert", storage_dtype="float32")
    raw = extract(toy, model="tiny-bert", storage_dtype="float32", text_clean="raw", out=toy / "raw")
    with open_cache(clean.path) as a, open_cache(raw.path) as b:
        assert a.manifest.dataset_fingerprint != b.manifest.dataset_fingerprint
    s_clean, _, _ = states_of(clean.path)
    s_raw, _, _ = states_of(raw.path)
    entity_rows = [k + 1 for k in range(300) if k % 17 == 5]
    other_rows = [k + 1 for k in range(300) if k % 17 != 5]
    assert not np.allclose(s_clean[entity_rows], s_raw[entity_rows])   # "&amp;" vs "&", leading spaces
    np.testing.assert_allclose(s_clean[other_rows], s_raw[other_rows], atol=1e-5)  # only padding differs
    # Resuming a store with another cleaning mode is refused, naming the difference.
    with pytest.raises(Exception, match="dataset_fingerprint"):
        extract(toy, model="tiny-bert", storage_dtype="float32", text_clean="raw")


def test_images_missing_and_corrupt_are_grey_and_flagged(toy):
    from PIL import Image

    folder = toy / "data" / "toy" / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(0, 300, 3):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / f"it{k:05d}.jpg")
    (folder / "it00003.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")       # corrupt
    (folder / "it00006.png").write_bytes(b"")                               # empty file
    result = extract(toy, model="tiny-dino", storage_dtype="float32")
    states, _, missing = states_of(result.path)
    has_image = {k for k in range(0, 300, 3)} - {3}
    assert missing.tolist() == [False] + [k not in has_image for k in range(300)]
    assert result.missing == 300 - len(has_image)
    assert any("corrupt image" in p for p in result.problems)
    # Every placeholder row is the encoding of the same mid-grey image; real images differ from it.
    assert np.allclose(states[2], states[3], atol=1e-5) and np.allclose(states[4], states[2], atol=1e-5)
    assert not np.allclose(states[1], states[2])
    with open_cache(result.path) as store:
        assert store.manifest.fingerprint_inputs["images"] is True
        assert store.manifest.preprocessing["image_processor"]["crop_size"] == {"height": 28, "width": 28}
    assert verify_store(result.path) == []


def test_bad_requests(toy):
    with pytest.raises(Exception, match="--field is for text models"):
        extract(toy, model="tiny-dino", text_field="title")
    with pytest.raises(Exception, match="dataset 'toy' has no images"):
        extract(toy, model="tiny-dino")
    with pytest.raises(Exception, match="no text field 'blurb'"):
        extract(toy, model="tiny-bert", text_field="blurb")
    with pytest.raises(Exception, match="unknown model 'nope'"):
        extract(toy, model="nope")


def test_cli_extract_and_stats(toy):
    runner = CliRunner()
    result = runner.invoke(iisan_cli, ["extract", "--model", "tiny-bert", "--dataset", "toy", "--out",
                                       str(toy / "cache"), "--no-progress", "--layers", "0,2", "--chunk-rows", "32"])
    assert result.exit_code == 0, result.output
    assert "encoded 300 items in 10 chunk(s)" in result.output and "store complete" in result.output
    again = runner.invoke(iisan_cli, ["extract", "--model", "tiny-bert", "--dataset", "toy", "--out",
                                      str(toy / "cache"), "--no-progress", "--layers", "0,2", "--chunk-rows", "32"])
    assert "nothing to encode: 10 chunk(s) already done; store complete" in again.output
    assert "Loading weights" not in again.output  # a complete store loads no model
    changed = runner.invoke(iisan_cli, ["extract", "--model", "tiny-bert", "--dataset", "toy", "--out",
                                        str(toy / "cache"), "--no-progress", "--chunk-rows", "32"])
    assert changed.exit_code == 2 and "layers: store has [0, 2], this run has [0, 1, 3]" in changed.output


def _done_flags(path: Path) -> np.ndarray | None:
    try:
        return backend_for(path).open(path).read_done()
    except Exception:
        return None


@pytest.mark.slow
def test_resume_after_sigkill_forwards_only_unflagged_chunks(toy):
    out = toy / "killed"
    path = out / "big" / "wide-bert.zarr"
    cmd = [str(BIN / "iisan"), "extract", "--model", "wide-bert", "--dataset", "big", "--out", str(out),
           "--chunk-rows", "64", "--no-progress", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    done = None
    while time.time() < deadline and proc.poll() is None:
        done = _done_flags(path)
        if done is not None and done.any():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = _done_flags(path)
    assert done is not None and 0 < done.sum() < len(done), "the kill must land after a chunk and before the end"
    undone = [c for c in range(len(done)) if not done[c]]
    resumed = run_extraction(ExtractConfig(model="wide-bert", dataset="big", out=out, chunk_rows=64,
                                           storage_dtype="float32", progress=False), log=lambda m: None)
    assert resumed.chunks_written == undone                   # continues from the first chunk not flagged
    assert resumed.chunks_skipped == len(done) - len(undone)
    assert resumed.items_encoded == sum(min(3001, (c + 1) * 64) - max(1, c * 64) for c in undone)
    reference = run_extraction(ExtractConfig(model="wide-bert", dataset="big", out=toy / "ref", chunk_rows=64,
                                             storage_dtype="float32", progress=False), log=lambda m: None)
    got, want = states_of(resumed.path), states_of(reference.path)
    assert got[1] == want[1]
    assert np.array_equal(got[0], want[0])
    assert verify_store(resumed.path) == []


def torchrun_extract(out: Path) -> subprocess.CompletedProcess:
    """`iisan extract` of tiny-bert on toy in 2 CPU processes (one thread each) on a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--no-python", str(BIN / "iisan"), "extract", "--model",
           "tiny-bert", "--dataset", "toy", "--out", str(out), "--chunk-rows", "32", "--no-progress",
           "--dtype", "float32", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_process_sharding_with_torchrun(toy):
    out = toy / "sharded"
    result = torchrun_extract(out)
    written = {}
    for line in result.stderr.splitlines():
        if "rank " in line and "encoded" in line:
            rank = int(line.split("rank ", 1)[1].split("/", 1)[0])
            chunks = line.split("chunk(s) [", 1)[1].split("]", 1)[0]
            written[rank] = {int(c) for c in chunks.split(",")}
    assert set(written) == {0, 1}
    assert written[0] and written[1] and not written[0] & written[1]
    assert written[0] | written[1] == set(range(10))
    single = extract(toy, model="tiny-bert", storage_dtype="float32", out=toy / "single")
    sharded_path = out / "toy" / "tiny-bert.zarr"
    got, want = states_of(sharded_path), states_of(single.path)
    assert got[1] == want[1] and np.array_equal(got[0], want[0]) and np.array_equal(got[2], want[2])
    assert verify_store(sharded_path) == []


@pytest.mark.slow
def test_one_row_chunks(toy):
    """chunk_rows = 1: chunk 0 holds only the padding row; every other chunk one item."""
    one = extract(toy, model="tiny-bert", storage_dtype="float32", chunk_rows=1, out=toy / "one")
    ref = extract(toy, model="tiny-bert", storage_dtype="float32", batch_size=1, out=toy / "ref")
    assert one.complete and one.items_encoded == 300 and len(one.chunks_written) == 301
    got, want = states_of(one.path), states_of(ref.path)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)


@pytest.mark.slow
def test_sharded_resume_where_one_rank_has_nothing_left(toy):
    """Rank 1's chunks are all done, rank 0's are not: rank 1 finishes at once, rank 0 encodes its chunks
    and waits for nobody; the store ends complete and equal to a single-process run."""
    out = toy / "sharded"
    single = extract(toy, model="tiny-bert", storage_dtype="float32", out=out)
    path = single.path
    reference = states_of(path)
    backend = backend_for(path).open(path, writable=True)
    for chunk in range(0, 10, 2):
        backend.group["done"][chunk] = False
    backend.group.attrs["iisan"] = {**backend.group.attrs["iisan"], "complete": False}
    result = torchrun_extract(out)
    assert "rank 1/2: nothing to encode: 5 chunk(s) already done" in result.stderr
    assert "rank 0/2: encoded 159 items in 5 chunk(s) [0, 2, 4, 6, 8]" in result.stderr  # chunk 0 holds row 0
    got = states_of(path)
    assert got[1] == reference[1] and np.array_equal(got[0], reference[0])
    assert verify_store(path) == []


# The model's final output (the pooled `last_hidden_state`, after a final norm where the model has one), which
# the frozen baseline reads: stored as array `final` where it differs from the last hidden state.

def add_images(toy: Path) -> None:
    from PIL import Image

    folder = toy / "data" / "toy" / "images"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(0, 300, 3):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / f"it{k:05d}.jpg")


def final_of(path: Path) -> np.ndarray | None:
    backend = backend_for(path).open(path)
    try:
        return backend.read_final_rows(0, backend.shape()[0]) if backend.has_final() else None
    finally:
        backend.close()


def test_probe_tells_a_final_norm_from_none(toy):
    add_images(toy)
    dataset = load_dataset("toy")
    for model, expected in (("tiny-dino", "stored"), ("tiny-bert", "last_layer"), ("tiny-llama", "last_layer")):
        backbone = load_backbone(describe_backbone(model_spec(model)), "cpu")
        encoder = ChunkEncoder(backbone, dataset, [0], batch_size=4)
        assert encoder.probe_final_state() == expected, model
        assert encoder.probe_final_state(7) == expected and encoder.problems == []  # item 7: no image, no title
        # The same question asked of the model's outputs directly.
        inputs, _ = encoder.inputs([0])
        outputs = encoder.forward(inputs)
        assert torch.equal(outputs.last_hidden_state, outputs.hidden_states[-1]) == (expected == "last_layer")


@pytest.mark.parametrize("fmt, dtype", [("zarr", "float32"), ("h5", "float32"), ("zarr", "float16")])
def test_a_final_norm_output_is_stored_pooled(toy, fmt, dtype):
    from iisan.cache_store import load_cache
    from iisan.data.images import load_item_images
    from iisan.extract.pooling import pool

    add_images(toy)
    result = extract(toy, model="tiny-dino", storage_dtype=dtype, fmt=fmt)
    with open_cache(result.path) as store:
        assert store.manifest.final_state == "stored" and store.manifest.layers == [0, 1, 3]
    states, ids, _ = states_of(result.path)
    final = final_of(result.path)
    assert final.shape == (301, 32) and final.dtype == np.dtype(dtype)
    assert np.array_equal(final[0], np.zeros(32))
    # Reference: each item alone through the model; its last_hidden_state (after the final LayerNorm), pooled.
    backbone = load_backbone(describe_backbone(model_spec("tiny-dino")), "cpu")
    dataset = load_dataset("toy")
    atol, rtol = (1e-6, 0) if dtype == "float32" else (1e-3, 1e-3)
    for k in (0, 1, 3, 7, 150, 299):  # with and without an image
        images, _, _ = load_item_images(dataset.images, [dataset.items.ids[k]])
        with torch.inference_mode():
            out = backbone.model(**backbone.preprocessor(images=images, return_tensors="pt"), output_hidden_states=True)
        np.testing.assert_allclose(final[k + 1], pool(out.last_hidden_state, None, "cls")[0].numpy(), atol=atol, rtol=rtol)
        np.testing.assert_allclose(states[k + 1, 2], pool(out.hidden_states[-1], None, "cls")[0].numpy(), atol=atol,
                                   rtol=rtol)
    after_norm = np.abs(final[1:].astype(np.float32) - states[1:, 2].astype(np.float32))
    assert (after_norm.max(axis=1) > 0).all() and after_norm.max() > 0.1  # every item's differs from hidden state 3
    # Loaded in the caller's item order, like the states.
    order = list(reversed(ids[1:]))
    loaded = load_cache(result.path, item_ids=order, dtype=torch.float32, final=True)
    assert torch.equal(loaded.final[0], torch.zeros(32))
    assert torch.equal(loaded.final[1:], torch.from_numpy(final[1:][::-1].astype(np.float32).copy()))
    assert torch.equal(loaded.states[1:, 2], torch.from_numpy(states[1:, 2][::-1].astype(np.float32).copy()))
    assert verify_store(result.path) == []


def test_a_model_without_final_norm_stores_no_final_array(toy):
    from iisan.cache_store import load_cache

    result = extract(toy, model="tiny-bert", storage_dtype="float32")
    with open_cache(result.path) as store:
        assert store.manifest.final_state == "last_layer" and store.manifest.layers == [0, 1, 3]
    assert final_of(result.path) is None
    states, _, _ = states_of(result.path)
    loaded = load_cache(result.path, layers=[0], final=True)
    assert loaded.layers == [0] and torch.equal(loaded.final, torch.from_numpy(states[:, 2]))  # hidden state 3
    assert verify_store(result.path) == []


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_a_store_written_before_final_state_is_refused_for_the_final_output(toy, monkeypatch, fmt):
    import iisan.extract.run as run_module
    from iisan.cache_store import CacheError, load_cache

    result = extract(toy, model="tiny-bert", storage_dtype="float32", fmt=fmt)
    states, _, _ = states_of(result.path)
    forget_final_state(result.path)
    with open_cache(result.path) as store:
        assert store.manifest.final_state == ""
    loaded = load_cache(result.path)  # the states load as before
    assert torch.equal(loaded.states, torch.from_numpy(states)) and loaded.final is None
    assert verify_store(result.path) == []
    with pytest.raises(CacheError, match=r"written before stores recorded the model's final output \(the pooled "
                                         r"last_hidden_state, after the final norm\), which the frozen baseline reads; "
                                         r"re-extract: iisan extract --model tiny-bert --dataset toy --overwrite"):
        load_cache(result.path, final=True)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as patched:
        patched.setattr(run_module, "load_backbone", no_model)
        with pytest.raises(CacheError, match=r"(?s)cannot be resumed:\n  final_state: store has '' .*--overwrite"):
            extract(toy, model="tiny-bert", storage_dtype="float32", fmt=fmt)
    again = extract(toy, model="tiny-bert", storage_dtype="float32", fmt=fmt, overwrite=True)
    with open_cache(again.path) as store:
        assert store.manifest.final_state == "last_layer" and store.manifest.complete
    assert np.array_equal(states_of(again.path)[0], states)
    assert torch.equal(load_cache(again.path, final=True).final, torch.from_numpy(states[:, 2]))


def test_a_complete_store_loads_no_model_and_an_incomplete_one_rewrites_its_final(toy, monkeypatch):
    import iisan.extract.run as run_module

    add_images(toy)
    first = extract(toy, model="tiny-dino", storage_dtype="float32")
    reference_states, reference_final = states_of(first.path)[0], final_of(first.path)
    real_load = run_module.load_backbone
    loads = []

    def counted(*args, **kwargs):
        loads.append(1)
        return real_load(*args, **kwargs)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a complete store")

    monkeypatch.setattr(run_module, "load_backbone", no_model)
    again = extract(toy, model="tiny-dino", storage_dtype="float32")
    assert again.complete and again.chunks_written == [] and again.chunks_skipped == 10
    # Two chunks lost: flags cleared, their final rows zeroed; the re-run probes, then rewrites them.
    backend = backend_for(first.path).open(first.path, writable=True)
    for chunk in (2, 5):
        backend.group["done"][chunk] = False
        backend.group["final"][chunk * 32:(chunk + 1) * 32] = 0
    backend.group.attrs["iisan"] = {**backend.group.attrs["iisan"], "complete": False}
    monkeypatch.setattr(run_module, "load_backbone", counted)
    resumed = extract(toy, model="tiny-dino", storage_dtype="float32")
    assert resumed.chunks_written == [2, 5] and resumed.complete and loads == [1]
    assert np.array_equal(final_of(first.path), reference_final)
    assert np.array_equal(states_of(first.path)[0], reference_states)
    assert verify_store(first.path) == []


KILL_AFTER_CHUNKS = """
import os, signal
from iisan.cache_store import CacheWriter
from iisan.extract.run import ExtractConfig, run_extraction
write_chunk, calls = CacheWriter.write_chunk, []
def dying(self, *args, **kwargs):
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # after 3 chunks, without closing anything
    calls.append(1)
    write_chunk(self, *args, **kwargs)
CacheWriter.write_chunk = dying
run_extraction(ExtractConfig(model="tiny-dino", dataset="toy", out={out!r}, fmt={fmt!r}, chunk_rows=32,
                             storage_dtype="float32", progress=False), log=lambda m: None)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_a_killed_extraction_resumes_to_the_same_final(toy, fmt):
    add_images(toy)
    out = toy / "killed"
    code = KILL_AFTER_CHUNKS.format(out=str(out), fmt=fmt)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    path = out / "toy" / f"tiny-dino.{fmt}"
    assert _done_flags(path).tolist() == [True] * 3 + [False] * 7
    resumed = extract(toy, model="tiny-dino", storage_dtype="float32", fmt=fmt, out=out)
    assert resumed.chunks_written == list(range(3, 10)) and resumed.complete
    reference = extract(toy, model="tiny-dino", storage_dtype="float32", fmt=fmt, out=toy / "ref")
    assert np.array_equal(final_of(resumed.path), final_of(reference.path))
    assert np.array_equal(states_of(resumed.path)[0], states_of(reference.path)[0])
    assert verify_store(resumed.path) == []
