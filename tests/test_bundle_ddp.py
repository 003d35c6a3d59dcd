"""Multi-process training through ``bundle/configs/multi_gpu_train.json`` (DDP, gloo on CPU) under torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from medsegdiff_bundle.data import load_datalist, select_fold, write_synthetic_dataset
from medsegdiff_bundle.engine import latest_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
WORLD = 2
BATCH = 4

# Test-only layer over train.json + multi_gpu_train.json ("+" appends to the list it names): every rank saves its
# weights right after DDP has wrapped (and broadcast) the network, and again after training, together with the
# training sampler's epoch and the size of the (all-gathered) validation metric buffer.
PROBE = {
    "+initialize": [
        "$torch.save(medsegdiff_bundle.engine.unwrap_model(@network).state_dict(), @bundle_root + '/init%d.pt' % dist.get_rank())",
    ],
    "+run": [
        "$torch.save({'weights': medsegdiff_bundle.engine.unwrap_model(@network).state_dict(), 'sampler_epoch': @train#sampler.epoch, "
        "'val_local': len(@validate#sampler), 'val_gathered': len(@validate#evaluator.state.metric_details['val_mean_dice']), "
        "'val_dice': @validate#evaluator.state.metrics['val_mean_dice'], 'world': dist.get_world_size()}, "
        "@bundle_root + '/rank%d.pt' % dist.get_rank())",
    ],
}


def _torchrun(root: Path, probe: Path, *extra: str) -> subprocess.CompletedProcess:
    configs = [str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json"), str(probe)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        "-m", "monai.bundle", "run",
        "--config_file", json.dumps(configs),
        "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(root),
        "--max_epochs", "2", "--val_interval", "1", "--channels", "[8,16,32]", "--patch_size", "[32,32]",
        "--batch_size", str(BATCH), "--num_workers", "0", "--val_steps", "3", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=300, env=env)


@pytest.mark.parametrize("warmup", ["0.0", "0.5"], ids=["joint", "condition-warm-up"])
def test_two_process_training_keeps_ranks_in_sync_and_shards_the_data(tmp_path, warmup):
    """With ``condition_warmup 0.5`` the first epoch trains the condition UNet outside DDP's forward, its gradients
    averaged by the iteration: the ranks must stay identical through it and through the joint epoch after it."""
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(PROBE), encoding="utf-8")
    root = tmp_path / "bundle"
    out = _torchrun(root, probe, "--condition_warmup", warmup)
    assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-8000:])

    # rank 0 wrote the synthetic data once, and the checkpoints
    ckpt_path = latest_checkpoint(root / "models")
    assert ckpt_path is not None and (root / "models" / "model.pt").is_file()
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert all(not k.startswith("module.") for k in ckpt["model"])  # DDP unwrapped: loadable by single-process configs
    best = torch.load(root / "models" / "model.pt", weights_only=True)
    assert "diffusion_unet.stem.weight" in best

    # each rank sees half the training data: the epoch is half as long as a single-process one
    cases = load_datalist(str(root / "data" / "datalist.json"), "training", str(root / "data"))
    n_train = len(select_fold(cases, 0, validation=False))
    n_val = len(select_fold(cases, 0, validation=True))
    epoch_length = math.ceil(math.ceil(n_train / WORLD) / BATCH)
    assert epoch_length < math.ceil(n_train / BATCH)
    assert ckpt["trainer"]["epoch_length"] == epoch_length
    assert ckpt["trainer"]["iteration"] == 2 * epoch_length
    log = pd.read_csv(root / "eval" / "training_log.csv")  # rank 0 only (rank 1 must not clobber it)
    assert log.groupby("epoch").size().tolist() == [epoch_length, epoch_length]
    assert len(pd.read_csv(root / "eval" / "validation_log.csv")) == 2
    warmed = warmup != "0.0"
    assert ckpt["condition_warmup"] == {"ended": warmed}
    assert log.loc[log["epoch"] == 1, "diffusion_loss"].isna().all() == warmed  # epoch 1 was the warm-up

    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    inits = [torch.load(root / f"init{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, probe_r in enumerate(ranks):
        assert probe_r["world"] == WORLD
        assert probe_r["sampler_epoch"] == 2, "DistributedSampler.set_epoch was not called every epoch"
        # validation is sharded, and the Dice buffer is all-gathered: every rank scores all validation cases
        assert probe_r["val_local"] == len(range(r, n_val, WORLD))
        assert probe_r["val_gathered"] == n_val
    assert ranks[0]["val_dice"] == ranks[1]["val_dice"]

    # DDP broadcast the initial weights and all-reduced the gradients: identical weights, and they did train
    w0, w1, init = ranks[0]["weights"], ranks[1]["weights"], inits[0]
    assert w0.keys() == w1.keys() == init.keys() == inits[1].keys()
    for key in w0:
        assert torch.equal(inits[0][key], inits[1][key]), key
        assert torch.equal(w0[key], w1[key]), key
    assert any(not torch.equal(w0[k], init[k]) for k in w0 if w0[k].is_floating_point())
    assert torch.equal(ckpt["model"]["diffusion_unet.stem.weight"], w0["diffusion_unet.stem.weight"])


def test_multi_gpu_fixed_length_epochs_draw_that_many_batches_per_process(tmp_path):
    """--iterations_per_epoch with multi_gpu_train.json: each process draws iterations_per_epoch batches (with
    replacement, seeded per epoch); without it the usual DistributedSampler shards one pass. A one-process gloo group
    stands in for torchrun (the two-process run above covers the default)."""
    import torch.distributed as dist
    from monai.bundle import ConfigParser
    from monai.data import DistributedSampler, DistributedWeightedRandomSampler

    write_synthetic_dataset(tmp_path / "data", 6, (32, 32), seed=5)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        samplers = {}
        for ipe in (None, 7):
            parser = ConfigParser()
            parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
            parser.update({"bundle_root": str(tmp_path), "batch_size": BATCH, "iterations_per_epoch": ipe,
                           "patch_size": [32, 32], "channels": [8, 16, 32]})
            samplers[ipe] = parser.get_parsed_content("train#dataloader").sampler
        assert type(samplers[None]) is DistributedSampler
        fixed = samplers[7]
        assert isinstance(fixed, DistributedWeightedRandomSampler) and len(fixed) == 7 * BATCH
        fixed.set_epoch(1)
        torch.manual_seed(11)  # what EpochSeedHandler does at every epoch start
        first = list(fixed)
        torch.manual_seed(11)
        assert list(fixed) == first and len(first) == 7 * BATCH  # the same epoch draws the same cases
    finally:
        dist.destroy_process_group()
