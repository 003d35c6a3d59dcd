"""MONAI ``SupervisedTrainer`` glue: the diffusion training iteration and the EMA / reseeding handlers."""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.networks.schedulers import Scheduler
from monai.utils import CommonKeys as Keys
from monai.data import MetaTensor
from monai.data.utils import set_rnd

from ..diffusion.labels import validate_label
from ..diffusion.losses import MedSegDiffLoss
from ..diffusion.training import diffusion_forward
from ..utils import as_bool
from .ema import EMAModel, unwrap_model
from .fastpath import channels_last_format, compile_training_calls, without_cudagraphs
from .warmup import ConditionWarmup

__all__ = ["DiffusionTrainIteration", "EMAUpdateHandler", "EpochSeedHandler", "samples_per_epoch"]

_AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The data of a MONAI ``MetaTensor`` as a plain ``torch.Tensor`` (no copy); other tensors unchanged."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def _check_label_on_host(batchdata: Any, num_classes: int, prepare_batch: Callable) -> bool:
    """Validate the batch's label while it is still on the host; ``True`` when it was checked here.

    Checking it on the GPU instead means reading the result back, which makes the host wait for every kernel queued
    so far, once per iteration (it then cannot queue the next step while the GPU runs this one). A failed check names
    the cases whose labels are wrong (``filename_or_obj`` of a ``MetaTensor`` batch).

    Raises:
        ValueError: from :func:`~medsegdiff_bundle.diffusion.labels.validate_label`, with the files named.
    """
    label = batchdata.get(Keys.LABEL) if isinstance(batchdata, dict) else None
    # a custom prepare_batch may build the label some other way: then only the device-side check is certain
    if prepare_batch is not default_prepare_batch or not isinstance(label, torch.Tensor) or label.device.type != "cpu":
        return False
    try:
        validate_label(_plain(label), num_classes)  # MetaTensor ops would add their Python cost to every step
    except ValueError as err:
        files = label.meta.get("filename_or_obj") if isinstance(label, MetaTensor) else None
        if isinstance(files, (list, tuple)) and len(files) == label.shape[0] and label.ndim >= 3:
            bad = []
            for name, case in zip(files, label):
                try:
                    validate_label(_plain(case)[None], num_classes)
                except ValueError:
                    bad.append(str(name))
            raise ValueError(f"{err} Cases with a wrong label: {bad or list(map(str, files))}.") from err
        raise
    return True


def _average_gradients_over_processes(network: torch.nn.Module) -> None:
    """Average the gradients over the processes of a ``DistributedDataParallel`` network, in one all-reduce.

    For a backward that did not go through DDP's forward (the condition warm-up calls the condition UNet alone, so
    that the denoiser's parameters, which take no part, do not stall DDP's reducer); DDP's own hooks stay idle then.
    A network that is not DDP-wrapped is left as it is.
    """
    if not isinstance(network, torch.nn.parallel.DistributedDataParallel):
        return
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(averaged)


