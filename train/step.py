"""One training step (forward, loss, backward, optimizer), the one that `iisan train`, `iisan bench` and every
later runner call, so the bench always times the step that training runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iisan.data.protocol import SplitData
from iisan.errors import IisanError


class NonFiniteLoss(IisanError):
    """The loss of a step was NaN or infinite (raised before the backward pass)."""

    def __init__(self, value: float):
        self.value = value
        super().__init__(f"loss is {value}")


@dataclass
class TrainStep:
    """`step(ids)` runs one optimisation step on a batch of left-padded train sequences and returns its loss.
    On a GPU it runs under fp16 autocast with a GradScaler; on CPU in fp32."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    log_popularity: torch.Tensor    # [N + 1] log p, on the model's device (the loss's debiasing term)
    device: torch.device
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer, split: SplitData,
               device: torch.device) -> "TrainStep":
        log_pop = torch.log(torch.from_numpy(split.popularity())).float().to(device)
        return cls(model, optimizer, log_pop, device, torch.amp.GradScaler("cuda", enabled=device.type == "cuda"))

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda"

    def __call__(self, ids: torch.Tensor) -> float:
        ids = ids.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = self.model.calculate_loss(ids, self.log_popularity)
        value = loss.item()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(value)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value
