"""One training step (forward, loss, backward, optimizer), the one that `iisan train`, `iisan bench` and every
later runner call, so the bench always times the step that training runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from iisan.data.protocol import SplitData
from iisan.errors import IisanError
from iisan.train.distributed import BatchShard, World


class NonFiniteLoss(IisanError):
    """The loss of a step was NaN or infinite (raised before the backward pass); the training loop raises it
    again with where it happened (`at`), so callers (tuning: a diverged trial) catch it by type."""

    def __init__(self, value: float, epoch: int | None = None, step: int | None = None, seed: int | None = None):
        self.value, self.epoch, self.step, self.seed = value, epoch, step, seed
        where = f" at epoch {epoch}, step {step} (seed {seed}): lower --lr / --lr-san, or standardise the cached " \
                "states (--standardize dim)" if epoch is not None else ""
        super().__init__(f"loss is {value}{where}")

    def at(self, epoch: int, step: int, seed: int) -> "NonFiniteLoss":
        return NonFiniteLoss(self.value, epoch, step, seed)


@dataclass
class CatalogueColumns:
    """The catalogue columns of the sampled and full softmax losses (docs/method.md §3). Only training items
    are columns (an item no training sequence holds is never one, as in the in-batch loss: a cold item is not
    pushed down for being absent). `sampled`: `negatives` ids per batch drawn with replacement from q (uniform
    over the training items, their popularity, or the half-and-half mix), drawn for a whole epoch from the
    epoch's data generator (saved with the checkpoint, the same on every process); `full`: every training item."""

    kind: str                    # sampled | full
    items: torch.Tensor          # [K] the training items' indices, ascending
    q: torch.Tensor              # [N + 1] the sampling distribution (0 off the training items)
    negatives: int

    @classmethod
    def of(cls, split: SplitData, loss: str, negatives: int = 1024, sampler: str = "uniform"
           ) -> "CatalogueColumns | None":
        if loss == "in-batch":
            return None
        counts = torch.from_numpy(split.train_counts.astype(np.float64))
        counts[0] = 0
        trained = counts > 0
        uniform = trained.double() / trained.sum()
        popular = counts / counts.sum()
        q = {"uniform": uniform, "popularity": popular, "mix": 0.5 * uniform + 0.5 * popular}[sampler]
        return cls(loss, trained.nonzero().flatten(), q, negatives)

    def draw(self, batches: int, generator: torch.Generator) -> torch.Tensor | None:
        """Each batch's drawn columns [batches, negatives] (sampled; None for full)."""
        if self.kind != "sampled":
            return None
        return torch.multinomial(self.q, batches * self.negatives, replacement=True,
                                 generator=generator).view(batches, self.negatives)

    def log_count(self, drawn: torch.Tensor) -> torch.Tensor:
        """log(M q_i) of drawn columns: each one's expected count in the draw (its log-Q correction)."""
        return torch.log(self.negatives * self.q[drawn]).float()


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning rate's factor at optimisation step `step` (0-based): linear warm-up over `warmup` steps
    ((step + 1) / warmup), then 1 (constant) or a cosine decay from 1 at the warm-up's end to 0 at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainStep:
    """`step(ids)` runs one optimisation step on a batch of left-padded train sequences and returns its loss.
    On a GPU it runs under fp16 autocast with a GradScaler; on CPU in fp32. In a distributed world `ids` is the
    global batch (every rank draws the same one): each rank trains on its rows of it through `model` (then a
    DistributedDataParallel), and the loss returned is the global batch's."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    log_popularity: torch.Tensor    # [N + 1] log p, on the model's device (the loss's debiasing term)
    device: torch.device
    scaler: torch.amp.GradScaler
    world: World = World()
    columns: CatalogueColumns | None = None   # the catalogue columns of the sampled / full loss
    clip: float = 0.0                          # the gradients' global norm is clipped to this (0: not)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None   # stepped after every optimiser step

    @classmethod
    def create(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer, split: SplitData,
               device: torch.device, world: World = World(), columns: CatalogueColumns | None = None,
               clip: float = 0.0, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> "TrainStep":
        log_pop = torch.log(torch.from_numpy(split.popularity())).float().to(device)
        if columns is not None:
            columns = CatalogueColumns(columns.kind, columns.items.to(device), columns.q, columns.negatives)
        return cls(model, optimizer, log_pop, device, torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
                   world, columns, clip, scheduler)

    def draw(self, batches: int, generator: torch.Generator) -> torch.Tensor | None:
        """The sampled loss's columns of an epoch's batches, drawn from the data generator (else None)."""
        return None if self.columns is None else self.columns.draw(batches, generator)

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"

    def __call__(self, ids: torch.Tensor, drawn: torch.Tensor | None = None) -> float:
        """One step on the batch `ids`; `drawn`: its sampled catalogue columns (`draw`), for the sampled loss."""
        shard = None
        if self.world.distributed:
            shard = BatchShard.of(self.world, len(ids))
            ids = ids[shard.offset:shard.offset + shard.counts[self.world.rank]]
        ids = ids.to(self.device)
        extra: tuple = ()
        if self.columns is not None:
            if self.columns.kind == "sampled":
                if drawn is None:
                    raise ValueError("the sampled loss needs each batch's drawn columns (TrainStep.draw)")
                extra = (drawn.to(self.device), self.columns.log_count(drawn).to(self.device))
            else:
                extra = (self.columns.items,)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = self.model(ids, self.log_popularity, shard, *extra)
        # distributed: this rank's part of the global loss; the parts sum to it
        value = self.world.sum(loss.detach()).item()
        if not torch.isfinite(torch.tensor(value)):
            raise NonFiniteLoss(value)
        self.optimizer.zero_grad(set_to_none=True)
        # DistributedDataParallel averages the ranks' gradients; the parts' gradients are to be summed
        self.scaler.scale(loss * self.world.size if shard is not None else loss).backward()
        if self.clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return value
