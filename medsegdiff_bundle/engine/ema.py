"""Exponential moving average of the network weights, used for validation and inference."""

from __future__ import annotations

import copy
import weakref

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
        # the (average, source) tensor pairs of the last source, found once: walking both module trees at every
        # update cost ~4 ms of host time per training step (2-core CPU, ~300 parameters), which a GPU step cannot hide
        self._pairs: tuple[weakref.ref, list, list, list] | None = None

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def restart(self) -> None:
        """Start the decay's warm-up again, so the next updates follow the model closely (a model part that starts
        training late, as the denoiser after a condition warm-up, would otherwise stay tied to its initial weights)."""
        self.num_updates.zero_()

    def _tensor_pairs(self, source: nn.Module) -> tuple[list, list, list]:
        """``(averaged, current, buffer pairs)`` for ``source``. The ``Parameter`` objects are kept, not their data:
        ``module.to()`` and ``load_state_dict`` change a parameter's data in place, so the lists stay valid; a new
        source module is looked up afresh.

        Raises:
            ValueError: ``source`` does not have the averaged network's parameters.
        """
        if self._pairs is None or self._pairs[0]() is not source:
            averaged, current = list(self.module.parameters()), list(source.parameters())
            if len(averaged) != len(current) or any(a.shape != p.shape for a, p in zip(averaged, current)):
                raise ValueError("EMAModel.update: the model's parameters do not match the averaged network's.")
            self._pairs = (weakref.ref(source), averaged, current, list(zip(self.module.buffers(), source.buffers())))
        return self._pairs[1], self._pairs[2], self._pairs[3]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights of ``model`` into the average."""
        d = self.current_decay()
        averaged, current, buffers = self._tensor_pairs(unwrap_model(model))
        # one multi-tensor kernel for all parameters instead of one launch each (every training iteration)
        torch._foreach_lerp_(averaged, [p if p.dtype == a.dtype else p.to(a.dtype) for a, p in zip(averaged, current)],
                             1.0 - d)
        for ema_b, b in buffers:
            ema_b.copy_(b)
        self.num_updates += 1

    def __getstate__(self) -> dict:
        # a copy (deepcopy, pickle) finds its own pairs: the cached lists would tie it to this average's tensors
        state = self.__dict__.copy()
        state["_pairs"] = None
        return state

    def train(self, mode: bool = True) -> EMAModel:  # the average is never put in training mode
        super().train(False)
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
