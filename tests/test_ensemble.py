"""Tests for ``medsegdiff_bundle.diffusion.ensemble``."""

import math
import subprocess
import sys

import pytest
import torch

from medsegdiff_bundle.diffusion.ensemble import (
    fuse,
    fuse_mean,
    fuse_staple,
    uncertainty,
    uncertainty_entropy,
    uncertainty_std,
)


def _binary_members(*masks: torch.Tensor) -> torch.Tensor:
    """Binary masks ``(*S)`` -> members ``(N, 1, 2, *S)`` with probabilities ``[1 - m, m]``."""
    return torch.stack([torch.stack([1 - m, m]) for m in masks]).unsqueeze(1).float()


def _square(size=8):
    m = torch.zeros(size, size)
    m[2:6, 2:6] = 1
    return m


def test_fuse_mean_equals_member_mean():
    """Mean fusion is the plain average over the member axis."""
    members = torch.rand(4, 2, 3, 5, 6).softmax(dim=2)
    out = fuse(members, "mean")
    assert out.shape == (2, 3, 5, 6)
    torch.testing.assert_close(out, members.mean(0))
    torch.testing.assert_close(fuse_mean(members), members.mean(0))


def test_staple_unanimous_members_give_that_mask():
    """When every member predicts the same mask, STAPLE returns it (and its complement as background)."""
    mask = _square()
    out = fuse(_binary_members(mask, mask, mask), "staple")
    assert out.shape == (1, 2, 8, 8)
    torch.testing.assert_close(out[0, 1], mask)
    torch.testing.assert_close(out[0, 0], 1 - mask)


def test_staple_follows_majority_on_single_dissenters():
    """Voxels where only one of three members dissents end up on the majority side of 0.5."""
    mask = _square()
    extra = mask.clone()
    extra[0, 0] = 1  # one member adds a stray voxel
    missing = mask.clone()
    missing[2, 2] = 0  # another drops a voxel
    out = fuse_staple(_binary_members(mask, extra, missing))
    torch.testing.assert_close((out[0, 1] > 0.5).float(), mask)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(1, 8, 8))


def test_staple_batch_and_3d_handled_per_case():
    """Each batch item is fused separately; 3D volumes keep their shape."""
    a = torch.zeros(4, 5, 6)
    a[1:3, 1:4, 2:5] = 1
    b = torch.zeros(4, 5, 6)
    b[0:2, 0:2, 0:2] = 1
    members = torch.stack([_binary_members(a, a)[:, 0], _binary_members(b, b)[:, 0]], dim=1)  # (2, B=2, 2, *S)
    out = fuse_staple(members)
    assert out.shape == (2, 2, 4, 5, 6)
    torch.testing.assert_close(out[0, 1], a)
    torch.testing.assert_close(out[1, 1], b)


def test_staple_all_empty_members_give_zeros():
    """With no foreground in any member, the fused foreground is all zeros (background all ones), not NaN."""
    empty = torch.zeros(8, 8)
    out = fuse_staple(_binary_members(empty, empty, empty))
    assert torch.isfinite(out).all()
    assert out[0, 1].sum() == 0
    torch.testing.assert_close(out[0, 0], torch.ones(8, 8))


def test_staple_rejects_multiclass():
    """STAPLE is binary only; three classes raise a ValueError saying so."""
    members = torch.rand(3, 1, 3, 8, 8).softmax(dim=2)
    with pytest.raises(ValueError, match=r"binary.*got 3 classes"):
        fuse(members, "staple")


def test_uncertainty_std_zero_when_members_agree_positive_where_they_disagree():
    """Std is 0 where members agree and > 0 exactly at the voxel where they disagree."""
    mask = _square()
    other = mask.clone()
    other[0, 0] = 1
    u = uncertainty(_binary_members(mask, mask, other), "std")
    assert u.shape == (1, 1, 8, 8)
    assert u[0, 0, 0, 0] > 0
    u_rest = u.clone()
    u_rest[0, 0, 0, 0] = 0
    assert torch.count_nonzero(u_rest) == 0
    # binary: std of the foreground probability (population std of [0, 0, 1])
    assert u[0, 0, 0, 0].item() == pytest.approx(math.sqrt(2) / 3)


def test_uncertainty_std_single_member_is_zero():
    """One member has no spread: zeros of shape (B, 1, *S)."""
    members = torch.rand(1, 2, 3, 4, 5).softmax(dim=2)
    u = uncertainty_std(members)
    assert u.shape == (2, 1, 4, 5)
    assert torch.count_nonzero(u) == 0


def test_uncertainty_entropy_bounds_and_uniform_maximum():
    """Entropy lies in [0, log K]; it is log K for a uniform mean and ~0 for confident agreeing members."""
    k = 4
    members = torch.rand(5, 2, k, 6, 6).softmax(dim=2)
    h = uncertainty(members, "entropy")
    assert h.shape == (2, 1, 6, 6)
    assert (h >= 0).all() and (h <= math.log(k) + 1e-5).all()

    uniform = torch.full((3, 1, k, 2, 2), 1.0 / k)
    torch.testing.assert_close(uncertainty_entropy(uniform), torch.full((1, 1, 2, 2), math.log(k)))

    onehot = torch.zeros(3, 1, k, 2, 2)
    onehot[:, :, 1] = 1
    assert uncertainty_entropy(onehot).max() < 1e-5
    assert (uncertainty_entropy(members) < math.log(k)).all()


def test_invalid_method_names_raise():
    """Unknown fusion/uncertainty names raise ValueError listing the valid choices."""
    members = torch.rand(2, 1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"fusion must be one of.*'median'"):
        fuse(members, "median")
    with pytest.raises(ValueError, match=r"uncertainty must be one of.*'variance'"):
        uncertainty(members, "variance")


def test_package_runs_without_simpleitk_until_staple_is_asked_for():
    """The GPU image has no SimpleITK: the package and mean fusion must work; STAPLE must say what is missing."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'SimpleITK':\n"
        "            raise ImportError('No module named SimpleITK')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "import medsegdiff_bundle.diffusion, medsegdiff_bundle.engine, medsegdiff_bundle.data\n"
        "from medsegdiff_bundle.diffusion.ensemble import fuse\n"
        "m = torch.rand(3, 1, 2, 4, 4)\n"
        "assert torch.allclose(fuse(m, 'mean'), m.mean(0))\n"
        "try:\n"
        "    fuse(m, 'staple')\n"
        "except ImportError as e:\n"
        "    print('STAPLE:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "STAPLE: No module named SimpleITK" in out.stdout
