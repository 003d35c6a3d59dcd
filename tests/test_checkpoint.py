"""Tests for ``medsegdiff_bundle.engine.checkpoint``."""

import pickle
import re

import pytest
import torch

from medsegdiff_bundle.engine.checkpoint import atomic_save, load_checkpoint


def _state():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    return {"model": model.state_dict(), "epoch": 7, "best_dice": 0.81, "history": [0.5, 0.7]}


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (a["epoch"], a["best_dice"], a["history"]) == (b["epoch"], b["best_dice"], b["history"])


def test_round_trip_state_dict(tmp_path):
    """Saved tensors and plain values come back equal; missing parent folders are created; no temp files remain."""
    state = _state()
    path = tmp_path / "runs" / "fold0" / "best.pt"
    assert atomic_save(state, path) == path
    _assert_state_equal(load_checkpoint(path), state)
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]


def test_overwrite_replaces_previous_checkpoint(tmp_path):
    """Saving to an existing path replaces its content."""
    path = tmp_path / "last.pt"
    atomic_save({"w": torch.zeros(3)}, path)
    atomic_save({"w": torch.ones(3)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, error):
    """A save that dies after writing part of the file (error or Ctrl-C) leaves the old checkpoint untouched."""
    path = tmp_path / "last.pt"
    atomic_save({"w": torch.arange(4.0)}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(error)):
        atomic_save({"w": torch.zeros(4)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_missing_path_names_it(tmp_path):
    """A missing checkpoint raises FileNotFoundError with the path in the message."""
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_checkpoint(missing)


def test_load_rejects_directory(tmp_path):
    """A directory is not a checkpoint file."""
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)


class _Payload:
    """An arbitrary picklable object: weights_only loading must not instantiate it."""


def test_load_refuses_arbitrary_pickled_objects(tmp_path):
    """Loading is weights_only: a checkpoint holding an arbitrary class is refused."""
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
