"""Small builders shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medsegdiff_bundle.data.synthetic import make_synthetic_dataset
from medsegdiff_bundle.diffusion import MedSegDiffLoss, diffusion_forward, make_scheduler
from medsegdiff_bundle.networks import MedSegDiffV2

TINY = (8, 16, 32)


def tiny_model(spatial_dims: int = 2, in_channels: int = 3, num_classes: int = 2, **kwargs) -> MedSegDiffV2:
    return MedSegDiffV2(spatial_dims, in_channels, num_classes, channels=kwargs.pop("channels", TINY), **kwargs)


def synthetic_batch(n: int, size: int, spatial_dims: int = 2, num_classes: int = 2, in_channels: int = 3, seed: int = 0):
    cases = make_synthetic_dataset(n, (size,) * spatial_dims, num_classes, in_channels, seed=seed)
    image = torch.from_numpy(np.stack([c["image"] for c in cases]))
    label = torch.from_numpy(np.stack([c["label"] for c in cases]).astype(np.int64))
    return image, label


def train(model: MedSegDiffV2, image: torch.Tensor, label: torch.Tensor, iterations: int, lr: float = 2e-3,
          batch_size: int = 8, seed: int = 0) -> list[float]:
    """Plain AdamW loop on the diffusion objective; returns the loss history."""
    scheduler = make_scheduler("ddpm")
    loss_fn = MedSegDiffLoss(model.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for _ in range(iterations):
        idx = torch.randint(0, image.shape[0], (batch_size,), generator=gen)
        loss = diffusion_forward(model, scheduler, loss_fn, image[idx], label[idx], gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    model.eval()
    return history


def dice(probs: torch.Tensor, label: torch.Tensor) -> float:
    """Mean foreground Dice of argmax(probs) against label over the batch and foreground classes."""
    pred = probs.argmax(1, keepdim=True)
    scores = []
    for c in range(1, probs.shape[1]):
        p, t = pred == c, label == c
        scores.append(float(2 * (p & t).sum() / ((p.sum() + t.sum()).clamp_min(1))))
    return float(np.mean(scores))


def dicom_series(folder: Path, nx: int = 10, ny: int = 8, nz: int = 3) -> str:
    """A ``nz``-slice int16 CT series, one ``.dcm`` file per slice, with the tags GDCM groups a series by."""
    import SimpleITK as sitk  # here, not at the top: the GPU machine's tests import this module without SimpleITK

    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(np.arange(nx * ny * nz, dtype=np.int16).reshape(nz, ny, nx))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our series UID so all slices form one series
    root = "1.2.826.0.1.3680043.2.1125"
    for z in range(nz):
        slice_ = volume[:, :, z]
        tags = {
            "0008|0060": "CT",
            "0020|000d": f"{root}.1",  # study instance UID
            "0020|000e": f"{root}.2",  # series instance UID
            "0008|0018": f"{root}.3.{z}",  # SOP instance UID
            "0020|0013": str(z + 1),  # instance number
            "0020|0032": f"0\\0\\{z}",  # image position (patient)
            "0020|0037": "1\\0\\0\\0\\1\\0",  # image orientation (patient)
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{z:03d}.dcm"))
        writer.Execute(slice_)
    return str(folder)
