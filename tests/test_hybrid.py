"""iisan-hybrid: content + ID, ID dropout per occurrence, and items never seen in training getting exactly
their content embedding."""

from __future__ import annotations

import pytest
import torch

from iisan.train.config import resolve
from iisan.train.model import HybridItems
from iisan.train.recipe import build_model, setup, train
from iisan.train.san import SANConfig

from conftest import options, toy_with_cold_targets


def test_unseen_items_get_exactly_their_content_embedding(env, tmp_path, monkeypatch):
    toy_with_cold_targets(env, tmp_path, monkeypatch)
    result = train(resolve(options(env, tmp_path, method="iisan-hybrid", epochs=1, id_init="xavier")),
                   log=lambda m: None)
    s = setup(resolve(options(env, tmp_path, method="iisan-hybrid", epochs=1, id_init="xavier")))
    model = build_model(s)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(f"{result.run_dir}/seed-12345/best.safetensors"), strict=False)
    model.eval()
    items: HybridItems = model.items
    seen = torch.from_numpy(s.split.train_counts > 0)
    assert int((~seen[1:]).sum()) == 10  # the ten withheld targets
    table = model.item_table()
    index = torch.arange(len(seen))
    with torch.no_grad():
        content = items.side(items.gather(index))
    assert torch.equal(table[~seen], content[~seen])                    # content alone, bit for bit
    assert not torch.allclose(table[seen], content[seen])               # the others carry their ID part
    assert torch.equal(table[seen], content[seen] + items.ids.weight[seen])


def test_id_dropout_zeroes_each_occurrence_independently():
    torch.manual_seed(0)
    states = {"text": torch.randn(6, 2, 8)}
    seen = torch.tensor([False, True, True, True, True, False])
    items = HybridItems(states, SANConfig(bottleneck=4, embedding_dim=16), seen, id_dropout=0.5, id_init="xavier")
    unique = torch.tensor([1, 2, 5])
    inverse = torch.tensor([0] * 2000 + [1] * 10 + [2] * 10)
    content = items.side(items.gather(unique)).index_select(0, inverse)
    ids = items.ids.weight[unique].index_select(0, inverse) * seen[unique].index_select(0, inverse)[:, None]
    items.train()
    out = items.encode_occurrences(unique, inverse)
    kept = torch.isclose(out, content + ids, atol=1e-6).all(dim=1)
    dropped = torch.isclose(out, content, atol=1e-6).all(dim=1)
    assert bool((kept | dropped).all())
    # Occurrences of the same item are dropped independently: about half of item 1's 2000.
    assert 900 < int(dropped[:2000].sum()) < 1100
    assert bool(dropped[-10:].all())                                     # item 5 is unseen: never an ID part
    items.eval()
    assert torch.equal(items.encode_occurrences(unique, inverse), content + ids)
    with pytest.raises(ValueError, match="id_dropout"):
        HybridItems(states, SANConfig(bottleneck=4, embedding_dim=16), seen, id_dropout=1.0)


