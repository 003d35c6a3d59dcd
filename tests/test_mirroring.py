"""Test-time mirroring: which views the ensemble members see, that each member is the mirrored-back sample of its
view, that the condition network runs once per view, and the plain-network mean of nnU-Net's mirroring."""

from __future__ import annotations

import pytest
import torch

from medsegdiff_bundle.diffusion import DiffusionSampler
from medsegdiff_bundle.diffusion.mirroring import check_mirror_axes, mirror, mirror_views, mirrored_mean
from medsegdiff_bundle.engine import DiffusionSegInferer
from tests.helpers import tiny_model


def test_views_start_with_the_image_then_single_axes_then_pairs():
    assert mirror_views((0, 1), 5) == [(), (2,), (3,), (2, 3)]
    assert mirror_views((1, 0), 2) == [(), (2,)]
    assert mirror_views((0, 1, 2), 5) == [(), (2,), (3,), (4,), (2, 3)]
    assert mirror_views((1,), 5) == [(), (3,)]
    assert mirror_views(None, 5) == [()] and mirror_views((), 3) == [()]
    assert mirror_views((0, 1), 1) == [()]  # one member sees the image itself


@pytest.mark.parametrize("axes, message", [
    ((0, 0), "distinct"), ((-1,), "non-negative"), (("x",), "sequence of spatial axis indices"),
    ((0, 2), "beyond the 2 spatial dimensions"),
])
def test_bad_axes_are_refused(axes, message):
    with pytest.raises(ValueError, match=message):
        check_mirror_axes(axes, spatial_dims=2)


def test_an_axis_the_image_does_not_have_is_refused_at_sampling():
    model = tiny_model().eval()
    sampler = DiffusionSampler("ddim", 2, ensemble=2, mirror_axes=(2,))
    with pytest.raises(ValueError, match="beyond the 2 spatial dimensions"):
        sampler(model, torch.rand(1, 3, 16, 16))


def _count_condition_batches(model):
    sizes = []
    original = model.condition

    def counting(image):
        sizes.append(image.shape[0])
        return original(image)

    model.condition = counting
    return sizes


@pytest.mark.parametrize("spatial_dims, axes", [(2, (0, 1)), (3, (0, 1, 2)), (2, (1,))])
def test_each_member_is_the_mirrored_back_sample_of_its_view(spatial_dims, axes):
    """Member j of a mirrored run equals member j of a plain run (same seed, so the same noise) on the image
    mirrored as member j's view, mirrored back; the anchor is the mean of the views' anchors mirrored back; the
    fused result and the per-step callback are in the image's orientation."""
    torch.manual_seed(0)
    model = tiny_model(spatial_dims).eval()
    size = 16
    image = torch.rand(2, 3, *(size,) * spatial_dims)  # random: no mirror symmetry to hide a missing flip
    n = 5
    seen = []
    mirrored = DiffusionSampler("dpmpp", 3, ensemble=n, seed=0, mirror_axes=axes)(
        model, image, callback=lambda step, t, x0: seen.append(x0))
    views = mirror_views(axes, n)
    plain = [DiffusionSampler("dpmpp", 3, ensemble=n, seed=0)(model, mirror(image, view)) for view in views]
    for j in range(n):
        view = views[j % len(views)]
        expected = mirror(plain[j % len(views)].members[j], view)
        torch.testing.assert_close(mirrored.members[j], expected, atol=1e-4, rtol=1e-4)
    anchor = torch.stack([mirror(p.anchor, view) for p, view in zip(plain, views)]).mean(0)
    torch.testing.assert_close(mirrored.anchor, anchor, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mirrored.probs, mirrored.members.mean(0))
    # the last step's x0 (members of an image adjacent) is the members' x0 in the image's orientation
    last = seen[-1].unflatten(0, (2, n)).transpose(0, 1)  # (N, B, 1, *S), the foreground channel in [-1, 1]
    torch.testing.assert_close(((last[:, :, 0] + 1) / 2).clamp(0, 1), mirrored.members[:, :, 1], atol=1e-5, rtol=1e-5)
    # mirroring changed something: the members differ from the plain run's on the image itself
    assert not torch.allclose(mirrored.members[1], plain[0].members[1], atol=1e-3)


@pytest.mark.parametrize("ensemble, views", [(5, 4), (2, 2), (1, 1)])
def test_condition_network_runs_once_per_view(ensemble, views):
    model = tiny_model().eval()
    sizes = _count_condition_batches(model)
    DiffusionSampler("ddim", 3, ensemble=ensemble, mirror_axes=(0, 1))(model, torch.rand(2, 3, 16, 16))
    assert sizes == [2 * views]  # one call, every view of every image in it


def test_without_mirror_axes_every_member_sees_the_image():
    model = tiny_model().eval()
    sizes = _count_condition_batches(model)
    image = torch.rand(1, 3, 16, 16)
    off = DiffusionSampler("ddim", 3, ensemble=3, seed=0)(model, image)
    empty = DiffusionSampler("ddim", 3, ensemble=3, seed=0, mirror_axes=[])(model, image)
    assert sizes == [1, 1]
    torch.testing.assert_close(off.members, empty.members, atol=0, rtol=0)


def test_inferer_passes_mirror_axes_to_its_sampler():
    inferer = DiffusionSegInferer(sampler="ddim", steps=2, ensemble=4, mirror_axes=[1, 0])
    assert inferer.sampler.mirror_axes == (0, 1)
    model = tiny_model().eval()
    sizes = _count_condition_batches(model)
    out = inferer(torch.rand(1, 3, 20, 20), model)  # padded to the divisor and cropped back
    assert out.shape == (1, 2, 20, 20) and sizes == [4]


def test_mirrored_mean_averages_a_plain_network_over_every_mirroring():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        got = mirrored_mean(conv, x, (0, 1))
        expected = (conv(x) + conv(x.flip(2)).flip(2) + conv(x.flip(3)).flip(3) + conv(x.flip(2, 3)).flip(2, 3)) / 4
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, conv(x), atol=1e-4)  # the kernel is not symmetric
        torch.testing.assert_close(mirrored_mean(conv, x, None), conv(x))
        # an operator that commutes with mirroring comes back unchanged
        torch.testing.assert_close(mirrored_mean(torch.sigmoid, x, (0, 1)), torch.sigmoid(x))