def samples_per_epoch(iterations_per_epoch: int | None, batch_size: int) -> int | None:
    """``num_samples`` of the training loader's ``RandomSampler``: ``None`` makes an epoch one pass over the cases
    (what ``shuffle=True`` does), an int a fixed ``iterations_per_epoch`` batches (cases drawn without replacement
    within each pass), as nnU-Net's fixed-length epochs (``multi_gpu_train.json``: per process, drawn with
    replacement). On a small dataset a pass is only a few batches, and every epoch also restarts the loader's
    workers and writes a checkpoint: on an H200 that was a quarter of the training time of Kvasir-SEG's 30-batch
    epochs.

    Raises:
        ValueError: ``iterations_per_epoch`` or ``batch_size`` is not a positive integer.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if iterations_per_epoch is None:
        return None
    n = iterations_per_epoch
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"iterations_per_epoch must be a positive integer or null, got {n!r}.")
    return n * int(batch_size)


class DiffusionTrainIteration:
    """``iteration_update`` for ``SupervisedTrainer``: diffuse the label, condition on the image, step the optimiser.

    Randomness of the diffusion (timesteps and noise) comes from a generator seeded by ``(seed, iteration)``, so a
    run resumed from a checkpoint draws exactly what the uninterrupted run would have drawn.

    Args:
        scheduler: MONAI scheduler with the training noise schedule and ``prediction_type``.
        loss_function: the MedSegDiff-V2 objective.
        seed: base seed of the per-iteration generator.
        grad_clip: max gradient norm (``None`` or ``<= 0`` disables clipping).
        amp_dtype: ``"bfloat16"`` (no loss scaling needed) or ``"float16"`` (uses the trainer's GradScaler);
            only used when the trainer has ``amp=True``.
        channels_last: feed the images in the channels-last layout (``channels_last_3d`` in 3D). Convert the network
            too, before any DDP wrapper, with :func:`~medsegdiff_bundle.engine.to_channels_last` (the bundle's
            ``channels_last`` key does both).
        compile: ``torch.compile`` the network's forward (condition + denoise + anchor head, and its backward).
            Compiled once on the first iteration (once more for a differently sized last batch) and reused; the
            module is not modified, so checkpoints, the EMA copy and ``state_dict`` keys are those of the plain
            network. A DDP-wrapped network is called through DDP's forward, so gradients are still synchronised.
        compile_backend: the ``torch.compile`` backend, ``"inductor"`` (default) or e.g. ``"aot_eager"``.
        compile_mode: inductor's mode (:data:`~medsegdiff_bundle.engine.fastpath.COMPILE_MODES`). The modes that
            replay CUDA graphs compile here without them, with a warning (``"reduce-overhead"`` as ``"default"``,
            ``"max-autotune"`` as ``"max-autotune-no-cudagraphs"``; see
            :func:`~medsegdiff_bundle.engine.fastpath.without_cudagraphs`; with the ``"cudagraphs"`` backend the step
            runs eagerly), so that one ``compile_mode`` in ``train.json`` gives the validation sampler its graphs and
            the training step its fused kernels.
        timestep_power: shape of the training timestep distribution, density ``~ t ** (power - 1)`` (1 = uniform;
            see :func:`medsegdiff_bundle.diffusion.training.sample_timesteps`).
        condition_warmup: optional :class:`~medsegdiff_bundle.engine.ConditionWarmup`. Its warm-up iterations run
            the condition UNet alone, on :meth:`MedSegDiffLoss.condition_loss`, eagerly also with ``compile``; the
            denoiser's parameters get no gradient. Under DDP the iteration averages the warm-up's gradients over the
            processes itself.

    Gradient accumulation follows the trainer's ``accumulation_steps`` (MONAI's ``SupervisedTrainer`` argument):
    the optimiser steps every ``accumulation_steps`` iterations and at the end of every epoch, so the effective batch
    is ``batch_size * accumulation_steps`` (per process) and no gradient crosses an epoch (resume stays exact).

    The label is validated (:func:`~medsegdiff_bundle.diffusion.labels.validate_label`) on the host, before the
    batch is copied to the device, whenever the trainer uses MONAI's ``default_prepare_batch``: checked on a GPU, the
    result would have to be read back, and the host would wait for the GPU at every iteration.

    The trainer output holds ``image``, ``label``, ``loss`` and the loss terms ``diffusion_loss``/``anchor_loss`` (and
    ``x0_dice_loss`` when that term is on); a warm-up iteration has ``loss`` and ``anchor_loss`` only.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        loss_function: MedSegDiffLoss,
        seed: int = 0,
        grad_clip: float | None = 1.0,
        amp_dtype: str = "bfloat16",
        channels_last: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str = "default",
        timestep_power: float = 1.0,
        condition_warmup: ConditionWarmup | None = None,
    ) -> None:
        if amp_dtype not in _AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {tuple(_AMP_DTYPES)}, got {amp_dtype!r}.")
        self.scheduler = scheduler
        self.loss_function = loss_function
        self.seed = seed
        self.grad_clip = grad_clip
        self.amp_dtype = _AMP_DTYPES[amp_dtype]
        self.channels_last = as_bool(channels_last, "channels_last")
        self.compile = as_bool(compile, "compile")
        self.compile_backend = compile_backend
        self.compile_mode = without_cudagraphs(compile_mode)
        self._compiled = compile_training_calls(compile_backend, compile_mode) if self.compile else None
        if not float(timestep_power) > 0:
            raise ValueError(f"timestep_power must be > 0, got {timestep_power}.")
        self.timestep_power = float(timestep_power)
        self.condition_warmup = condition_warmup

    def __call__(self, engine: SupervisedTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for the current iteration.")
        checked = _check_label_on_host(batchdata, self.loss_function.num_classes, engine.prepare_batch)
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        image, label = batch[0], batch[1]
        if label is None:
            raise ValueError("training batches need a 'label'.")
        if self.channels_last:
            image = image.contiguous(memory_format=channels_last_format(image.ndim - 2))
        device = image.device
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + int(engine.state.iteration))
        if not engine.network.training:  # the walk over every module is host time a GPU step cannot hide
            engine.network.train()
        accumulate = max(1, int(getattr(engine, "accumulation_steps", 1) or 1))
        in_epoch = (int(engine.state.iteration) - 1) % max(1, int(engine.state.epoch_length or 1))
        first_of_cycle = in_epoch % accumulate == 0
        last_of_cycle = in_epoch % accumulate == accumulate - 1 or in_epoch == int(engine.state.epoch_length or 1) - 1
        if first_of_cycle:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        warmup = self.condition_warmup is not None and self.condition_warmup.step(engine.state.iteration)
        with torch.autocast(device_type=device.type, dtype=self.amp_dtype, enabled=as_bool(engine.amp, "amp")):
            # plain tensors: MetaTensor's __torch_function__ runs Python on every forward op (host time that a GPU
            # step cannot hide) and dynamo cannot trace it; the losses are the same numbers
            if warmup:
                logits = unwrap_model(engine.network).condition(_plain(image)).logits
                losses = self.loss_function.condition_loss(logits, _plain(label), check_label=not checked)
            else:
                network = engine.network if self._compiled is None else self._compiled(engine.network)
                losses = diffusion_forward(network, self.scheduler, self.loss_function, _plain(image), _plain(label),
                                           generator, self.timestep_power, check_label=not checked)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = losses["loss"]
        scaler = getattr(engine, "scaler", None) if as_bool(engine.amp, "amp") and self.amp_dtype == torch.float16 else None
        backward_loss = loss / accumulate
        if scaler is not None:
            scaler.scale(backward_loss).backward()
        else:
            backward_loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if last_of_cycle:
            if warmup:
                _average_gradients_over_processes(engine.network)
            if scaler is not None:
                scaler.unscale_(engine.optimizer)
            if self.grad_clip and self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip)
            if scaler is not None:
                scaler.step(engine.optimizer)
                scaler.update()
            else:
                engine.optimizer.step()
        engine.state.output = {
            Keys.IMAGE: image,
            Keys.LABEL: label,
            Keys.LOSS: loss.detach(),
            **({"diffusion_loss": losses["diffusion"]} if "diffusion" in losses else {}),
            "anchor_loss": losses["anchor"],
            **({"x0_dice_loss": losses["x0_dice"]} if "x0_dice" in losses else {}),
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class EMAUpdateHandler:
    """Update an :class:`EMAModel` after every training iteration.

    Args:
        ema: the averaged model.
        network: the trained network.
    """

    def __init__(self, ema: EMAModel, network: torch.nn.Module) -> None:
        self.ema = ema
        self.network = network

    def attach(self, engine: SupervisedTrainer) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: SupervisedTrainer) -> None:
        self.ema.update(self.network)


class EpochSeedHandler:
    """Reseed torch/numpy/random and the dataset's random transforms at every epoch start from ``seed + epoch``.

    Shuffling and augmentation then depend only on the epoch number, which is what makes a run resumed at an
    epoch boundary identical to an uninterrupted one. (cuDNN determinism flags are left alone: they cost speed.)

    Args:
        seed: base seed.
        transform: the training dataset's transform (its random transforms are reseeded; with worker processes
            MONAI's DataLoader reseeds them per worker from the torch seed set here).
    """

    def __init__(self, seed: int = 0, transform: Any = None) -> None:
        self.seed = seed
        self.transform = transform

    def attach(self, engine: SupervisedTrainer) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: SupervisedTrainer) -> None:
        seed = self.seed + int(engine.state.epoch)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if self.transform is not None:
            set_rnd(self.transform, seed)