def test_whole_item_id_dropout_drops_an_item_everywhere_in_the_step(env, tmp_path):
    """--id-dropout-unit item: per step, an item keeps its ID part in every occurrence and catalogue column or in
    none; over many steps each seen item loses it at the rate --id-dropout; and the training loss is the in-batch
    loss over content + ID with the step's dropped items' ID parts off (a slow per-item reference)."""
    from iisan.train.loss import inbatch_debiased_loss

    torch.manual_seed(0)
    states = {"text": torch.randn(7, 2, 8)}
    seen = torch.tensor([False, True, True, True, True, True, False])
    items = HybridItems(states, SANConfig(bottleneck=4, embedding_dim=16), seen, id_dropout=0.3, id_init="xavier",
                        dropout_unit="item")
    unique = torch.tensor([1, 2, 3, 6])
    inverse = torch.tensor([0] * 50 + [1] * 50 + [2] * 50 + [3] * 5)
    with torch.no_grad():
        content = items.side(items.gather(unique)).index_select(0, inverse)
        ids = items.ids.weight[unique].index_select(0, inverse) * seen[unique].index_select(0, inverse)[:, None]
    items.train()
    dropped_steps = torch.zeros(len(unique))
    steps = 400
    for _ in range(steps):
        with torch.no_grad():
            out = items.encode_occurrences(unique, inverse)
            columns = items.embed(unique)
        kept = torch.isclose(out, content + ids, atol=1e-6).all(dim=1)
        dropped = torch.isclose(out, content, atol=1e-6).all(dim=1) & ~kept
        assert bool((kept | dropped).all())
        for k in range(3):  # the seen items: all 50 occurrences and the column agree
            rows = inverse == k
            assert bool(kept[rows].all()) or bool(dropped[rows].all())
            column_kept = bool(torch.isclose(columns[k], out[rows][0], atol=1e-6).all())
            assert column_kept
            dropped_steps[k] += bool(dropped[rows].all())
    assert all(0.24 * steps < dropped_steps[k] < 0.36 * steps for k in range(3))
    items.eval()
    with torch.no_grad():
        assert torch.equal(items.encode_occurrences(unique, inverse), content + ids)
        assert torch.equal(items.embed(unique[:3]), items.side(items.gather(unique[:3])) + items.ids.weight[unique[:3]])

    # the loss of a real model equals the in-batch loss with the drawn items' ID parts off
    s = setup(resolve(options(env, tmp_path, method="iisan-hybrid", pipeline="text-only", id_init="xavier",
                              id_dropout=0.5, id_dropout_unit="item", dropout=0.0)))
    model = build_model(s)
    model.train()
    ids = torch.from_numpy(s.split.train[:16])
    log_pop = torch.log(torch.from_numpy(s.split.popularity()).float())
    torch.manual_seed(7)
    loss = model.calculate_loss(ids, log_pop)
    torch.manual_seed(7)
    keep = torch.rand(model.items.ids.num_embeddings) >= 0.5
    rows = []
    for item in ids.reshape(-1).tolist():  # item by item
        index = torch.tensor([item])
        part = model.items.ids(index) * float(bool(model.items.seen[item]) and bool(keep[item]))
        rows.append(model.items.side(model.items.gather(index)) + part)
    full = torch.cat(rows).view(*ids.shape, -1)
    inputs, mask = ids[:, :-1], (ids[:, :-1] != 0) & (ids[:, 1:] != 0)
    want = inbatch_debiased_loss(model.user(full[:, :-1], inputs != 0), full, ids, mask, log_pop)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="id-dropout-unit"):
        resolve(options(env, tmp_path, method="iisan", id_dropout_unit="item"))


def test_zero_init_starts_as_iisan(env, tmp_path):
    """With the ID table at zero, the hybrid's first forward is IISAN's under the same seed."""
    torch.manual_seed(3)
    hybrid = build_model(setup(resolve(options(env, tmp_path, method="iisan-hybrid"))))
    torch.manual_seed(3)
    plain = build_model(setup(resolve(options(env, tmp_path, method="iisan"))))
    hybrid.eval(), plain.eval()
    assert torch.equal(hybrid.item_table(), plain.item_table())


def test_the_content_loss_adds_the_same_loss_over_content_only_embeddings(env, tmp_path):
    from iisan.train.loss import inbatch_debiased_loss

    s = setup(resolve(options(env, tmp_path, method="iisan-hybrid", pipeline="text-only", id_init="xavier",
                              id_dropout=0.0, dropout=0.0, content_loss=0.5)))
    model = build_model(s)
    model.train()
    ids = torch.from_numpy(s.split.train[:16])
    log_pop = torch.log(torch.from_numpy(s.split.popularity()).float())
    loss = model.calculate_loss(ids, log_pop)
    inputs, mask = ids[:, :-1], (ids[:, :-1] != 0) & (ids[:, 1:] != 0)
    unique, inverse = torch.unique(ids, return_inverse=True)
    content = model.items.side(model.items.gather(unique)).index_select(0, inverse.reshape(-1)).view(*ids.shape, -1)
    full = content + (model.items.ids(ids) * model.items.seen[ids].unsqueeze(-1))
    want = inbatch_debiased_loss(model.user(full[:, :-1], inputs != 0), full, ids, mask, log_pop) + \
        0.5 * inbatch_debiased_loss(model.user(content[:, :-1], inputs != 0), content, ids, mask, log_pop)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="content_loss -1"):
        HybridItems({"text": torch.randn(3, 2, 4)}, SANConfig(bottleneck=2, embedding_dim=8),
                    torch.tensor([False, True, True]), 0.2, "zero", -1.0)


