"""LoopTimingHandler: the training loop's images per second and its wait for the data loader, per epoch."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from ignite.engine import Engine

from medsegdiff_bundle.engine import LoopTimingHandler


def _run(tmp_path, load_s: float, step_s: float, epochs: int = 2, batches: int = 4, batch: int = 3) -> pd.DataFrame:
    """An ignite loop whose loader takes ``load_s`` per batch and whose step takes ``step_s``."""
    def loader():
        for _ in range(batches):
            time.sleep(load_s)
            yield {"image": torch.zeros(batch, 1, 4, 4), "label": torch.zeros(batch, 1, 4, 4)}

    class Reiterable:
        def __iter__(self):
            return loader()

        def __len__(self):
            return batches

    engine = Engine(lambda e, b: time.sleep(step_s))
    LoopTimingHandler(tmp_path).attach(engine)
    engine.run(Reiterable(), max_epochs=epochs)
    return pd.read_csv(tmp_path / "loop_timing.csv")


def test_a_loader_bound_loop_shows_its_wait_and_a_compute_bound_one_does_not(tmp_path):
    slow_loader = _run(tmp_path / "a", load_s=0.05, step_s=0.005)
    assert slow_loader["epoch"].tolist() == [1, 2]
    assert slow_loader["iterations"].tolist() == [4, 4] and slow_loader["images"].tolist() == [12, 12]
    assert (slow_loader["data_wait_fraction"] > 0.7).all(), slow_loader
    assert (slow_loader["data_wait_seconds"] >= 4 * 0.05 * 0.9).all()
    slow_step = _run(tmp_path / "b", load_s=0.0, step_s=0.05)
    assert (slow_step["data_wait_fraction"] < 0.2).all(), slow_step
    # images per second is images over the epoch's wall time, which the sleeps bound from below
    assert (slow_step["images_per_s"] <= 12 / (4 * 0.05)).all()
    rate = (slow_step["images"] / slow_step["seconds"]).to_numpy()
    assert slow_step["images_per_s"].to_numpy() == pytest.approx(rate)


def test_a_resumed_run_appends_its_epochs_and_replaces_one_the_checkpoint_did_not_keep(tmp_path):
    def epoch(handler: LoopTimingHandler, n: int, images: int) -> None:
        engine = SimpleNamespace(state=SimpleNamespace(epoch=n, batch={"image": torch.zeros(images, 2)}))
        handler.epoch_started(engine)
        handler.batch_started(engine)
        handler.batch_completed(engine)
        handler.epoch_completed(engine)

    first = LoopTimingHandler(tmp_path)
    for n in (1, 2, 3):
        epoch(first, n, images=4)
    # killed after epoch 3's row but before its checkpoint: the resumed run starts at epoch 3 again
    resumed = LoopTimingHandler(tmp_path)
    for n in (3, 4):
        epoch(resumed, n, images=5)
    log = pd.read_csv(tmp_path / "loop_timing.csv")
    assert log["epoch"].tolist() == [1, 2, 3, 4] and log["images"].tolist() == [4, 4, 5, 5]
    assert not (tmp_path / "loop_timing.csv.part").exists()


@pytest.mark.parametrize("batch, expected", [
    ({"image": torch.zeros(7, 3, 8, 8), "label": torch.zeros(7, 1, 8, 8)}, 7),
    ([torch.zeros(2, 1), torch.zeros(2)], 2),
    ({"meta": {"case": ["a", "b"]}, "image": [torch.zeros(5, 3)]}, 5),
    ({"names": ["a"]}, 0),
])
def test_batch_size_of_collated_batches(batch, expected):
    from medsegdiff_bundle.engine.handlers import _batch_size

    assert _batch_size(batch) == expected
