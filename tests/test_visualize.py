"""Training-curve pictures (losses, and the validation metrics in a panel of their own) and the handler that
records them."""

import pytest
from PIL import Image

from medsegdiff_bundle.evaluation import save_training_curves

HISTORY = {"iteration": [1, 2, 3], "loss": [1.0, 0.5, 0.25], "anchor_loss": [0.8, 0.4, 0.3]}


def test_validation_metrics_get_a_second_panel(tmp_path):
    losses = save_training_curves(tmp_path / "losses.png", HISTORY)
    validation = {"epoch": [1, 2], "val_mean_dice": [0.2, 0.4], "val_anchor_dice": [0.3, 0.5]}
    both = save_training_curves(tmp_path / "both.png", HISTORY, validation=validation)
    one, two = Image.open(losses), Image.open(both)
    assert two.size[1] == one.size[1] and two.size[0] == 2 * one.size[0]
    # the second panel is drawn (not left blank): its right half differs from a white canvas
    right = two.convert("L").crop((two.size[0] // 2, 0, two.size[0], two.size[1]))
    assert right.getextrema()[0] < 128


def test_an_empty_validation_log_keeps_one_panel(tmp_path):
    one = Image.open(save_training_curves(tmp_path / "a.png", HISTORY))
    empty = Image.open(save_training_curves(tmp_path / "b.png", HISTORY, validation={"epoch": []}))
    assert empty.size == one.size


def test_training_curves_handler_logs_each_iteration_and_reads_the_losses_once_per_epoch(tmp_path):
    """Per-iteration losses land in training_log.csv exactly; between writes they stay tensors (reading them would
    synchronise the GPU every step; tests/test_gpu.py checks the no-sync part on CUDA)."""
    from types import SimpleNamespace

    import pandas as pd
    import torch

    from medsegdiff_bundle.engine import TrainingCurvesHandler

    handler = TrainingCurvesHandler(tmp_path)
    engine = SimpleNamespace(state=SimpleNamespace(iteration=0, epoch=1, output=None))
    expected = []
    for it in range(1, 7):
        engine.state.iteration, engine.state.epoch = it, 1 + (it - 1) // 3
        losses = {"loss": torch.tensor(1.0 / it), "diffusion_loss": torch.tensor([0.5, 1.5]) * it}
        if it % 2:  # a term some outputs lack
            losses["x0_dice_loss"] = torch.tensor(0.25 * it)
        engine.state.output = losses
        handler.iteration_completed(engine)
        expected.append({"iteration": it, "epoch": engine.state.epoch, "loss": 1.0 / it, "diffusion_loss": 1.0 * it,
                         **({"x0_dice_loss": 0.25 * it} if it % 2 else {})})
        if it == 3:
            assert handler.rows == []  # nothing read back yet
            handler.write()
            assert len(handler.rows) == 3
    handler.write()
    log = pd.read_csv(tmp_path / "training_log.csv")
    assert log["iteration"].tolist() == list(range(1, 7)) and log["epoch"].tolist() == [1, 1, 1, 2, 2, 2]
    for row, want in zip(log.to_dict("records"), expected):
        for key, value in want.items():
            assert row[key] == pytest.approx(value), (key, row)
        if "x0_dice_loss" not in want:
            assert pd.isna(row["x0_dice_loss"])
    assert (tmp_path / "training_curves.png").is_file()


def test_training_curves_are_redrawn_at_most_every_plot_interval_and_always_at_the_end(tmp_path):
    """The CSV follows every epoch; the PNG (about 0.5 s to draw) waits for plot_interval_s, except at the run's end."""
    import pandas as pd
    import torch
    from ignite.engine import Engine, Events

    from medsegdiff_bundle.engine import TrainingCurvesHandler

    png = tmp_path / "training_curves.png"
    drawn = []

    def step(engine, batch):
        if engine.state.iteration == 3:  # the first epoch's PNG exists; take it away to see whether it comes back
            drawn.append(png.is_file())
            png.unlink()
        return {"loss": torch.tensor(float(batch))}

    engine = Engine(step)
    TrainingCurvesHandler(tmp_path, plot_interval_s=3600.0).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: drawn.append(png.is_file()))
    engine.run([1, 2], max_epochs=3)
    assert drawn == [True, False]  # epoch 1 drew; epoch 2, within the interval, did not
    assert png.is_file()  # the end of the run drew it again
    assert len(pd.read_csv(tmp_path / "training_log.csv")) == 6  # the CSV has every iteration


def test_a_resumed_training_keeps_the_curves_from_before_its_checkpoint(tmp_path):
    """Iterations 1-6 logged, then a run resumed from the checkpoint after iteration 3 (epoch 1): the file keeps
    1-3 of the first run and 4-6 of the resumed one; a fresh run (from iteration 1) replaces it all."""
    from types import SimpleNamespace

    import pandas as pd
    import torch

    from medsegdiff_bundle.engine import TrainingCurvesHandler

    def run(first_iteration: int, last_iteration: int, loss: float) -> None:
        handler = TrainingCurvesHandler(tmp_path)
        engine = SimpleNamespace(state=SimpleNamespace(iteration=0, epoch=1, output=None))
        handler._trainer = engine
        for it in range(first_iteration, last_iteration + 1):
            engine.state.iteration, engine.state.epoch = it, 1 + (it - 1) // 3
            engine.state.output = {"loss": torch.tensor(loss)}
            handler.iteration_completed(engine)
            if it % 3 == 0:  # a validation after each epoch
                handler.validation_completed(SimpleNamespace(state=SimpleNamespace(metrics={"val_mean_dice": loss})))
        handler.write()

    run(1, 6, loss=1.0)
    run(4, 6, loss=2.0)
    log = pd.read_csv(tmp_path / "training_log.csv")
    assert log["iteration"].tolist() == [1, 2, 3, 4, 5, 6] and log["loss"].tolist() == [1.0] * 3 + [2.0] * 3
    val = pd.read_csv(tmp_path / "validation_log.csv")
    assert val["epoch"].tolist() == [1, 2] and val["val_mean_dice"].tolist() == [1.0, 2.0]
    run(1, 3, loss=3.0)  # a fresh start in the same folder
    log = pd.read_csv(tmp_path / "training_log.csv")
    assert log["iteration"].tolist() == [1, 2, 3] and log["loss"].tolist() == [3.0] * 3



@pytest.mark.parametrize("with_reference", [True, False])
def test_overlay_keeps_its_figure_title_apart_from_the_panel_titles(tmp_path, monkeypatch, with_reference):
    """The case id is the figure's title; the contour panel says what its lines are (a local name once overwrote
    the title argument, so every overlay was titled with the panel's legend twice and no case id)."""
    import numpy as np

    from medsegdiff_bundle.evaluation import visualize

    seen = {}

    def record(fig, path, **kwargs):
        seen["suptitle"] = fig._suptitle.get_text() if fig._suptitle is not None else None
        seen["panels"] = [ax.get_title() for ax in fig.axes if ax.get_title()]
        return real_save(fig, path, **kwargs)

    real_save = visualize._save
    monkeypatch.setattr(visualize, "_save", record)
    image = np.random.default_rng(0).random((3, 16, 16))
    pred = np.zeros((16, 16), dtype=np.int64)
    pred[4:10, 4:10] = 1
    reference = np.roll(pred, 2, axis=0) if with_reference else None
    out = visualize.save_overlay(tmp_path / "case_7_overlay.png", image, pred, reference, pred * 0.5, title="case_7")
    assert Image.open(out).size[0] > 0
    assert seen["suptitle"] == "case_7"
    legend = "prediction (solid) / reference (yellow dashed)" if with_reference else "prediction"
    assert seen["panels"] == ["image", legend, "ensemble uncertainty"]

    visualize.save_overlay(tmp_path / "untitled.png", image, pred)
    assert seen["suptitle"] is None and seen["panels"] == ["image", "prediction"]


def test_3d_overlays_show_the_same_radiological_axial_slice_whatever_the_files_orientation(tmp_path, monkeypatch):
    """One volume stored RAS and LPS (the flip DICOM's convention differs by): both overlays show the same picture,
    the marker at the patient's right-anterior in the top-left quadrant (radiological: right on the viewer's left,
    anterior at the top), and the case's tensors are left as they were."""
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from medsegdiff_bundle.data.transforms import SaveOverlayd
    from medsegdiff_bundle.evaluation import visualize

    shown = []
    real_save = visualize._save

    def record(fig, path, **kwargs):
        shown.append([np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images])
        return real_save(fig, path, **kwargs)

    monkeypatch.setattr(visualize, "_save", record)
    ras = np.zeros((1, 12, 10, 6), dtype=np.float32)  # (C, x: left -> right, y: posterior -> anterior, z)
    ras[0, 9:11, 7:9, 3] = 1.0  # right and anterior
    seg = (ras > 0).astype(np.float32)
    ras_affine = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    lps_affine = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    lps_affine[:2, 3] = torch.tensor([11.0, 9.0])  # voxel (0, 0) of the flipped grid is voxel (11, 9) of the other
    for name, affine, flip in (("ras", ras_affine, lambda a: a), ("lps", lps_affine, lambda a: a[:, ::-1, ::-1])):
        case = {key: MetaTensor(torch.from_numpy(flip(a).copy()), affine=affine.clone(),
                                meta={"filename_or_obj": f"{name}.nii.gz"})
                for key, a in (("image", ras + 0.1), ("pred", seg), ("uncertainty", seg * 0.5))}
        before = {key: (t.clone(), len(t.applied_operations)) for key, t in case.items()}
        SaveOverlayd(tmp_path, uncertainty_key="uncertainty")(case)
        assert (tmp_path / f"{name}_overlay.png").is_file()
        for key, (values, ops) in before.items():
            assert torch.equal(case[key].as_tensor(), values.as_tensor()) and len(case[key].applied_operations) == ops
    (ras_image, ras_unc), (lps_image, lps_unc) = shown[0][:2], shown[1][:2]
    np.testing.assert_allclose(ras_image, lps_image)
    np.testing.assert_allclose(ras_unc, lps_unc)
    assert ras_unc.shape == (10, 12)  # rows: y (anterior first), columns: x (right first)
    rows, cols = np.nonzero(ras_unc)
    assert rows.max() < 5 and cols.max() < 6, (rows, cols)
