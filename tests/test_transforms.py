"""Custom transforms: label clean-up with case-naming errors, uncertainty split, pipeline builders."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from medsegdiff_bundle.data.transforms import (
    PrepareLabeld,
    SplitTrailingChannelsd,
    SplitUncertaintyd,
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
                                          ({"normalization": "minmax"}, "normalization must be one of")])
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
