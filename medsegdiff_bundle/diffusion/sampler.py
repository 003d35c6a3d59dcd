"""The sampling loop: condition once, denoise an ensemble in one batch, fuse, measure uncertainty."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..networks.medsegdiff import MedSegDiffV2
from .ensemble import FUSIONS, UNCERTAINTIES, fuse, uncertainty
from .labels import channel_to_class_probs, round_x0, x0_to_probs
from .mirroring import check_mirror_axes, mirror, mirror_views, unmirror_members
from .schedulers import SAMPLERS, make_scheduler

__all__ = ["SampleResult", "DiffusionSampler"]


@dataclass
class SampleResult:
    """Output of :class:`DiffusionSampler`.

    Attributes:
        probs: fused class probabilities ``(B, K, *S)`` (blended with the anchor when ``anchor_weight > 0``).
        uncertainty: ``(B, 1, *S)`` disagreement of the members (the anchor blend does not enter it).
        members: per-member class probabilities ``(N, B, K, *S)``.
        anchor: condition-model probabilities ``(B, K, *S)`` (the coarse anchor segmentation).
    """

    probs: torch.Tensor
    uncertainty: torch.Tensor
    members: torch.Tensor
    anchor: torch.Tensor


class DiffusionSampler:
    """Sample segmentations from a trained :class:`MedSegDiffV2`.

    The condition UNet runs once per image (once per mirrored view with ``mirror_axes``); its features are
    repeated for the ``ensemble`` members, which are denoised together as one batch of ``B * ensemble``.

    Args:
        sampler: ``"dpmpp"`` (DPM-Solver++ 2M, default), ``"ddim"`` or ``"ddpm"`` (full chain only).
        steps: number of network evaluations; in ``[1, num_train_timesteps]``; ``ddpm`` needs all of them.
        ensemble: members per image ``N``.
        fusion: ``"mean"`` or ``"staple"`` (binary only).
        uncertainty: ``"std"`` or ``"entropy"``.
        num_train_timesteps: ``T`` the model was trained with.
        schedule: the training noise schedule (a MONAI ``NoiseSchedules`` name).
        prediction_type: what the network was trained to predict, ``"sample"`` (x0, default) or ``"epsilon"``.
        seed: seed of the initial noise (and DDPM's per-step noise); ``None`` uses the global RNG.
        round_x0: hand the solver the most probable clean mask (argmax, as ``{-1, 1}`` one-hot) instead of the soft
            prediction, so that every later step sees a noisy *binary* mask, as in training; the returned
            probabilities are still the last step's soft prediction. Needs ``prediction_type="sample"``.
        anchor_weight: weight ``w`` in ``[0, 1]`` of the condition model's own segmentation in the result:
            ``probs = (1 - w) * fused members + w * anchor``. ``0`` (default) returns the diffusion ensemble alone;
            ``1`` returns the anchor (the sampling still runs, for the members and the uncertainty). The official
            MedSegDiff code always blends its anchor into the final mask; here it is a measured choice.
        mirror_axes: spatial axes (0-based, e.g. ``(0, 1)`` in 2D) for test-time mirroring: member ``j`` sees view
            ``j mod V`` of the ``V = min(ensemble, 2 ** len(mirror_axes))`` mirrorings of the image (the image itself
            first; see :func:`~medsegdiff_bundle.diffusion.mirroring.mirror_views`) and is mirrored back before the
            fusion; the anchor is the mean over the views. ``None`` / ``()`` (default): every member sees the image.
            The condition UNet then runs ``V`` times per image instead of once; the denoiser's work is unchanged.
        schedule_args: passed to the schedule.
    """

    def __init__(
        self,
        sampler: str = "dpmpp",
        steps: int = 20,
        ensemble: int = 5,
        fusion: str = "mean",
        uncertainty: str = "std",
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = "sample",
        seed: int | None = 0,
        round_x0: bool = False,
        anchor_weight: float = 0.0,
        mirror_axes: Sequence[int] | None = None,
        **schedule_args,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
        if sampler == "ddpm" and steps != num_train_timesteps:
            raise ValueError(
                f"the DDPM sampler walks the full chain: steps must equal num_train_timesteps={num_train_timesteps}, "
                f"got {steps}; use 'ddim' or 'dpmpp' for fewer steps."
            )
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}.")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}.")
        if uncertainty not in UNCERTAINTIES:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTIES}, got {uncertainty!r}.")
        self.sampler = sampler
        self.steps = steps
        self.ensemble = ensemble
        self.fusion = fusion
        self.uncertainty = uncertainty
        self.seed = seed
        if round_x0 and prediction_type != "sample":
            raise ValueError("round_x0 needs an x0-predicting network (prediction_type='sample').")
        self.round_x0 = bool(round_x0)
        anchor_weight = float(anchor_weight)
        if not 0.0 <= anchor_weight <= 1.0:
            raise ValueError(f"anchor_weight must be in [0, 1], got {anchor_weight}.")
        self.anchor_weight = anchor_weight
        self.mirror_axes = check_mirror_axes(mirror_axes)
        self.scheduler = make_scheduler(sampler, num_train_timesteps, schedule, prediction_type, **schedule_args)
        self.scheduler.set_timesteps(steps)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    @torch.no_grad()
    def __call__(
        self,
        network: MedSegDiffV2,
        image: torch.Tensor,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> SampleResult:
        """Sample ``image (B, C_in, *S)`` -> :class:`SampleResult`.

        ``callback(step, timestep, x0)``, if given, sees every step's predicted clean sample ``x0 (B * N, M, *S)``
        (members of an image adjacent, each in the image's own orientation); it is for diagnostics (e.g.
        :mod:`medsegdiff_bundle.evaluation.trajectory`), and whatever it reads back from the device costs a
        synchronisation per step.
        """
        b, n = image.shape[0], self.ensemble
        check_mirror_axes(self.mirror_axes, image.ndim - 2)
        views = mirror_views(self.mirror_axes, n)
        v = len(views)
        # the condition UNet sees each view once: rows b0v0, b0v1, .., b1v0, .. (cat keeps the input's memory layout)
        viewed = torch.cat([mirror(image[i : i + 1], view) for i in range(b) for view in views]) if v > 1 else image
        cond = network.condition(viewed)
        anchors = channel_to_class_probs(cond.anchor, network.num_classes)
        anchor_probs = unmirror_members(anchors, views, v).unflatten(0, (b, v)).mean(dim=1)
        # member j of image i takes row i * v + j % v
        member_row = torch.arange(b, device=image.device)[:, None] * v + torch.arange(n, device=image.device) % v
        cond = cond.take(member_row.flatten())
        generator = self._generator(image.device)
        x = torch.randn(
            (b * n, network.mask_channels, *image.shape[2:]), generator=generator, device=image.device, dtype=image.dtype
        )
        self.scheduler.set_timesteps(self.steps)  # resets multistep state
        x0 = x
        for step, t in enumerate(self.scheduler.timesteps.tolist()):
            out = network.denoise(x, torch.full((b * n,), t, device=image.device, dtype=torch.long), cond)
            soft = out
            if self.round_x0:
                out = round_x0(out, network.num_classes)
            if self.sampler == "ddpm":
                x, x0 = self.scheduler.step(out, t, x, generator=generator)
            else:
                x, x0 = self.scheduler.step(out, t, x)
            if self.round_x0:
                x0 = soft.clamp(-1.0, 1.0)
            if callback is not None:
                callback(step, t, unmirror_members(x0, views, n))
        # the last step's predicted x0 is the sample (DDPM's and DPM-Solver++'s last step return it as x too;
        # DDIM with T % steps != 0 would otherwise stop at a small t > 0)
        probs = unmirror_members(x0_to_probs(x0, network.num_classes), views, n)
        members = probs.reshape(b, n, *probs.shape[1:]).transpose(0, 1)
        fused = fuse(members, self.fusion)
        if self.anchor_weight > 0:
            fused = torch.lerp(fused, anchor_probs.to(fused.dtype), self.anchor_weight)
        return SampleResult(
            probs=fused,
            uncertainty=uncertainty(members, self.uncertainty),
            members=members,
            anchor=anchor_probs,
        )
