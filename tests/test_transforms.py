"""Custom transforms: label clean-up with case-naming errors, uncertainty split, pipeline builders, augmentations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medsegdiff_bundle.data.transforms import (
    PrepareLabeld,
    SplitTrailingChannelsd,
    SplitUncertaintyd,
    augmentation_transforms,
    build_preprocessing,
)


def _label(values, name="/data/case_7_mask.png"):
    return MetaTensor(torch.tensor(values, dtype=torch.float32)[None], meta={"filename_or_obj": name})


def test_mapping_is_applied_all_at_once():
    """REFUGE2's 255/128/0 -> 0/1/2 is a permutation: applied sequentially it would corrupt the classes."""
    out = PrepareLabeld("label", 3, mapping={255: 0, 128: 1, 0: 2})({"label": _label([[255, 128, 0, 0]])})
    assert out["label"].tolist() == [[[0, 1, 2, 2]]]
    out = PrepareLabeld("label", 4, mapping={"4": 3})({"label": _label([[0, 1, 2, 4]])})
    assert out["label"].tolist() == [[[0, 1, 2, 3]]]


def test_threshold_and_first_channel_of_rgb_masks():
    rgb = MetaTensor(torch.tensor([[[0, 250], [3, 255]]] * 3, dtype=torch.float32), meta={"filename_or_obj": "m.jpg"})
    out = PrepareLabeld("label", 2, threshold=127)({"label": rgb})
    assert out["label"].shape == (1, 2, 2) and out["label"].tolist() == [[[0, 1], [0, 1]]]


def test_errors_name_the_file_and_hint_at_the_fix():
    with pytest.raises(ValueError, match=r"case_7_mask\.png has values in \[0, 255\].*label_threshold=127"):
        PrepareLabeld("label", 2)({"label": _label([[0, 255]])})
    with pytest.raises(ValueError, match="non-integer"):
        PrepareLabeld("label", 2)({"label": _label([[0, 0.5]])})
    image = MetaTensor(torch.zeros(3, 4, 4), meta={"filename_or_obj": "img.png"})
    with pytest.raises(ValueError, match=r"image img\.png has spatial size \(4, 4\) but label .* has \(1, 2\)"):
        PrepareLabeld("label", 2)({"image": image, "label": _label([[0, 1]])})


def test_split_uncertainty_moves_the_last_channel():
    pred = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 2, 2)
    out = SplitUncertaintyd("pred")({"pred": pred})
    assert torch.equal(out["uncertainty"], pred[2:]) and torch.equal(out["pred"], pred[:2])


def test_trailing_channels_peel_off_from_the_end():
    # the inferer's layout with return_anchor and return_uncertainty: K probabilities, K anchor, 1 uncertainty
    pred = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 2, 2)
    out = SplitUncertaintyd("pred")({"pred": pred})
    out = SplitTrailingChannelsd("pred", "anchor", 2)(out)
    assert torch.equal(out["uncertainty"], pred[4:]) and torch.equal(out["anchor"], pred[2:4])
    assert torch.equal(out["pred"], pred[:2])
    with pytest.raises(ValueError, match="pred has 2 channels; cannot split off the last 2 as 'anchor'"):
        SplitTrailingChannelsd("pred", "anchor", 2)({"pred": pred[:2]})


@pytest.mark.parametrize("kwargs,match", [({"stage": "test"}, "stage must be"),
                                          ({"patch_size": [32]}, "needs 2 values"),
                                          ({"normalization": "minmax"}, "normalization must be one of"),
                                          ({"augmentation": "heavy"}, "augmentation must be one of .*got 'heavy'")])
def test_builder_refuses_bad_options(kwargs, match):
    args = {"spatial_dims": 2, "stage": "train", "patch_size": [32, 32], "num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_preprocessing(**args)


@pytest.mark.parametrize("stage", ["train", "validate", "infer", "evaluate"])
def test_3d_pipelines_build_without_monais_orientation_deprecation(stage):
    """Orientation's default axis labels are deprecated in MONAI; every 3D pipeline (and the fingerprint's loader)
    names them, so users see no FutureWarning and the orientation stays the one plans and checkpoints were made with."""
    import warnings

    from monai.transforms import Orientationd

    from medsegdiff_bundle.data.transforms import RAS_AXIS_LABELS, build_preprocessing
    from medsegdiff_bundle.planning.fingerprint import _Loader

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline = build_preprocessing(3, stage, (16, 16, 16), 3, "zscore", target_spacing=(1.0, 1.0, 1.0))
        _Loader()
    orient = [t for t in pipeline.transforms if isinstance(t, Orientationd)]
    assert len(orient) == 1 and orient[0].ornt_transform.labels == RAS_AXIS_LABELS


# ------------------------------------------------------------------------------------------------ augmentation
PATCH = {2: [32, 32], 3: [16, 16, 16]}


def _mask_case(folder: Path, spatial_dims: int) -> dict:
    """A case whose image is its label (foreground 1, background 0; 2D: an RGB PNG of 255/0, 3D: a NIfTI): an
    off-centre block, so that moving the image and not the label, or the other way round, shows."""
    folder.mkdir(parents=True, exist_ok=True)
    if spatial_dims == 2:
        from PIL import Image

        label = np.zeros((32, 32), np.uint8)
        label[3:13, 5:27] = 1
        Image.fromarray(np.repeat(label[..., None] * 255, 3, axis=-1)).save(folder / "image.png")
        Image.fromarray(label).save(folder / "label.png")
        return {"image": str(folder / "image.png"), "label": str(folder / "label.png")}
    import nibabel as nib

    label = np.zeros((24, 24, 24), np.uint8)
    label[3:11, 4:20, 6:18] = 1
    nib.save(nib.Nifti1Image(label.astype(np.float32), np.eye(4)), folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), folder / "label.nii.gz")
    return {"image": str(folder / "image.nii.gz"), "label": str(folder / "label.nii.gz")}


