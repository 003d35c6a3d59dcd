"""Training-curve pictures: losses, and the validation metrics in a panel of their own."""

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
