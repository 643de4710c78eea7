"""The objectives and optimiser options of `iisan train` (docs/method.md §3.1) through the real model and step:
the cosine score against its per-row definition, the catalogue columns' sampler, the optimiser (AdamW, warm-up,
cosine decay, clipping) against a hand-written update, exact resume, and ranking / serving by the same score."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from iisan.train.config import resolve
from iisan.train.data import train_batches
from iisan.train.recipe import build_model, optimizer_for, scheduler_for, setup, train
from iisan.train.step import CatalogueColumns, TrainStep, lr_factor

from conftest import options


def built(env, tmp_path, **extra):
    cfg = resolve(options(env, tmp_path, dropout=0.0, **extra))
    s = setup(cfg)
    torch.manual_seed(0)
    return cfg, s, build_model(s)


def log_pop_of(split):
    return torch.log(torch.from_numpy(split.popularity())).float()


def test_cosine_loss_is_the_dot_loss_of_unit_vectors_over_the_temperature(env, tmp_path):
    """Per row: the cosine model's loss equals the in-batch loss computed from the dot model's user states and
    item embeddings, each normalised, the user side divided by τ (the same weights in both)."""
    from iisan.train.loss import inbatch_debiased_loss

    cfg, s, cosine = built(env, tmp_path, score="cosine", temperature=0.2)
    ids = next(iter(train_batches(s.split, 8, torch.Generator().manual_seed(3))))
    cosine.eval()
    with torch.no_grad():
        got = cosine.calculate_loss(ids, log_pop_of(s.split))
        items = cosine.encode_slots(ids)
        states = cosine.user(items[:, :-1], ids[:, :-1] != 0)
        mask = (ids[:, :-1] != 0) & (ids[:, 1:] != 0)
        unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
        want = inbatch_debiased_loss(unit(states) / 0.2, unit(items), ids, mask, log_pop_of(s.split))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert "log_temperature" not in cosine.state_dict()  # fixed: not a weight of the checkpoint
    _, _, learned = built(env, tmp_path, score="cosine", learn_temperature=True, temperature=0.2)
    assert learned.temperature().item() == pytest.approx(0.2) and learned.log_temperature.requires_grad


def test_the_sampler_draws_training_items_only_with_its_log_q(env, tmp_path):
    _, s, _ = built(env, tmp_path)
    counts = torch.from_numpy(s.split.train_counts).double()
    trained = (counts > 0).nonzero().flatten()
    trained = trained[trained > 0]
    for sampler, want in (("uniform", torch.ones(len(trained)) / len(trained)),
                          ("popularity", counts[trained] / counts[trained].sum())):
        cols = CatalogueColumns.of(s.split, "sampled", 5000, sampler)
        assert torch.equal(cols.items, trained)
        assert torch.allclose(cols.q[trained], want.double()) and cols.q.sum().item() == pytest.approx(1.0)
        drawn = cols.draw(4, torch.Generator().manual_seed(0))
        assert drawn.shape == (4, 5000) and set(drawn.unique().tolist()) <= set(trained.tolist())
        assert torch.allclose(cols.log_count(drawn[0]), torch.log(5000 * cols.q[drawn[0]]).float())
    mix = CatalogueColumns.of(s.split, "sampled", 8, "mix")
    assert torch.allclose(mix.q, 0.5 * CatalogueColumns.of(s.split, "sampled", 8, "uniform").q
                          + 0.5 * CatalogueColumns.of(s.split, "sampled", 8, "popularity").q)
    full = CatalogueColumns.of(s.split, "full")
    assert full.draw(3, torch.Generator()) is None and torch.equal(full.items, trained)
    assert CatalogueColumns.of(s.split, "in-batch") is None


def test_the_lr_schedule():
    assert [lr_factor(k, 4, 20, "constant") for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, 20, "cosine") == 1.0
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0) and lr_factor(99, 4, 20, "cosine") == pytest.approx(0.0)
    assert lr_factor(0, 0, 10, "cosine") == 1.0


def reference_adamw(params, grads, state, lr, decay, clip, t):
    """AdamW (Loshchilov & Hutter) written out per tensor, after clipping the global gradient norm."""
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    scale = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
    out = []
    for (name, p), g in zip(params, grads):
        g = g * scale
        m, v = state.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        state[name] = (m, v)
        p = p * (1 - lr[name] * decay[name])
        p = p - lr[name] * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        out.append(p)
    return out


def test_adamw_warmup_cosine_and_clipping_equal_a_hand_written_update(env, tmp_path):
    cfg, s, model = built(env, tmp_path, weight_decay=0.05, warmup_steps=2, schedule="cosine", clip=0.5,
                          epochs=2, lr=3e-3, lr_san=1e-3)
    steps_per_epoch = -(-len(s.split.train) // cfg.batch_size)
    optimizer = optimizer_for(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    step = TrainStep.create(model, optimizer, s.split, s.device, clip=cfg.clip,
                            scheduler=scheduler_for(optimizer, cfg, steps_per_epoch))
    san = {id(p) for p in model.items.side.san_parameters()}
    names = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    base_lr = {n: (1e-3 if id(p) in san else 3e-3) for n, p in names}
    decay = {n: (0.05 if p.dim() >= 2 else 0.0) for n, p in names}
    assert any(d == 0 for d in decay.values()) and any(d > 0 for d in decay.values())
    state: dict = {}
    batches = list(train_batches(s.split, cfg.batch_size, torch.Generator().manual_seed(5)))[:4]
    total = cfg.epochs * steps_per_epoch
    for t, ids in enumerate(batches, 1):
        twin = copy.deepcopy(model)
        twin.train()
        twin.calculate_loss(ids, log_pop_of(s.split)).backward()
        grads = [dict(twin.named_parameters())[n].grad.detach().clone() for n, _ in names]
        lr = {n: base_lr[n] * lr_factor(t - 1, 2, total, "cosine") for n, _ in names}
        want = reference_adamw([(n, p.detach().clone()) for n, p in names], grads, state, lr, decay, 0.5, t)
        model.train()
        step(ids)
        for (n, p), w in zip(names, want):
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-7, msg=f"{n} after step {t}")


class Interrupted(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("extra", [dict(loss="sampled", negatives=32, sampler="mix"),
                                   dict(loss="full", softmax_chunk=7, score="cosine", learn_temperature=True),
                                   dict(warmup_steps=3, schedule="cosine", weight_decay=0.1, clip=1.0)])
def test_new_objectives_resume_exactly(env, tmp_path, extra):
    """A run interrupted after epoch 1 and resumed equals the run that was not (the sampled columns come from
    the checkpointed generator, the schedule's state from the checkpoint)."""
    full = train(resolve(options(env, tmp_path / "a", epochs=3, **extra)), log=lambda m: None)

    def stop(epoch, hr):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(resolve(options(env, tmp_path / "b", epochs=3, **extra)), log=lambda m: None, on_epoch=stop)
    (run_dir,) = (tmp_path / "b" / "toy").iterdir()
    resumed = train(resume=run_dir, log=lambda m: None)
    losses = [[json.loads(l)["loss"] for l in (r.run_dir / "seed-12345" / "metrics.jsonl").read_text().splitlines()]
              for r in (full, resumed)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert resumed.seeds[0].test == full.seeds[0].test


def test_full_softmax_in_chunks_equals_one_chunk(env, tmp_path):
    """Chunking (with recomputation) changes neither the loss nor the gradients."""
    grads = []
    for chunk in (10_000, 7):
        cfg, s, model = built(env, tmp_path, loss="full", softmax_chunk=chunk)
        cols = CatalogueColumns.of(s.split, "full")
        ids = next(iter(train_batches(s.split, 8, torch.Generator().manual_seed(2))))
        model.train()
        loss = model.calculate_loss(ids, log_pop_of(s.split), None, cols.items)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-5, atol=1e-6)


def test_a_cosine_run_ranks_and_serves_by_cosine(env, tmp_path):
    from iisan.deploy.run import load_run
    from iisan.evaluate.metrics import rank_targets
    from iisan.train.recipe import evaluate

    result = train(resolve(options(env, tmp_path, epochs=1, score="cosine", learn_temperature=True)),
                   log=lambda m: None)
    run = load_run(result.run_dir)
    model, split = run.model, run.split
    table = model.item_table()
    users = model.user_vectors(torch.from_numpy(split.test_inputs), table)
    unit = table / table.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    slow = rank_targets(users / users.norm(dim=-1, keepdim=True), unit, torch.from_numpy(split.test_target),
                        torch.from_numpy(split.test_history), True, 1024)
    assert torch.equal(evaluate(model, split, "test", run.cfg).ranks, slow.ranks)
    # served scores are cos / τ
    _, windows, _ = run.dataset_requests(None, "test")
    served = run.user_vectors(windows[:3])
    top = run.rank(windows[:3], [], k=1)
    for r in range(3):
        best = top[r][0]
        j = run.index[best.id]
        cos = float(torch.nn.functional.cosine_similarity(users[r], table[j], dim=0))
        assert best.score == pytest.approx(cos / model.temperature().item(), rel=1e-4)
        assert served[r].norm().item() == pytest.approx(1 / model.temperature().item(), rel=1e-5)
