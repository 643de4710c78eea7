"""The cache store in both formats: exact round trips, refusals, resume after an interruption, sharding,
`cache_store stats` and `verify`."""

from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import iisan
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from iisan.cache_store import CacheError, CacheExpectation, CacheWriter, Manifest, load_cache, open_cache, store_path
from iisan.cache_store.backends import backend_for
from iisan.cache_store.cli import main as cache_cli
from iisan.cache_store.inspect import store_stats, verify_store
from iisan.data.dataset import load_dataset

from conftest import forget_final_state, write_tsv

FORMATS = ["zarr", "h5"]
N_ITEMS, K, D, CHUNK = 300, 3, 8, 64   # 301 rows -> 5 chunks, the last one ragged
LAYERS, TOTAL = [0, 2, 4], 5


def make_manifest(dtype="float16", **overrides) -> Manifest:
    fields = dict(dataset="toy", dataset_fingerprint="sha256:" + "0" * 64, model="tiny-bert",
                  model_source="/models/tiny", pooling="cls", layers=LAYERS, total_layers=TOTAL, hidden_size=D,
                  rows=N_ITEMS + 1, chunk_rows=CHUNK, storage_dtype=dtype,
                  fingerprint_inputs={"fields": ["title"], "images": False, "extra": {}})
    fields.update(overrides)
    return Manifest(**fields)


ITEM_IDS = [f"item{k:04d}" for k in range(N_ITEMS)]


def item_states(seed=0) -> np.ndarray:
    """Deterministic per-item states [N_ITEMS, K, D], as an encoder would give."""
    return np.random.default_rng(seed).standard_normal((N_ITEMS, K, D)).astype(np.float32)


def missing_flags() -> np.ndarray:
    return np.arange(N_ITEMS) % 7 == 3


def item_finals(seed=0) -> np.ndarray:
    """Deterministic per-item pooled final outputs [N_ITEMS, D] (unlike any layer of item_states)."""
    return np.random.default_rng(seed + 100).standard_normal((N_ITEMS, D)).astype(np.float32)


def write(path, manifest=None, chunks=None, rank=0, world=1, seed=0) -> CacheWriter:
    manifest = manifest or make_manifest()
    states, missing = item_states(seed), missing_flags()
    finals = item_finals(seed) if manifest.final_state == "stored" else None
    writer = CacheWriter.open(path, manifest, ITEM_IDS, rank=rank, world_size=world)
    for chunk in writer.pending_chunks() if chunks is None else chunks:
        p = writer.item_positions(chunk)
        writer.write_chunk(chunk, states[p.start:p.stop], missing[p.start:p.stop],
                           None if finals is None else finals[p.start:p.stop])
    writer.finalize()
    writer.close()
    return writer


def read_final(path) -> np.ndarray | None:
    backend = backend_for(Path(path)).open(Path(path))
    try:
        return backend.read_final_rows(0, N_ITEMS + 1) if backend.has_final() else None
    finally:
        backend.close()


