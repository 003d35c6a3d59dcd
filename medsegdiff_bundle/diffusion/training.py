"""One diffusion training step's forward pass: noise the label, predict the noise, compute the loss.

Kept free of optimiser and engine code so that the plain demo loop and MONAI's ``SupervisedTrainer``
iteration share it.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import Scheduler

from ..networks.medsegdiff import MedSegDiffV2
from .labels import label_to_x0
from .losses import MedSegDiffLoss

__all__ = ["diffusion_forward", "predicted_x0", "sample_timesteps"]


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    power: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training timesteps ``(batch,)`` in ``[0, T)``: ``t = floor(T * u ** (1 / power))`` with ``u ~ U[0, 1)``.

    The density of ``t`` grows as ``t ** (power - 1)``: ``power = 1`` is the usual uniform draw; ``power > 1`` spends
    more of the training on noisy timesteps, where the mask must be read from the image rather than from ``x_t``
    (the steps a few-step sampler depends on most).
    """
    if not power > 0:
        raise ValueError(f"timestep_power must be > 0, got {power}.")
    if power == 1.0:  # the exact uniform integer draw (as MONAI's tutorials do)
        return torch.randint(0, num_train_timesteps, (batch,), device=device, generator=generator)
    u = torch.rand(batch, device=device, generator=generator, dtype=torch.float64)
    return (num_train_timesteps * u.pow(1.0 / power)).long().clamp_(0, num_train_timesteps - 1)


def predicted_x0(
    scheduler: Scheduler, x_t: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The network's clean-mask estimate ``x0_hat (B, M, *S)`` at per-sample ``timesteps (B,)``.

    ``prediction_type="sample"``: the prediction itself. ``"epsilon"``: ``(x_t - sqrt(1 - abar_t) eps_hat) /
    sqrt(abar_t)``, clipped to ``[-1, 1]`` because near ``t = T`` the division by ``sqrt(abar_t)`` amplifies the
    error of ``eps_hat`` far beyond the mask range.
    """
    if getattr(scheduler, "prediction_type", "epsilon") == "sample":
        return prediction
    abar = scheduler.alphas_cumprod.to(device=x_t.device)[timesteps].float()
    abar = abar.view(-1, *([1] * (x_t.ndim - 1)))
    x0 = (x_t.float() - (1 - abar).sqrt() * prediction.float()) / abar.sqrt()
    return x0.clamp(-1.0, 1.0).to(prediction.dtype)


def diffusion_forward(
    network: MedSegDiffV2,
    scheduler: Scheduler,
    loss_fn: MedSegDiffLoss,
    image: torch.Tensor,
    label: torch.Tensor,
    generator: torch.Generator | None = None,
    timestep_power: float = 1.0,
    check_label: bool = True,
) -> dict[str, torch.Tensor]:
    """Sample ``t`` (see :func:`sample_timesteps`) and ``eps ~ N(0, I)`` per sample, noise the encoded label and
    return the loss dict.

    The regression target follows ``scheduler.prediction_type``: the noise (``"epsilon"``) or ``x0`` (``"sample"``).

    Args:
        network: the MedSegDiff-V2 model (or a DDP wrapper of it; its forward is what runs).
        scheduler: any MONAI scheduler holding the training noise schedule (``add_noise``).
        loss_fn: the objective.
        image: ``(B, C_in, *S)``.
        label: integer label map ``(B, 1, *S)``.
        generator: optional RNG for ``t`` and ``eps`` (reproducible training).
        timestep_power: shape of the timestep distribution (1 = uniform; see :func:`sample_timesteps`).
        check_label: validate ``label`` (:func:`~medsegdiff_bundle.diffusion.labels.validate_label`). On a GPU that
            reads a result back and so waits for the queued work: pass ``False`` for a label checked before its copy.
    """
    if image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and label {tuple(label.shape)} differ in batch or spatial size."
        )
    core = getattr(network, "module", network)  # DistributedDataParallel / EMA wrappers keep the model in .module
    x0 = label_to_x0(label, core.num_classes, check=check_label).to(image.dtype)
    b = image.shape[0]
    timesteps = sample_timesteps(b, scheduler.num_train_timesteps, timestep_power, image.device, generator)
    noise = torch.randn(x0.shape, device=image.device, dtype=x0.dtype, generator=generator)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    prediction, anchor_logits = network(x_t, image, timesteps)
    target = x0 if getattr(scheduler, "prediction_type", "epsilon") == "sample" else noise
    x0_pred = predicted_x0(scheduler, x_t, prediction, timesteps) if loss_fn.x0_dice_weight > 0 else None
    return loss_fn(prediction, target, anchor_logits, label, timesteps, x0_pred=x0_pred, check_label=check_label)
