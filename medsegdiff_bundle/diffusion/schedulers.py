"""Noise schedulers: MONAI's DDPM, MONAI's DDIM with trailing timestep spacing, and DPM-Solver++(2M).

All share MONAI's scheduler interface (``set_timesteps(n)``, ``timesteps``, ``step(eps, t, x_t) -> (x_prev, x0)``,
``add_noise``), and the same noise schedule from ``monai.networks.schedulers.NoiseSchedules``.

Timestep rules (a bug users of the original code hit was feeding timesteps the model was not trained on):
every timestep passed to the network lies in ``[0, num_train_timesteps)``, the first one is ``T - 1`` (pure
noise), and each step's target time is the next evaluated timestep.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler

__all__ = ["TrailingDDIMScheduler", "DPMSolverPPScheduler", "make_scheduler", "SAMPLERS", "PREDICTION_TYPES"]

SAMPLERS = ("ddpm", "ddim", "dpmpp")
PREDICTION_TYPES = ("epsilon", "sample")


class TrailingDDIMScheduler(DDIMScheduler):
    """MONAI's deterministic DDIM step with "trailing" timesteps ``T-1, T-1-r, ...`` where ``r = T // n``.

    MONAI's ``DDIMScheduler.step`` moves from ``t`` to ``t - T // n``; its ``set_timesteps`` (linspace) evaluates
    the network at times that do not match those targets. Trailing spacing makes each step land exactly on
    the next evaluated timestep. Any remainder ``T - n*r`` lands the last step at a small ``t >= 0``; the sampler
    then takes the step's predicted ``x0``.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"DDIM steps must be in [1, {self.num_train_timesteps}] (the training range), got {num_inference_steps}."
            )
        self.num_inference_steps = num_inference_steps
        ratio = self.num_train_timesteps // num_inference_steps
        self.timesteps = (self.num_train_timesteps - 1 - ratio * torch.arange(num_inference_steps, device=device)).long()


class DPMSolverPPScheduler(Scheduler):
    """DPM-Solver++ (Lu et al. 2022), second-order multistep, data prediction, for discrete-time DDPMs.

    With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``, ``lambda_t = log(alpha_t / sigma_t)``,
    ``h = lambda_s - lambda_t`` (``s`` the next time) and ``x0_t = (x_t - sigma_t * eps) / alpha_t``:

    * first order:  ``x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) x0_t``
    * second order: same with ``D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev``, ``r = h_prev / h``.

    Timesteps are ``round(T - 1 - i * T / n)`` for ``i < n`` (trailing spacing); the final step goes to
    the clean sample (``sigma = 0``) and is first order, so it returns the model's denoised ``x0`` and never leaves
    an uncorrected last step. ``x0`` is clipped to ``[-1, 1]`` (masks live there).

    Args:
        num_train_timesteps: ``T``.
        schedule: a member of MONAI's ``NoiseSchedules``.
        clip_sample: clip predicted ``x0`` to ``[-1, 1]``.
        prediction_type: what the network predicts, ``"epsilon"`` (noise) or ``"sample"`` (``x0``).
        schedule_args: passed to the schedule function.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        **schedule_args,
    ) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        self.clip_sample = clip_sample
        self.prediction_type = prediction_type
        self._prev_x0: torch.Tensor | None = None
        self._prev_h: torch.Tensor | None = None
        self.set_timesteps(20)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps in ``[0, T)`` and reset the multistep history."""
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"DPM-Solver++ steps must be in [1, {self.num_train_timesteps}] (the training range), "
                f"got {num_inference_steps}."
            )
        self.num_inference_steps = num_inference_steps
        # spacing T/n >= 1 keeps the rounded times strictly decreasing; the last one is T/n - 1 >= 0
        t = self.num_train_timesteps
        grid = (t - 1) - torch.arange(num_inference_steps, dtype=torch.float64) * (t / num_inference_steps)
        self.timesteps = grid.round().long().to(device)
        self._prev_x0 = None
        self._prev_h = None

    def _alpha_sigma_lambda(self, timestep: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if timestep is None:  # the clean end point
            return torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64), torch.tensor(float("inf"), dtype=torch.float64)
        abar = self.alphas_cumprod[timestep].double()
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return alpha, sigma, torch.log(alpha / sigma)

    def _next_timestep(self, timestep: int) -> int | None:
        ts = self.timesteps.tolist()
        i = ts.index(int(timestep))
        return ts[i + 1] if i + 1 < len(ts) else None

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One solver step from ``timestep`` to the next one in ``self.timesteps`` (or to clean after the last).

        Returns:
            the sample at the next time and the predicted ``x0``.
        """
        timestep = int(timestep)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(timestep)
        if self.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = (sample - sigma_t.to(sample.dtype) * model_output) / alpha_t.to(sample.dtype)
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        nxt = self._next_timestep(timestep)
        if nxt is None:
            self._prev_x0, self._prev_h = None, None
            return x0, x0
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(nxt)
        h = lambda_s - lambda_t
        d = x0
        if self._prev_x0 is not None and self._prev_h is not None:
            r = self._prev_h / h
            d = (1 + 1 / (2 * r)).to(x0.dtype) * x0 - (1 / (2 * r)).to(x0.dtype) * self._prev_x0
        x_next = (sigma_s / sigma_t).to(sample.dtype) * sample - (alpha_s * torch.expm1(-h)).to(sample.dtype) * d
        self._prev_x0, self._prev_h = x0, h
        return x_next, x0


def make_scheduler(
    sampler: str,
    num_train_timesteps: int = 1000,
    schedule: str = "linear_beta",
    prediction_type: str = "sample",
    **schedule_args,
) -> Scheduler:
    """Build the scheduler for ``sampler`` in ``("ddpm", "ddim", "dpmpp")`` on a shared noise schedule.

    ``prediction_type`` is what the network predicts: ``"sample"`` (the clean mask ``x0``, our default) or
    ``"epsilon"`` (the noise, as in the paper). See the README's design table for the measurement behind the default.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
    common = {"clip_sample": True, "prediction_type": prediction_type, **schedule_args}
    if sampler == "ddpm":
        return DDPMScheduler(num_train_timesteps, schedule, variance_type="fixed_small", **common)
    if sampler == "ddim":
        return TrailingDDIMScheduler(num_train_timesteps, schedule, **common)
    if sampler == "dpmpp":
        return DPMSolverPPScheduler(num_train_timesteps, schedule, **common)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
