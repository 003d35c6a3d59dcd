"""The training datasets' caches: the same samples as loading every case every epoch, and clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from monai.data import CacheDataset, MetaTensor, PersistentDataset

from medsegdiff_bundle.data import load_datalist, write_synthetic_dataset
from medsegdiff_bundle.data.cache import build_dataset, cached_bytes_per_case
from medsegdiff_bundle.data.transforms import AUGMENTATIONS, build_preprocessing


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_data")
    datalist = write_synthetic_dataset(root, 4, (40, 36), seed=3)
    return load_datalist(datalist, "training", root)


def _two_epochs(cases, cache: str, cache_dir=None, spatial_dims: int = 2, augmentation: str = "default") -> list[dict]:
    transform = build_preprocessing(spatial_dims, "train", [32, 32], 2, augmentation=augmentation)
    transform.set_random_state(seed=7)
    dataset = build_dataset(cases, transform, cache, cache_dir)
    return [dataset[i] for _ in range(2) for i in range(len(dataset))]


@pytest.mark.parametrize("cache, kind", [("memory", CacheDataset), ("disk", PersistentDataset)])
def test_a_cached_dataset_gives_the_samples_of_a_plain_one(cases, tmp_path, cache, kind):
    plain = _two_epochs(cases, "none")
    assert isinstance(build_dataset(cases, build_preprocessing(2, "train", [32, 32], 2), cache, tmp_path), kind)
    for run in range(2):  # the disk cache is written on the first run and read on the second
        with warnings.catch_warnings():
            # MONAI warns and recomputes when it cannot read a cache file
            warnings.filterwarnings("error", message="Corrupt cache file")
            cached = _two_epochs(cases, cache, tmp_path)
        for a, b in zip(plain, cached):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]), (cache, run)
            assert isinstance(b["image"], MetaTensor)
    # the augmentations still run every epoch on the cached cases
    assert not torch.equal(plain[0]["image"], plain[len(cases)]["image"])
    if cache == "disk":
        assert len(list(tmp_path.glob("*/*.pt"))) == len(cases)


def test_the_disk_cache_is_not_reused_after_the_pipeline_changes(cases, tmp_path):
    for size in ([32, 32], [24, 24]):
        dataset = build_dataset(cases, build_preprocessing(2, "train", size, 2), "disk", tmp_path)
        assert tuple(dataset[0]["image"].shape[1:]) == tuple(size)
    assert len(list(tmp_path.glob("*/*.pt"))) == 2  # the first case of each, in one folder per pipeline
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_every_augmentation_reads_the_one_disk_cache_and_gets_its_own_samples(cases, tmp_path):
    """The augmentation is all after the cached part, so it does not name the cache (a changed augmentation keeps
    it), and a cache written under one is never stale under another: each gets the samples it gets uncached."""
    for augmentation in AUGMENTATIONS:
        plain = _two_epochs(cases, "none", augmentation=augmentation)
        cached = _two_epochs(cases, "disk", tmp_path, augmentation=augmentation)
        for a, b in zip(plain, cached):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]), augmentation
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


def test_bad_cache_settings_are_named(cases):
    transform = build_preprocessing(2, "train", [32, 32], 2)
    with pytest.raises(ValueError, match="dataset_cache must be one of .* got 'ram'"):
        build_dataset(cases, transform, "ram")
    with pytest.raises(ValueError, match='"disk" needs a cache_dir'):
        build_dataset(cases, transform, "disk")


def test_cached_bytes_per_case_counts_float32_channels_and_the_label():
    assert cached_bytes_per_case([256, 256], 3) == 256 * 256 * 4 * 4
    assert cached_bytes_per_case([128, 128, 96], 4) == 128 * 128 * 96 * 5 * 4


@pytest.mark.parametrize("augmentation", ["default", "nnunet"])
def test_a_3d_disk_cache_keeps_the_resampled_volumes_and_their_meta(tmp_path, augmentation):
    """3D: orientation and resampling are cached (the expensive part), meta included, read back with
    ``weights_only=True``; the random crops still differ per read (also those "nnunet" resamples lazily from the
    cached volume)."""
    datalist = write_synthetic_dataset(tmp_path / "data", 2, (24, 20, 16), seed=4)
    cases = load_datalist(datalist, "training", tmp_path / "data")

    def reads(cache):
        transform = build_preprocessing(3, "train", [16, 16, 16], 2, normalization="zscore",
                                        target_spacing=[1.2, 1.2, 1.2], augmentation=augmentation)
        transform.set_random_state(seed=1)
        dataset = build_dataset(cases, transform, cache, tmp_path / "cache")
        return [dataset[i] for _ in range(2) for i in range(len(cases))]

    plain = reads("none")
    with warnings.catch_warnings():
        # MONAI warns and recomputes when it cannot read a cache file
        warnings.filterwarnings("error", message="Corrupt cache file")
        first, second = reads("disk"), reads("disk")
    for a, b, c in zip(plain, first, second):
        for key in ("image", "label"):
            sample_a = a[0][key] if isinstance(a, list) else a[key]  # RandCropByPosNegLabeld returns a list
            sample_b = b[0][key] if isinstance(b, list) else b[key]
            sample_c = c[0][key] if isinstance(c, list) else c[key]
            assert torch.equal(sample_a, sample_b) and torch.equal(sample_a, sample_c)
            assert isinstance(sample_c, MetaTensor) and sample_c.meta.get("filename_or_obj")


def test_auto_keeps_the_cases_in_memory_when_they_fit_and_on_disk_when_not(cases, tmp_path, monkeypatch, caplog):
    import medsegdiff_bundle.data.cache as cache_module

    transform = build_preprocessing(2, "train", [32, 32], 2)
    with caplog.at_level("INFO", logger="medsegdiff_bundle.data.cache"):
        assert isinstance(build_dataset(cases, transform, "auto", tmp_path), CacheDataset)
    assert "-> memory" in caplog.text and "4 cases x" in caplog.text
    # one cached case here: 3 image channels + the label at 32x32, float32
    per_case = 4 * 32 * 32 * 4
    monkeypatch.setattr(cache_module, "MEMORY_CACHE_GB", 4 * per_case / 1024**3)  # exactly fits
    assert cache_module.auto_cache(cases, transform, tmp_path) == "memory"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes on the machine share the budget
    assert cache_module.auto_cache(cases, transform, tmp_path) == "disk"
    assert isinstance(build_dataset(cases, transform, "auto", tmp_path), PersistentDataset)
    assert cache_module.auto_cache(cases, transform, None) == "none"
    assert cache_module.auto_cache([], transform, tmp_path) == "none"