def _pipeline(spatial_dims: int, augmentation: str, stage: str = "train", seed: int = 0):
    normalization = "rgb" if spatial_dims == 2 else "none"
    pipeline = build_preprocessing(spatial_dims, stage, PATCH[spatial_dims], 2, normalization, num_samples=2,
                                   augmentation=augmentation)
    pipeline.set_random_state(seed=seed)
    return pipeline


def _draws(pipeline, case: dict, n: int) -> list[dict]:
    """``n`` passes of ``case`` through ``pipeline``, the 3D patches of each flattened into one list."""
    out: list[dict] = []
    for _ in range(n):
        sample = pipeline(dict(case))
        out += sample if isinstance(sample, list) else [sample]
    return out


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_nnunet_augmentation_moves_image_and_label_together(tmp_path, spatial_dims):
    """With the image equal to its label, every augmented image is still bright inside its augmented label and dark
    outside (the intensity transforms are monotone or small; a label flipped against its image scores below 0.2
    here), and the label stays a class-index map of the patch's shape (nearest interpolation, also in 3D's lazily
    resampled block)."""
    case = _mask_case(tmp_path, spatial_dims)
    samples = _draws(_pipeline(spatial_dims, "nnunet"), case, 40 if spatial_dims == 2 else 12)
    gaps = []
    for sample in samples:
        image, label = sample["image"], sample["label"]
        assert tuple(label.shape) == (1, *PATCH[spatial_dims]) and image.shape[1:] == label.shape[1:]
        assert set(label.unique().tolist()) <= {0.0, 1.0}
        inside = label[0].bool()
        if inside.any() and (~inside).any():
            gaps.append(float(image[:, inside].mean() - image[:, ~inside].mean()))
    assert len(gaps) >= 0.9 * len(samples) and min(gaps) > 0.4, gaps
    if spatial_dims == 2:  # rotations and zooms were among the draws, not only mirrorings
        plain = _pipeline(2, "none")(dict(case))["label"]
        mirrored = [plain.flip(dims) for dims in ([], [1], [2], [1, 2])]
        moved = [s for s in samples if not any(torch.equal(s["label"], m) for m in mirrored)]
        assert len(moved) >= 5


def test_nnunet_draws_differ_from_each_other_and_from_no_augmentation(tmp_path):
    case = _mask_case(tmp_path, 2)
    plain = _pipeline(2, "none")(dict(case))["image"]
    images = [s["image"] for s in _draws(_pipeline(2, "nnunet"), case, 20)]
    # nothing fires in about 4 % of draws (mirroring included), and two draws may mirror alike and no more
    assert sum(not torch.equal(image, plain) for image in images) >= 17
    distinct = [image for i, image in enumerate(images) if not any(torch.equal(image, o) for o in images[:i])]
    assert len(distinct) >= 16


def test_each_nnunet_transform_fires_at_nnunets_rate():
    """Over many draws each transform of "nnunet" changes the sample in about nnU-Net's share of them (rotation and
    scaling each 0.2, so one of them 0.36); the intensity transforms never touch the label."""
    expected = [("RandRotated", 0.2), ("RandZoomd", 0.2), ("RandGaussianNoised", 0.1), ("RandGaussianSmoothd", 0.2),
                ("RandScaleIntensityd", 0.15), ("RandScaleIntensityFixedMeand", 0.15),
                ("RandSimulateLowResolutiond", 0.25), ("RandAdjustContrastd", 0.1), ("RandAdjustContrastd", 0.3),
                ("RandFlipd", 0.5), ("RandFlipd", 0.5)]
    transforms = augmentation_transforms(2, "nnunet", PATCH[2])
    assert [type(t).__name__ for t in transforms] == [name for name, _ in expected]
    grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij"))
    image = torch.cat([grid, grid[:1] * grid[1:]]) + 0.1  # three different, asymmetric channels
    label = (grid[:1] > 0.6).float()
    sample = {"image": MetaTensor(image), "label": MetaTensor(label)}
    draws = 300
    for transform, (name, prob) in zip(transforms, expected):
        transform.set_random_state(seed=1)
        changed = 0
        for _ in range(draws):
            out = transform(dict(sample))
            changed += not torch.equal(out["image"], sample["image"])
            if name not in ("RandRotated", "RandZoomd", "RandFlipd"):
                assert torch.equal(out["label"], sample["label"]), name
        # 4 standard deviations of the binomial share, and a low-resolution zoom near 1 that changes nothing
        assert abs(changed / draws - prob) < 4 * math.sqrt(prob * (1 - prob) / draws) + 0.01, (name, changed)


