"""Peak-training-memory model: recorded measurements, properties, and one live CPU measurement."""

from __future__ import annotations

import pytest
import torch

from medsegdiff_bundle.networks import MedSegDiffV2
from medsegdiff_bundle.planning.memory import (
    FEATURE_NAMES,
    MEMORY_MODEL_PATH,
    activation_features,
    count_parameters,
    load_memory_model,
    measure_saved_activations,
    measure_training_peak,
    predict_training_memory,
)

C4 = (32, 64, 128, 256)


def _config(row: dict) -> dict:
    keys = ("spatial_dims", "in_channels", "num_classes", "channels", "num_res_blocks", "patch_size", "batch_size")
    return {k: row[k] for k in keys}


@pytest.fixture(scope="module")
def model() -> dict:
    return load_memory_model()


def test_model_file_records_the_fit(model):
    assert MEMORY_MODEL_PATH.exists()
    assert set(model["coefficients"]) == set(FEATURE_NAMES)
    assert all(v >= 0 for v in model["coefficients"].values())
    for key in ("overhead_factor", "optimizer_factor", "amp_activation_ratio", "torch_version", "date",
                "fit_measurements", "validation"):
        assert key in model
    assert 1.0 <= model["overhead_factor"] < 1.5


def test_recorded_validation_within_20_percent(model):
    rows = model["validation"]
    patches_2d = {tuple(r["patch_size"]) for r in rows if r["spatial_dims"] == 2}
    assert len(patches_2d) >= 3 and any(r["spatial_dims"] == 3 for r in rows)
    for row in rows:
        predicted = predict_training_memory(**_config(row), model=model).total
        assert predicted == pytest.approx(row["measured_total"], rel=0.20), row["config"]
        if "rss_total" in row:  # the RSS cross-check agrees as well
            assert predicted == pytest.approx(row["rss_total"], rel=0.20), row["config"]


def test_recorded_fit_residuals_are_small(model):
    from medsegdiff_bundle.planning.memory import predict_activation_bytes

    for row in model["fit_measurements"]:
        feats = activation_features(**_config(row))
        assert predict_activation_bytes(feats, model["coefficients"]) == pytest.approx(row["saved_bytes"], rel=0.10)


def test_static_part_matches_the_measured_allocation(model):
    # weights + grads + AdamW moments + EMA = 20 bytes per parameter; the profiler saw the same before each step
    for row in model["validation"]:
        p = count_parameters(row["spatial_dims"], row["in_channels"], row["num_classes"], row["channels"],
                             row["num_res_blocks"])
        assert row["measured_profiler"]["static"] == pytest.approx(20 * p, rel=0.01)


def test_count_parameters_matches_a_real_model():
    for args in ((2, 3, 2, (8, 16, 32), 1), (3, 2, 4, (8, 16, 32, 64), 2)):
        net = MedSegDiffV2(*args[:3], channels=args[3], num_res_blocks=args[4])
        assert count_parameters(*args) == sum(p.numel() for p in net.parameters())


def test_monotonic_in_batch_and_patch(model):
    def total(patch, batch, dims=2, channels=C4):
        return predict_training_memory(dims, 3, 2, channels, 1, patch, batch, model=model).total

    totals = [total((128, 128), b) for b in range(1, 9)]
    assert all(a < b for a, b in zip(totals, totals[1:]))
    totals = [total((s, s), 2) for s in (64, 96, 128, 192, 256, 384)]
    assert all(a < b for a, b in zip(totals, totals[1:]))
    totals = [total((s, s, s), 1, 3, (16, 32, 64, 128)) for s in (32, 48, 64, 96)]
    assert all(a < b for a, b in zip(totals, totals[1:]))
    assert total((128, 160), 2) > total((128, 128), 2)


def test_estimate_parts_add_up(model):
    est = predict_training_memory(3, 1, 3, (16, 32, 64, 128), 1, (64, 64, 64), 1, model=model)
    p = est.parameters
    assert (est.weights, est.gradients, est.optimizer, est.ema) == (4 * p, 4 * p, 8 * p, 4 * p)
    assert est.total == est.weights + est.gradients + est.optimizer + est.ema + max(est.activation_peak,
                                                                                     est.optimizer_workspace)
    no_ema = predict_training_memory(3, 1, 3, (16, 32, 64, 128), 1, (64, 64, 64), 1, ema=False, model=model)
    assert est.total - no_ema.total == 4 * p


def test_amp_lowers_activations_and_adds_weight_copies(model):
    fp32 = predict_training_memory(2, 3, 2, C4, 1, (256, 256), 8, model=model)
    amp = predict_training_memory(2, 3, 2, C4, 1, (256, 256), 8, amp=True, model=model)
    assert amp.activations < fp32.activations and amp.amp_weight_copies == 2 * amp.parameters
    assert amp.total < fp32.total


def test_features_reject_wrong_patch_dims():
    with pytest.raises(ValueError):
        activation_features(3, 1, 2, C4, 1, (64, 64), 1)


def test_saved_activations_are_linear_in_batch():
    """Every sample adds the same bytes; what does not grow with the batch (the NBP-Filter's MLP over the frequency
    grid, ~136 kB here) is a small part, which the model's per-sample features leave out."""
    one, two, four = (measure_saved_activations(2, 1, 2, (8, 16, 32), 1, (32, 32), b) for b in (1, 2, 4))
    per_sample = two - one
    assert per_sample > 0 and four - two == pytest.approx(2 * per_sample, rel=0.01)
    assert 0 <= one - per_sample < 0.05 * one


@pytest.mark.slow
def test_live_cpu_measurement_within_20_percent(model):
    """A real training step (2D 96^2, batch 2, widths 32..256) in a fresh process, peak via torch.profiler."""
    cfg = dict(spatial_dims=2, in_channels=3, num_classes=2, channels=C4, num_res_blocks=1, patch_size=(96, 96),
               batch_size=2)
    res = measure_training_peak(**cfg, method="profiler", threads=min(2, torch.get_num_threads()), timeout=300)
    measured = res["static"] + res["delta"]
    predicted = predict_training_memory(**cfg, model=model).total
    assert predicted == pytest.approx(measured, rel=0.20), (predicted, measured)