def read_all(path) -> tuple[np.ndarray, list[str], np.ndarray]:
    backend = backend_for(Path(path)).open(Path(path))
    try:
        return backend.read_rows(0, N_ITEMS + 1), backend.read_item_ids(), backend.read_missing()
    finally:
        backend.close()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_is_exact(tmp_path, fmt, dtype):
    path = tmp_path / f"m.{fmt}"
    write(path, make_manifest(dtype))
    states, ids, missing = read_all(path)
    assert states.dtype == np.dtype(dtype) and states.shape == (N_ITEMS + 1, K, D)
    assert np.array_equal(states[0], np.zeros((K, D)))
    assert np.array_equal(states[1:], item_states().astype(dtype))
    assert ids == [""] + ITEM_IDS
    assert missing.tolist() == [False] + missing_flags().tolist()
    loaded = load_cache(path, CacheExpectation(model="tiny-bert", pooling="cls"), dtype=torch.float32)
    assert loaded.layers == LAYERS
    assert torch.equal(loaded.states[1:], torch.from_numpy(item_states().astype(dtype).astype(np.float32)))
    with open_cache(path) as store:
        assert store.manifest.complete and store.manifest.package_version == iisan.__version__
        assert store.manifest == make_manifest(dtype, complete=True, package_version=iisan.__version__)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_subset_in_callers_item_order(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    write(path)
    wanted = [ITEM_IDS[k] for k in (299, 5, 64, 0, 128)]
    loaded = load_cache(path, CacheExpectation(layers=[4, 0]), item_ids=wanted, dtype=torch.float32)
    expected = item_states().astype(np.float16).astype(np.float32)[[299, 5, 64, 0, 128]][:, [2, 0], :]
    assert loaded.layers == [4, 0]
    assert loaded.states.shape == (6, 2, D)
    assert torch.equal(loaded.states[0], torch.zeros(2, D))
    assert torch.equal(loaded.states[1:], torch.from_numpy(expected))
    assert loaded.missing.tolist() == [False] + missing_flags()[[299, 5, 64, 0, 128]].tolist()
    batch = torch.tensor([[2, 0], [5, 1]])
    assert torch.equal(loaded.gather(batch), loaded.states[batch])
    with pytest.raises(CacheError, match=r"2 requested item\(s\) are not in the cache, e.g. 'nope', 'gone'"):
        load_cache(path, item_ids=["nope", ITEM_IDS[1], "gone"])


@pytest.mark.parametrize("expect, message", [
    (CacheExpectation(layers=[0, 1, 2]), r"hidden states \[1\] are not kept \(the cache keeps \[0, 2, 4\]"),
    (CacheExpectation(model="other"), r"model is 'tiny-bert', expected 'other'"),
    (CacheExpectation(pooling="mean"), r"pooling is 'cls', expected 'mean'"),
    (CacheExpectation(dataset_fingerprint="sha256:" + "1" * 64), r"dataset fingerprint is sha256:0000"),
    (CacheExpectation(dataset="scientific"), r"dataset is 'toy', expected 'scientific'"),
])
def test_refuses_a_cache_that_does_not_match(tmp_path, expect, message):
    path = tmp_path / "m.zarr"
    write(path)
    with pytest.raises(CacheError, match=message):
        load_cache(path, expect)


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_another_format_version(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    write(path)
    backend = backend_for(path).open(path, writable=True)
    raw = backend.manifest().to_dict()
    raw["format_version"] = 2
    if fmt == "zarr":
        backend.group.attrs["iisan"] = raw
    else:
        import json
        backend.file.attrs["iisan"] = json.dumps(raw)
    backend.close()
    with pytest.raises(CacheError, match=r"cache format version 2, this reader knows version 1"):
        load_cache(path)
    problems = verify_store(path, check_fingerprint=False)
    assert len(problems) == 1 and "cache format version 2" in problems[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupted_store_is_incomplete_and_can_be_completed(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    write(path, chunks=[0, 2])
    assert store_stats(path).complete_percent == pytest.approx(40.0)
    problems = verify_store(path, check_fingerprint=False)
    assert problems == ["incomplete: 2 of 5 chunks done (re-run `iisan extract --model tiny-bert --dataset toy` "
                        "to complete it)"]
    with pytest.raises(CacheError, match=r"cache is incomplete \(40.0% of chunks done\)"):
        load_cache(path)
    writer = CacheWriter.open(path, make_manifest(), ITEM_IDS)
    assert writer.pending_chunks() == [1, 3, 4]
    writer.close()
    write(path)
    reference = tmp_path / f"ref.{fmt}"
    write(reference)
    for got, want in zip(read_all(path), read_all(reference)):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert verify_store(path, check_fingerprint=False) == []


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import test_cache_store as t
    from iisan.cache_store import CacheWriter
    writer = CacheWriter.open({path!r}, t.make_manifest(final_state={final_state!r}), t.ITEM_IDS)
    states, missing, finals = t.item_states(), t.missing_flags(), t.item_finals()
    for n, chunk in enumerate(writer.pending_chunks()):
        if n == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # dies between chunks, without closing anything
        p = writer.item_positions(chunk)
        writer.write_chunk(chunk, states[p.start:p.stop], missing[p.start:p.stop],
                           finals[p.start:p.stop] if {final_state!r} == "stored" else None)
""")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("final_state", ["", "stored"])
def test_store_survives_a_sigkill_between_chunks(tmp_path, fmt, final_state):
    path = tmp_path / f"m.{fmt}"
    code = KILLER.format(tests=str(Path(__file__).parent), path=str(path), final_state=final_state)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    with open_cache(path) as store:
        assert store.backend.read_done().tolist() == [True, True, True, False, False]
        assert not store.manifest.complete
    write(path, make_manifest(final_state=final_state))
    reference = tmp_path / f"ref.{fmt}"
    write(reference, make_manifest(final_state=final_state))
    for got, want in zip(read_all(path), read_all(reference)):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    if final_state == "stored":
        assert np.array_equal(read_final(path), read_final(reference))
        assert verify_store(path, check_fingerprint=False) == []
    else:
        assert read_final(path) is None


def _shard(path: str, rank: int) -> None:
    write(Path(path), rank=rank, world=2, seed=rank)  # each rank writes its own data: overlaps would show


@pytest.mark.slow
def test_two_processes_write_disjoint_chunks(tmp_path):
    path = tmp_path / "m.zarr"
    writer = CacheWriter.open(path, make_manifest(), ITEM_IDS, rank=0, world_size=2)  # rank 0 creates
    assert writer.pending_chunks() == [0, 2, 4]
    writer.close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_shard, args=(str(path), rank)) for rank in (1, 0)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rank1 = CacheWriter.open(path, make_manifest(), ITEM_IDS, rank=1, world_size=2)
    assert rank1.pending_chunks() == [] and rank1.done().all()
    rank1.close()
    states, _, _ = read_all(path)
    by_rank = [item_states(0).astype(np.float16), item_states(1).astype(np.float16)]
    for chunk in range(5):
        rows = make_manifest().chunk_range(chunk)
        lo = max(rows.start, 1)
        assert np.array_equal(states[lo:rows.stop], by_rank[chunk % 2][lo - 1:rows.stop - 1]), chunk
    CacheWriter.open(path, make_manifest(), ITEM_IDS).finalize()
    assert verify_store(path, check_fingerprint=False) == []


RANDOM_KILLER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_cache_store as t
    from iisan.cache_store import CacheWriter
    print("go", flush=True)
    manifest = t.make_manifest(chunk_rows=4)
    states, missing = t.item_states(), t.missing_flags()
    writer = CacheWriter.open({path!r}, manifest, t.ITEM_IDS)
    for chunk in writer.pending_chunks():
        p = writer.item_positions(chunk)
        writer.write_chunk(chunk, states[p.start:p.stop], missing[p.start:p.stop])
    writer.finalize()
""")


@pytest.mark.slow
def test_zarr_store_survives_sigkill_at_any_moment(tmp_path):
    """Kill a writer of 76 small chunks after random delays (creation included), resume each time: the
    finished store equals an uninterrupted one."""
    import random
    import time

    path = tmp_path / "m.zarr"
    code = RANDOM_KILLER.format(tests=str(Path(__file__).parent), path=str(path))
    rng = random.Random(3)
    kills = 0
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.4) if attempt else 0.0)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()
        kills += proc.returncode == -signal.SIGKILL
    assert kills >= 4
    done = write(path, make_manifest(chunk_rows=4))
    assert done.manifest.complete
    reference = tmp_path / "ref.zarr"
    write(reference, make_manifest(chunk_rows=4))
    for got, want in zip(read_all(path), read_all(reference)):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert verify_store(path, check_fingerprint=False) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-created stores left


def test_writer_rules(tmp_path):
    with pytest.raises(CacheError, match="HDF5 stores take one writer"):
        CacheWriter.open(tmp_path / "m.h5", make_manifest(), ITEM_IDS, rank=0, world_size=2)
    with pytest.raises(CacheError, match="store does not exist yet"):
        CacheWriter.open(tmp_path / "n.zarr", make_manifest(), ITEM_IDS, rank=1, world_size=2)
    path = tmp_path / "m.zarr"
    write(path, chunks=[0])
    with pytest.raises(CacheError, match=r"cannot be resumed:\n  pooling: store has 'cls', this run has 'mean'"):
        CacheWriter.open(path, make_manifest(pooling="mean"), ITEM_IDS)
    writer = CacheWriter.open(path, make_manifest(), ITEM_IDS, rank=0, world_size=2)
    with pytest.raises(CacheError, match="rank 0 does not own chunk 1"):
        writer.write_chunk(1, np.zeros((64, K, D)))
    with pytest.raises(CacheError, match=r"states shape \(10, 3, 8\), expected \(64, 3, 8\)"):
        writer.write_chunk(2, np.zeros((10, K, D)))
    bad = np.zeros((64, K, D))
    bad[5, 1, 2] = np.nan
    with pytest.raises(CacheError, match="NaN or Inf"):
        writer.write_chunk(2, bad)
    with pytest.raises(CacheError, match="overflow float16"):
        writer.write_chunk(2, np.full((64, K, D), 1e6))
    assert writer.done().tolist() == [True, False, False, False, False]
    writer.close()
    fresh = CacheWriter.open(path, make_manifest(pooling="mean"), ITEM_IDS, overwrite=True)
    assert fresh.pending_chunks() == [0, 1, 2, 3, 4]
    fresh.close()


# The model's final output (pooled last_hidden_state): array `final` ("stored"), the last hidden state
# ("last_layer"), or unknown in a store written before the manifest recorded it ("").

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_final_array_round_trip_in_callers_item_order(tmp_path, fmt, dtype):
    path = tmp_path / f"m.{fmt}"
    write(path, make_manifest(dtype, final_state="stored"))
    final = read_final(path)
    assert final.dtype == np.dtype(dtype) and final.shape == (N_ITEMS + 1, D)
    assert np.array_equal(final[0], np.zeros(D)) and np.array_equal(final[1:], item_finals().astype(dtype))
    with open_cache(path) as store:
        assert store.manifest.final_state == "stored"
        assert store.load(progress=False).final is None  # only when asked for
    picks = [299, 5, 64, 0, 128]
    loaded = load_cache(path, CacheExpectation(layers=[4]), item_ids=[ITEM_IDS[k] for k in picks],
                        dtype=torch.float32, final=True)
    assert loaded.final.shape == (6, D) and loaded.final.dtype == torch.float32
    assert torch.equal(loaded.final[0], torch.zeros(D))
    assert torch.equal(loaded.final[1:], torch.from_numpy(item_finals().astype(dtype).astype(np.float32)[picks]))
    assert torch.equal(loaded.states[1:, 0], torch.from_numpy(item_states().astype(dtype).astype(np.float32)[picks, 2]))
    assert verify_store(path, check_fingerprint=False) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_last_layer_store_gives_its_last_hidden_state_as_final(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    write(path, make_manifest(final_state="last_layer"))
    assert read_final(path) is None  # nothing extra stored
    wanted = [ITEM_IDS[k] for k in (3, 200, 1)]
    loaded = load_cache(path, CacheExpectation(layers=[0]), item_ids=wanted, final=True)
    assert loaded.layers == [0]
    expected = item_states().astype(np.float16)[[3, 200, 1], LAYERS.index(TOTAL - 1)]
    assert torch.equal(loaded.final[0], torch.zeros(D, dtype=torch.float16))
    assert torch.equal(loaded.final[1:], torch.from_numpy(expected))
    assert verify_store(path, check_fingerprint=False) == []
    # A store that does not keep the last hidden state cannot give it.
    partial = tmp_path / f"p.{fmt}"
    manifest = make_manifest(final_state="last_layer", layers=[0, 2, 3])
    writer = CacheWriter.open(partial, manifest, ITEM_IDS)
    for chunk in writer.pending_chunks():
        p = writer.item_positions(chunk)
        writer.write_chunk(chunk, item_states()[p.start:p.stop])
    writer.finalize()
    writer.close()
    assert load_cache(partial).final is None
    with pytest.raises(CacheError, match=r"final output is its last hidden state \(index 4\), which this store "
                                         r"does not keep \(it keeps \[0, 2, 3\]\).*--layers 0,2,3,4 --overwrite"):
        load_cache(partial, final=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_old_store_loads_its_states_but_not_a_final_output(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    write(path)
    before = load_cache(path, dtype=torch.float32)
    forget_final_state(path)
    with open_cache(path) as store:
        assert store.manifest.final_state == ""
        assert store.manifest == make_manifest(complete=True, package_version=iisan.__version__)
    after = load_cache(path, dtype=torch.float32)
    assert torch.equal(after.states, before.states) and after.final is None
    assert verify_store(path, check_fingerprint=False) == []
    message = (rf"{path}: written before stores recorded the model's final output \(the pooled last_hidden_state, "
               rf"after the final norm\), which the frozen baseline reads; re-extract: iisan extract --model "
               rf"tiny-bert --dataset toy --overwrite")
    with pytest.raises(CacheError, match=message):
        load_cache(path, final=True)
    with open_cache(path) as store, pytest.raises(CacheError, match=message):
        store.load(final=True)
    # A writer that records the final output does not resume it; the probe (a model load) is not run.
    probed = []
    with pytest.raises(CacheError, match=r"(?s)cannot be resumed:\n  final_state: store has '' \(written before "
                                         r"stores recorded the model's final output.*--overwrite"):
        CacheWriter.open(path, make_manifest(), ITEM_IDS, probe_final_state=lambda: probed.append(1) or "stored")
    assert probed == []
    with pytest.raises(CacheError, match=r"final_state: store has '', this run has 'stored'"):
        CacheWriter.open(path, make_manifest(final_state="stored"), ITEM_IDS)
    CacheWriter.open(path, make_manifest(), ITEM_IDS).close()  # a writer that records nothing still attaches


def test_probe_runs_only_where_the_model_is_needed(tmp_path):
    calls = []

    def probe(value):
        return lambda: calls.append(value) or value

    path = tmp_path / "m.zarr"
    writer = CacheWriter.open(path, make_manifest(), ITEM_IDS, rank=0, world_size=2, probe_final_state=probe("stored"))
    assert calls == ["stored"] and writer.manifest.final_state == "stored"  # created: probed
    p = writer.item_positions(0)
    writer.write_chunk(0, item_states()[p.start:p.stop], final=item_finals()[p.start:p.stop])
    writer.close()
    with open_cache(path) as store:
        assert store.manifest.final_state == "stored" and store.backend.has_final()
    # Chunks left for this rank: the probe confirms the store's value; a different answer is refused.
    writer = CacheWriter.open(path, make_manifest(), ITEM_IDS, rank=1, world_size=2, probe_final_state=probe("stored"))
    assert calls == ["stored"] * 2 and writer.manifest.final_state == "stored"
    for chunk in writer.pending_chunks():
        p = writer.item_positions(chunk)
        writer.write_chunk(chunk, item_states()[p.start:p.stop], final=item_finals()[p.start:p.stop])
    writer.close()
    with pytest.raises(CacheError, match=r"final_state: store has 'stored', this run has 'last_layer'"):
        CacheWriter.open(path, make_manifest(), ITEM_IDS, rank=0, world_size=2, probe_final_state=probe("last_layer"))
    # Nothing left for this rank (rank 1 is done): the store's value, no probe.
    writer = CacheWriter.open(path, make_manifest(), ITEM_IDS, rank=1, world_size=2, probe_final_state=probe("x"))
    assert writer.pending_chunks() == [] and writer.manifest.final_state == "stored"
    writer.close()
    assert calls == ["stored", "stored", "last_layer"]
    # Another difference is refused before any probe.
    with pytest.raises(CacheError, match="pooling: store has 'cls', this run has 'mean'"):
        CacheWriter.open(path, make_manifest(pooling="mean"), ITEM_IDS, probe_final_state=probe("y"))
    assert calls == ["stored", "stored", "last_layer"]
    with pytest.raises(CacheError, match=r"final_state 'bogus' not one of '', 'stored', 'last_layer'"):
        CacheWriter.open(tmp_path / "n.zarr", make_manifest(), ITEM_IDS, probe_final_state=lambda: "bogus")
    assert not (tmp_path / "n.zarr").exists()
    with pytest.raises(CacheError, match=r"final_state 'bogus' not one of"):
        make_manifest(final_state="bogus")


def test_writer_rules_for_the_final_output(tmp_path):
    stored = CacheWriter.open(tmp_path / "s.zarr", make_manifest(final_state="stored"), ITEM_IDS)
    with pytest.raises(CacheError, match=r"chunk 1: the manifest says final_state 'stored': pass `final` \[64, 8\]"):
        stored.write_chunk(1, np.zeros((64, K, D)))
    with pytest.raises(CacheError, match=r"chunk 1: final shape \(64, 3, 8\), expected \(64, 8\)"):
        stored.write_chunk(1, np.zeros((64, K, D)), final=np.zeros((64, K, D)))
    bad = np.zeros((64, D))
    bad[3, 1] = np.inf
    with pytest.raises(CacheError, match=r"chunk 1: final hold NaN or Inf"):
        stored.write_chunk(1, np.zeros((64, K, D)), final=bad)
    with pytest.raises(CacheError, match=r"chunk 1: final values overflow float16"):
        stored.write_chunk(1, np.zeros((64, K, D)), final=np.full((64, D), 1e6))
    assert not stored.done().any()  # nothing was written
    stored.close()
    plain = CacheWriter.open(tmp_path / "p.zarr", make_manifest(final_state="last_layer"), ITEM_IDS)
    with pytest.raises(CacheError, match=r"`final` given, but the manifest says final_state 'last_layer'"):
        plain.write_chunk(1, np.zeros((64, K, D)), final=np.zeros((64, D)))
    plain.close()


def _final_array(path):
    backend = backend_for(path).open(path, writable=True)
    return backend, (backend.group["final"] if path.suffix == ".zarr" else backend.file["final"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_checks_the_final_array(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    write(path, make_manifest(final_state="stored"))
    assert verify_store(path, check_fingerprint=False) == []
    backend, final = _final_array(path)
    final[70, 3] = np.nan
    final[0, 1] = 1.0
    backend.close()
    assert verify_store(path, check_fingerprint=False) == ["final: row 0 (padding) is not all zeros",
                                                           "final: 1 row(s) hold NaN or Inf (first rows [70])"]
    result = CliRunner().invoke(cache_cli, ["verify", "--skip-fingerprint", str(path)])
    assert result.exit_code == 1 and "final: 1 row(s) hold NaN or Inf" in result.output


def test_verify_reports_damage_to_the_final_array(tmp_path):
    import zarr

    path = tmp_path / "m.zarr"
    write(path, make_manifest(final_state="stored"))
    (path / "final" / "c" / "2" / "0").unlink()
    problems = verify_store(path, check_fingerprint=False)
    assert problems == ["1 chunk(s) flagged done have no data file (first: [2]); re-extract the store"]
    group = zarr.open_group(str(path), mode="r+")
    del group["final"]
    group.create_array("final", shape=(N_ITEMS + 1, D + 1), chunks=(CHUNK, D + 1), dtype="float32", fill_value=0)
    problems = verify_store(path, check_fingerprint=False)
    assert problems[:2] == ["final shape (301, 9), manifest implies (301, 8)", "final dtype float32, manifest says float16"]
    del group["final"]
    (problem,) = verify_store(path, check_fingerprint=False)
    assert problem == f"{path}: array 'final' missing (the manifest says final_state 'stored')"
    with pytest.raises(CacheError, match="array 'final' missing"):
        load_cache(path)
    # A `final` array the manifest does not announce.
    other = tmp_path / "o.zarr"
    write(other, make_manifest(final_state="last_layer"))
    zarr.open_group(str(other), mode="r+").create_array("final", shape=(N_ITEMS + 1, D), chunks=(CHUNK, D),
                                                        dtype="float16", fill_value=0)
    assert verify_store(other, check_fingerprint=False) == [
        "a `final` array is present, but the manifest says final_state 'last_layer' (only 'stored' has one)"]


def test_stats_count_the_final_array(tmp_path):
    plain, stored = tmp_path / "p.zarr", tmp_path / "s.zarr"
    write(plain, make_manifest(final_state="last_layer"))
    write(stored, make_manifest(final_state="stored"))
    extra = store_stats(stored).bytes_on_disk - store_stats(plain).bytes_on_disk
    final_bytes = 5 * CHUNK * D * 2  # 5 uncompressed chunks of fp16
    assert final_bytes <= extra < final_bytes + 4 * 1024  # + the array's metadata


def test_store_path():
    assert store_path("cache", "office", "minilm-l6") == Path("cache/office/minilm-l6.zarr")
    assert store_path("cache", "office", "minilm-l6", "title") == Path("cache/office/minilm-l6.zarr")
    assert store_path("c", "ml-100k", "minilm-l6", "year_genres", "h5") == Path("c/ml-100k/minilm-l6@year_genres.h5")


@pytest.fixture
def toy_registry(tmp_path, monkeypatch) -> Path:
    """A registry with a `toy` dataset whose folder holds N_ITEMS items."""
    data = tmp_path / "data"
    write_tsv(data / "toy" / "items.tsv", [f"{i}\ttitle of {i}" for i in ITEM_IDS])
    write_tsv(data / "toy" / "users.tsv", [f"u1\t{' '.join(ITEM_IDS[:6])}"])
    registry = tmp_path / "pipelines.yaml"
    registry.write_text("datasets:\n  toy: {}\n")
    monkeypatch.setenv("IISAN_PIPELINES", str(registry))
    monkeypatch.setenv("IISAN_DATA_DIR", str(data))
    return data / "toy"


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_checks_fingerprint_and_values(tmp_path, toy_registry, fmt):
    fingerprint = load_dataset("toy").fingerprint(["title"])
    path = tmp_path / "cache" / "toy" / f"tiny-bert.{fmt}"
    write(path, make_manifest(dataset_fingerprint=fingerprint))
    assert verify_store(path) == []
    result = CliRunner().invoke(cache_cli, ["verify", str(path)])
    assert result.exit_code == 0 and result.output.strip().endswith(": ok")

    # A changed title changes the fingerprint.
    items = toy_registry / "items.tsv"
    items.write_text(items.read_text().replace("title of item0007", "another title"))
    (problem,) = verify_store(path)
    assert "dataset fingerprint" in problem and "does not match the dataset" in problem
    result = CliRunner().invoke(cache_cli, ["verify", str(path)])
    assert result.exit_code == 1 and "does not match the dataset" in result.output

    # NaN written behind the writer's back is found, with its row.
    backend = backend_for(path).open(path, writable=True)
    states = backend.group["states"] if fmt == "zarr" else backend.file["states"]
    row = states[70]
    row[1, 3] = np.inf
    states[70] = row
    backend.close()
    problems = verify_store(path, check_fingerprint=False)
    assert problems == ["1 row(s) hold NaN or Inf (first rows [70])"]


def test_verify_without_the_dataset(tmp_path, toy_registry):
    path = tmp_path / "m.zarr"
    write(path, make_manifest(dataset="unknown-set"))
    (problem,) = verify_store(path)
    assert problem.startswith("cannot check the dataset fingerprint: unknown dataset 'unknown-set'")
    assert verify_store(path, check_fingerprint=False) == []


def test_stats_cli_lists_every_store(tmp_path):
    root = tmp_path / "cache"
    write(store_path(root, "toy", "tiny-bert"))
    write(store_path(root, "toy", "tiny-bert", "year_genres", "h5"), make_manifest(dtype="float32",
                                                                                   text_field="year_genres"))
    write(store_path(root, "toy", "half"), make_manifest(model="half"), chunks=[1])
    result = CliRunner().invoke(cache_cli, ["stats", str(root)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["dataset", "model", "rows", "layers", "hidden", "dtype", "on", "disk", "all",
                                "layers", "complete", "path"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert set(rows) == {"tiny-bert", "tiny-bert@year_genres", "half"}
    fp16 = rows["tiny-bert"]
    assert fp16[2:6] == ["301", "3/5", "8", "float16"]
    # all layers: 301 rows x 5 hidden states x 8 x 2 bytes = 24,080 B = 23.5 KiB
    assert fp16[8:10] == ["23.5", "KiB"] and fp16[10] == "100.0%"
    assert rows["tiny-bert@year_genres"][5] == "float32" and rows["tiny-bert@year_genres"][8:10] == ["47.0", "KiB"]
    assert rows["half"][10] == "20.0%"
    stat = store_stats(store_path(root, "toy", "tiny-bert"))
    states_bytes = 5 * CHUNK * K * D * 2  # 5 uncompressed full chunks (zarr pads the last one)
    assert states_bytes < stat.bytes_on_disk < states_bytes + 16 * 1024  # + ids, flags, metadata


def test_stats_cli_on_empty_and_broken(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cache_cli, ["stats", str(tmp_path)])
    assert result.exit_code == 0 and "no cache stores found" in result.output
    (tmp_path / "junk.zarr").mkdir()
    result = runner.invoke(cache_cli, ["stats", str(tmp_path)])
    assert result.exit_code == 1 and "junk.zarr" in result.output


def _zarr_json(path, name):
    import json
    file = path / name / "zarr.json"
    return file, json.loads(file.read_text())


def damage_lost_chunk(path):
    (path / "states" / "c" / "1" / "0" / "0").unlink()


def damage_row0(path):
    import zarr
    zarr.open_group(str(path), mode="r+")["states"][0, 1, 1] = 1.0


def damage_missing_dtype(path):
    import zarr
    group = zarr.open_group(str(path), mode="r+")
    del group["missing"]
    group.create_array("missing", shape=(N_ITEMS + 1,), chunks=(CHUNK,), dtype="int8", fill_value=0)


def damage_hidden_size(path):
    import zarr
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["iisan"] = {**group.attrs["iisan"], "hidden_size": D + 1}


def damage_storage_dtype(path):
    import zarr
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["iisan"] = {**group.attrs["iisan"], "storage_dtype": "float32"}


def damage_manifest_type(path):
    import zarr
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["iisan"] = {**group.attrs["iisan"], "rows": str(N_ITEMS + 1)}


def damage_metadata(path):
    file, _ = _zarr_json(path, "states")
    file.write_text("{ not json")


def damage_chunk_bytes(path):
    chunk = path / "states" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])


def damage_done_length(path):
    import zarr
    group = zarr.open_group(str(path), mode="r+")
    del group["done"]
    group.create_array("done", shape=(3,), chunks=(1,), dtype="bool", fill_value=True)


def damage_not_finalized(path):
    import zarr
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["iisan"] = {**group.attrs["iisan"], "complete": False}


@pytest.mark.parametrize("damage, expected", [
    (damage_lost_chunk, "1 chunk(s) flagged done have no data file (first: [1])"),
    (damage_row0, "row 0 (padding) is not all zeros"),
    (damage_missing_dtype, "missing dtype int8, expected bool"),
    (damage_hidden_size, "states shape (301, 3, 8), manifest implies (301, 3, 9)"),
    (damage_storage_dtype, "states dtype float16, manifest says float32"),
    (damage_manifest_type, "manifest field rows = '301' is not an integer"),
    (damage_metadata, "not a readable zarr store (JSONDecodeError"),
    (damage_chunk_bytes, "chunk 2 (rows 128..191) is unreadable"),
    (damage_done_length, "done has 3 flags for 5 chunks"),
    (damage_not_finalized, "every chunk is done but the manifest is not marked complete"),
])
def test_verify_reports_each_kind_of_damage(tmp_path, damage, expected):
    path = tmp_path / "m.zarr"
    write(path)
    assert verify_store(path, check_fingerprint=False) == []
    damage(path)
    problems = verify_store(path, check_fingerprint=False)
    assert len(problems) == 1 and expected in problems[0], problems
    result = CliRunner().invoke(cache_cli, ["verify", "--skip-fingerprint", str(path)])
    assert result.exit_code == 1 and expected in result.output


def test_verify_reports_a_truncated_hdf5_file(tmp_path):
    path = tmp_path / "m.h5"
    write(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (problem,) = verify_store(path, check_fingerprint=False)
    assert problem.startswith(f"{path}: not a readable HDF5 file")
    assert "delete the file and extract again" in problem