def test_3d_nnunet_rotations_show_the_volume_around_the_patch():
    """3D: crop, rotation and scaling are resampled in one go from the whole volume, so a rotated or shrunk patch
    near the centre of a large volume has no zero-padded corners; the same transforms one after the other pad them."""
    size = 40
    ramp = torch.linspace(1.0, 2.0, size)[:, None, None].expand(size, size, size)  # no zero anywhere in the volume
    centre = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij")) - size // 2
    label = ((centre**2).sum(0) <= 9).float()[None]  # a small ball in the middle
    sample = {"image": MetaTensor(ramp[None].clone()), "label": MetaTensor(label)}
    block = augmentation_transforms(3, "nnunet", [8, 8, 8])[0]
    assert isinstance(block, Compose) and [type(t).__name__ for t in block.transforms] == [
        "RandCropByPosNegLabeld", "RandRotated", "RandZoomd"]
    step = 1.0 / (size - 1)

    def padded_shares(pipeline) -> list[float]:
        """Zero share of each patch with foreground (so near the centre) that was rotated or scaled."""
        pipeline.set_random_state(seed=3)
        shares = []
        for _ in range(60):
            patch = pipeline(dict(sample))[0]
            image = patch["image"][0]
            plain = torch.allclose(image.diff(dim=0), torch.full((), step), atol=1e-5) and \
                not image.diff(dim=1).any() and not image.diff(dim=2).any()
            if patch["label"].any() and not plain:
                shares.append(float((image < 0.5).float().mean()))
        return shares

    lazy = padded_shares(block)
    assert len(lazy) >= 5 and max(lazy) == 0.0, lazy
    eager = padded_shares(Compose(block.transforms, lazy=False))
    # all but the draws that only enlarge (scale > 1 crops the middle)
    assert len(eager) >= 5 and sum(share > 0 for share in eager) >= len(eager) / 2, eager


def test_no_augmentation_trains_on_the_validation_images(tmp_path):
    """2D "none": the training sample is exactly the validation pipeline's (the resized image and label)."""
    from medsegdiff_bundle.data import load_datalist, write_synthetic_dataset

    case = load_datalist(write_synthetic_dataset(tmp_path, 1, (40, 36), seed=2), "training", tmp_path)[0]
    train, validate = _pipeline(2, "none")(dict(case)), _pipeline(2, "none", stage="validate")(dict(case))
    for key in ("image", "label"):
        assert torch.equal(train[key], validate[key]), key
    assert [type(t).__name__ for t in _pipeline(3, "none").transforms][-2:] == ["SpatialPadd", "RandCropByPosNegLabeld"]


def test_default_augmentation_is_the_one_results_were_trained_with():
    """"default" keeps the transforms (and their probabilities) of every earlier result, in their order."""
    deterministic_2d = ["LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "PrepareLabeld", "ScaleIntensityRanged",
                        "Resized"]
    deterministic_3d = ["LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "Orientationd", "PrepareLabeld",
                        "NormalizeIntensityd", "SpatialPadd"]
    expected = {
        2: [(name, None) for name in deterministic_2d] + [
            ("RandFlipd", 0.5), ("RandFlipd", 0.5), ("RandRotate90d", 0.5), ("RandAffined", 0.3),
            ("RandScaleIntensityd", 0.5), ("RandShiftIntensityd", 0.5)],
        3: [(name, None) for name in deterministic_3d] + [
            ("RandCropByPosNegLabeld", None), ("RandFlipd", 0.5), ("RandFlipd", 0.5), ("RandFlipd", 0.5),
            ("RandScaleIntensityd", 0.5), ("RandShiftIntensityd", 0.5)],
    }
    for dims, normalization in ((2, "rgb"), (3, "zscore")):
        for pipeline in (build_preprocessing(dims, "train", PATCH[dims], 2, normalization),
                         build_preprocessing(dims, "train", PATCH[dims], 2, normalization, augmentation="default")):
            assert [(type(t).__name__, getattr(t, "prob", None)) for t in pipeline.transforms] == expected[dims]
