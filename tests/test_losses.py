"""The training objective: anchor Dice + CE, and the optional soft Dice on the diffusion model's predicted x0."""

from __future__ import annotations

import pytest
import torch

from medsegdiff_bundle.diffusion import MedSegDiffLoss, diffusion_forward, make_scheduler
from medsegdiff_bundle.diffusion.labels import label_to_x0
from medsegdiff_bundle.diffusion.training import predicted_x0

from .helpers import synthetic_batch, tiny_model


def _label(num_classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (2, 1, 12, 12), generator=g)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_x0_dice_is_zero_for_the_true_mask_and_near_one_for_its_complement(num_classes):
    label = _label(num_classes)
    x0 = label_to_x0(label, num_classes)
    loss = MedSegDiffLoss(num_classes, x0_dice_weight=1.0)
    anchor = torch.zeros_like(x0)
    t = torch.zeros(2, dtype=torch.long)
    perfect = loss(x0, x0, anchor, label, t, x0_pred=x0)["x0_dice"]
    wrong = loss(x0, x0, anchor, label, t, x0_pred=-x0)["x0_dice"]
    assert perfect < 1e-4
    # binary: -x0 is the complement, no overlap; multi-class: every channel -1 decodes to uniform probabilities
    assert wrong > (0.99 if num_classes == 2 else 1 - 2 / (num_classes + 1))


def test_x0_dice_weight_scales_its_term_and_zero_is_the_papers_objective():
    label = _label(2)
    x0 = label_to_x0(label, 2)
    pred, anchor, t = x0 * 0.5, torch.randn_like(x0), torch.zeros(2, dtype=torch.long)
    paper = MedSegDiffLoss(2, x0_dice_weight=0.0)(pred, x0, anchor, label, t)
    assert set(paper) == {"loss", "diffusion", "anchor"}  # no x0 term, no x0 needed
    torch.testing.assert_close(paper["loss"], paper["diffusion"] + paper["anchor"])
    with_dice = MedSegDiffLoss(2, x0_dice_weight=0.5)(pred, x0, anchor, label, t, x0_pred=pred)
    assert with_dice["x0_dice"] > 0.1
    torch.testing.assert_close(with_dice["loss"], paper["loss"] + 0.5 * with_dice["x0_dice"])
    default = MedSegDiffLoss(2)(pred, x0, anchor, label, t, x0_pred=pred)  # on, with weight 1
    torch.testing.assert_close(default["loss"], paper["loss"] + with_dice["x0_dice"])


def test_x0_dice_refuses_bad_settings():
    with pytest.raises(ValueError, match="x0_dice_weight must be >= 0"):
        MedSegDiffLoss(2, x0_dice_weight=-1.0)
    label = _label(2)
    x0 = label_to_x0(label, 2)
    with pytest.raises(ValueError, match="needs x0_pred"):
        MedSegDiffLoss(2)(x0, x0, x0, label, torch.zeros(2, dtype=torch.long))


def test_predicted_x0_inverts_the_forward_noising_for_epsilon_prediction():
    scheduler = make_scheduler("ddpm", prediction_type="epsilon")
    x0 = label_to_x0(_label(2), 2)
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 600])  # per-sample timesteps, far apart
    x_t = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(predicted_x0(scheduler, x_t, noise, t), x0, atol=1e-4, rtol=0)
    # a wrong noise estimate is amplified by 1/sqrt(abar_t) at large t; the estimate stays in the mask range
    far = predicted_x0(scheduler, x_t, noise + 1.0, torch.tensor([999, 999]))
    assert far.abs().max() <= 1.0
    # x0 prediction: the network output is the estimate itself
    sample_sched = make_scheduler("ddpm", prediction_type="sample")
    assert predicted_x0(sample_sched, x_t, noise, t) is noise


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_x0_dice_reaches_the_diffusion_unet(prediction_type):
    """The term adds exactly its weighted value to the training loss and back-propagates into the denoiser."""
    image, label = synthetic_batch(2, 16)
    scheduler = make_scheduler("ddpm", prediction_type=prediction_type)
    grads, totals = [], []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = tiny_model()
        losses = diffusion_forward(model, scheduler, MedSegDiffLoss(2, x0_dice_weight=weight), image, label,
                                   torch.Generator().manual_seed(1))
        losses["loss"].backward()
        head = [p for n, p in model.diffusion_unet.named_parameters()][-1]  # the denoiser's output layer
        grads.append(head.grad.clone())
        totals.append((losses["loss"].detach(), losses.get("x0_dice")))
    torch.testing.assert_close(totals[1][0], totals[0][0] + totals[1][1])
    assert not torch.allclose(grads[0], grads[1])
