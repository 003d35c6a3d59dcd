"""Exponential moving average of the network weights, used for validation and inference."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMAModel", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / EMA wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class EMAModel(nn.Module):
    """A frozen copy of ``model`` updated as ``ema = d * ema + (1 - d) * model`` after each optimiser step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` (``n`` = updates so far), so that short runs are not
    dominated by the random initialisation. Buffers (e.g. normalisation statistics) are copied.
    ``state_dict()`` holds the averaged weights and the update count, so checkpoints resume it exactly.

    Args:
        model: the trained network (a DDP wrapper is unwrapped).
        decay: the long-run decay ``d``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights of ``model`` into the average."""
        d = self.current_decay()
        source = unwrap_model(model)
        averaged = list(self.module.parameters())
        with torch.no_grad():
            # one multi-tensor kernel for all parameters instead of one launch each (every training iteration)
            torch._foreach_lerp_(averaged, [p.detach().to(a.dtype) for a, p in zip(averaged, source.parameters())],
                                 1.0 - d)
            for ema_b, b in zip(self.module.buffers(), source.buffers()):
                ema_b.copy_(b)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMAModel:  # the average is never put in training mode
        super().train(False)
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
