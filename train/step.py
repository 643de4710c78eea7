"""One training step (forward, loss, backward, optimizer), the one that `iisan train`, `iisan bench` and every
later runner call, so the bench always times the step that training runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iisan.data.protocol import SplitData
from iisan.errors import IisanError
from iisan.train.distributed import BatchShard, World


class NonFiniteLoss(IisanError):
    """The loss of a step was NaN or infinite (raised before the backward pass)."""

    def __init__(self, value: float):
        self.value = value
        super().__init__(f"loss is {value}")


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

    @classmethod
    def create(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer, split: SplitData,
               device: torch.device, world: World = World()) -> "TrainStep":
        log_pop = torch.log(torch.from_numpy(split.popularity())).float().to(device)
        return cls(model, optimizer, log_pop, device, torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
                   world)

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"

    def __call__(self, ids: torch.Tensor) -> float:
        shard = None
        if self.world.distributed:
            shard = BatchShard.of(self.world, len(ids))
            ids = ids[shard.offset:shard.offset + shard.counts[self.world.rank]]
        ids = ids.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = self.model(ids, self.log_popularity) if shard is None else \
                self.model(ids, self.log_popularity, shard)
        # distributed: this rank's part of the global loss; the parts sum to it
        value = self.world.sum(loss.detach()).item()
        if not torch.isfinite(torch.tensor(value)):
            raise NonFiniteLoss(value)
        self.optimizer.zero_grad(set_to_none=True)
        # DistributedDataParallel averages the ranks' gradients; the parts' gradients are to be summed
        self.scaler.scale(loss * self.world.size if shard is not None else loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value
