"""Tests for ``medsegdiff_bundle.diffusion.labels``."""

import re

import pytest
import torch

from medsegdiff_bundle.diffusion.labels import (
    label_to_x0,
    mask_channels,
    probs_to_label,
    validate_label,
    x0_to_probs,
)


def _label(num_classes: int, shape=(2, 1, 5, 6)) -> torch.Tensor:
    """Random label map that contains every class."""
    label = torch.randint(0, num_classes, shape)
    label.view(-1)[:num_classes] = torch.arange(num_classes)
    return label


def test_mask_channels():
    """Binary diffuses one channel; multi-class diffuses one channel per class including background."""
    assert mask_channels(2) == 1
    assert mask_channels(3) == 3
    assert mask_channels(5) == 5


def test_binary_round_trip():
    """Binary: one channel equal to 2*fg-1 in {-1, 1}; decoding gives [1-p, p] and recovers the label."""
    label = _label(2)
    x0 = label_to_x0(label, 2)
    assert x0.shape == (2, 1, 5, 6)
    assert set(x0.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(x0, label.float() * 2 - 1)
    probs = x0_to_probs(x0, 2)
    assert probs.shape == (2, 2, 5, 6)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 5, 6))
    torch.testing.assert_close(probs[:, 1:], label.float())
    assert torch.equal(probs_to_label(probs), label)


@pytest.mark.parametrize("shape", [(2, 1, 5, 6), (1, 1, 3, 4, 5)])
def test_multiclass_round_trip(shape):
    """Multi-class (2D and 3D): K one-hot channels in {-1, 1} with a single +1 per voxel; decoding recovers the label."""
    k = 4
    label = _label(k, shape)
    x0 = label_to_x0(label, k)
    assert x0.shape == (shape[0], k, *shape[2:])
    assert set(x0.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal((x0 == 1).sum(1, keepdim=True), torch.ones_like(label))
    assert torch.equal(x0.argmax(1, keepdim=True), label)  # channel 0 is background
    probs = x0_to_probs(x0, k)
    assert probs.shape == x0.shape
    torch.testing.assert_close(probs.sum(1), torch.ones(shape[0], *shape[2:]))
    assert torch.equal(probs_to_label(probs), label)


def test_x0_to_probs_clamps_and_normalises_noisy_predictions():
    """Out-of-range noisy x0 decodes to probabilities in [0, 1] that sum to one per voxel, argmax preserved."""
    k = 3
    label = _label(k)
    x0 = label_to_x0(label, k) * 1.3 + 0.2 * torch.randn(2, k, 5, 6)
    probs = x0_to_probs(x0, k)
    assert probs.min() >= 0 and probs.max() <= 1
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 5, 6))
    assert torch.equal(probs_to_label(probs), label)


def test_x0_to_probs_all_negative_falls_back_to_uniform():
    """When every channel decodes to 0, the voxel gets a uniform distribution rather than NaN."""
    probs = x0_to_probs(-torch.ones(1, 3, 2, 2), 3)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, torch.full((1, 3, 2, 2), 1 / 3))


def test_validate_label_accepts_integer_valued_float_and_returns_long():
    """Integer-valued floats are valid and come back as ``long``."""
    out = validate_label(torch.tensor([[[[0.0, 1.0], [2.0, 1.0]]]]), 3)
    assert out.dtype == torch.long
    assert out.tolist() == [[[[0, 1], [2, 1]]]]


def test_validate_label_rejects_value_at_or_above_num_classes():
    """A class index equal to num_classes is out of range; the message gives the range and num_classes."""
    label = torch.tensor([[[[0, 1], [3, 1]]]])
    with pytest.raises(ValueError, match=r"values span \[0, 3\] but num_classes=3 allows 0\.\.2"):
        validate_label(label, 3)


def test_validate_label_rejects_negative_values():
    """Negative class indices are rejected with the offending range in the message."""
    label = torch.tensor([[[[0, -1], [1, 1]]]])
    with pytest.raises(ValueError, match=r"mask values span \[-1, 1\]"):
        validate_label(label, 2, name="mask")


def test_validate_label_rejects_non_integer_floats():
    """Soft/fractional labels are rejected as non-integer."""
    label = torch.tensor([[[[0.0, 0.5], [1.0, 1.0]]]])
    with pytest.raises(ValueError, match=r"label holds non-integer values; expected class indices 0\.\.1"):
        validate_label(label, 2)
    with pytest.raises(ValueError, match=r"non-integer"):
        label_to_x0(label, 2)


@pytest.mark.parametrize("shape", [(1, 2, 4, 4), (4, 4), (1, 4)])
def test_validate_label_rejects_wrong_channel_count(shape):
    """Anything but a (B, 1, *S) map (e.g. a one-hot or missing batch/channel dims) is rejected, showing the shape."""
    label = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape(f"shape (B, 1, *spatial), got {shape}")):
        validate_label(label, 2)