@pytest.mark.slow
def test_cold_merge_ranks_seen_items_by_the_hybrid_and_unseen_ones_by_the_calibrated_twin(env, tmp_path,
                                                                                            monkeypatch):
    """--cold-merge: the loss adds the twin's loss (content only, its own user encoder); evaluation ranks a seen
    item by the hybrid's score and an unseen one by the twin's score mapped per user onto the hybrid's (mean and
    standard deviation over the seen items, computed here from every score, one user at a time); export and
    recommend give the same vectors."""
    import numpy as np

    from iisan.deploy.export import UserProgram
    from iisan.deploy.run import load_run
    from iisan.evaluate.metrics import rank_targets
    from iisan.train.loss import inbatch_debiased_loss
    from iisan.train.recipe import evaluate

    toy_with_cold_targets(env, tmp_path, monkeypatch)
    cfg = resolve(options(env, tmp_path, method="iisan-hybrid", pipeline="text-only", cold_merge=True, epochs=2,
                          id_init="xavier", id_dropout=0.0, dropout=0.0))
    s = setup(cfg)
    torch.manual_seed(0)
    model = build_model(s)
    model.train()
    ids = torch.from_numpy(s.split.train[:16])
    log_pop = torch.log(torch.from_numpy(s.split.popularity()).float())
    inputs, mask = ids[:, :-1], (ids[:, :-1] != 0) & (ids[:, 1:] != 0)
    unique, inverse = torch.unique(ids, return_inverse=True)
    content = model.items.side(model.items.gather(unique)).index_select(0, inverse.reshape(-1)).view(*ids.shape, -1)
    full = content + (model.items.ids(ids) * model.items.seen[ids].unsqueeze(-1))
    want = inbatch_debiased_loss(model.user(full[:, :-1], inputs != 0), full, ids, mask, log_pop) + \
        inbatch_debiased_loss(model.twin_user(content[:, :-1], inputs != 0), content, ids, mask, log_pop)
    torch.testing.assert_close(model.calculate_loss(ids, log_pop), want, atol=1e-5, rtol=1e-5)

    result = train(cfg, log=lambda m: None)
    run = load_run(result.run_dir)
    model, split = run.model, run.split
    table = model.item_table()
    d = cfg.embedding_dim
    assert table.shape[1] == 2 * d + 1
    seen = torch.from_numpy(split.train_counts > 0)
    seen[0] = False
    assert int((~seen[1:]).sum()) == 10
    x = torch.from_numpy(split.test_inputs)
    with torch.no_grad():
        u = model.user(table[:, :d][x], x != 0)[:, -1]
        u_twin = model.twin_user(table[:, d:2 * d][x], x != 0)[:, -1]
    hybrid_scores = (u @ table[:, :d].T).double().numpy()
    twin_scores = (u_twin @ table[:, d:2 * d].T).double().numpy()
    merged = np.zeros_like(hybrid_scores)
    for r in range(len(x)):  # one user at a time, from every seen item's two scores
        h, t = hybrid_scores[r, seen.numpy()], twin_scores[r, seen.numpy()]
        a = h.std() / t.std()
        merged[r] = np.where(seen.numpy(), hybrid_scores[r], a * twin_scores[r] + h.mean() - a * t.mean())
    merged[:, 0] = 0.0
    target = torch.from_numpy(split.test_target)
    got = evaluate(model, split, "test", run.cfg)
    # rank of the target: 1 + the unmasked items scoring >= it (pessimistic); compare with the scores above
    slow = rank_targets(torch.eye(len(x), dtype=torch.float64), torch.from_numpy(merged).T.contiguous(), target,
                        torch.from_numpy(split.test_history), True, 1024)
    close = np.isclose(np.sort(merged, axis=1)[:, -12:], np.sort(merged, axis=1)[:, -13:-1], rtol=1e-5).any()
    assert close or torch.equal(got.ranks, slow.ranks)
    assert (got.ranks - slow.ranks).abs().max() <= 1
    # the unseen targets are ranked among the seen items (not all below them, as the plain hybrid can)
    cold_rows = ~torch.from_numpy(split.warm_targets("test"))
    assert int(cold_rows.sum()) == 10
    # export and recommend give the vectors evaluation ranks with
    program = UserProgram(run).eval()
    with torch.no_grad():
        rows = x[:5] - 1
        np.testing.assert_allclose(program(rows).numpy(), model.user_vectors(x[:5], table).numpy(), rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(Exception, match="--cold-merge is an option of iisan-hybrid"):
        resolve(options(env, tmp_path, method="iisan", cold_merge=True))
