"""Dataset fingerprinting (medsegdiff_bundle.planning.fingerprint) on tiny generated data, plus the real data in
../shared/data when it is there."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsegdiff_bundle.data import write_synthetic_dataset
from medsegdiff_bundle.planning import extract_fingerprint, load_fingerprint, save_fingerprint

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KVASIR = SHARED_DATA / "Kvasir-SEG"
BRATS = SHARED_DATA / "BraTS2015-deepmedic-sample"


def _datalist(folder: Path, cases: list[dict], name: str = "datalist.json") -> Path:
    path = folder / name
    path.write_text(json.dumps({"training": cases}), encoding="utf-8")
    return path


def _nifti(path: Path, array: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else np.asarray(affine, float)), path)
    return path.name


def _png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return path.name


def _ct_case(rng: np.random.Generator, shape=(16, 16, 12)) -> tuple[np.ndarray, np.ndarray]:
    """Air (-1000 HU) around a body (soft tissue ~ 0 HU) with a bone block (1000 HU); the label is a cube of
    ~40 HU lesion inside the body. Foreground statistics must see only the lesion."""
    image = np.full(shape, -1000, np.int16)
    image[2:-2, 2:-2, 1:-1] = rng.normal(0, 10, (shape[0] - 4, shape[1] - 4, shape[2] - 2)).astype(np.int16)
    image[3:6, 3:6, 2:5] = 1000
    label = np.zeros(shape, np.uint8)
    label[7:12, 7:12, 4:9] = 1
    image[label > 0] = rng.normal(40, 3, int(label.sum())).astype(np.int16)
    return image, label


def test_ct_isotropic_volumes(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        image, label = _ct_case(rng)
        cases.append({"image": _nifti(tmp_path / f"ct{i}.nii.gz", image),
                      "label": _nifti(tmp_path / f"ct{i}_seg.nii.gz", label)})
    fp = extract_fingerprint(_datalist(tmp_path, cases), num_workers=2)
    assert fp["num_cases"] == 3 and fp["spatial_dims"] == 3 and fp["num_channels"] == 1
    assert fp["modality"] == ["CT"] and fp["modality_source"] == "inferred"
    assert fp["dtypes"] == ["int16"]
    assert fp["spacing"]["median"] == [1.0, 1.0, 1.0]
    assert fp["shape"]["median"] == [16, 16, 12]
    stats = fp["foreground_intensity"][0]
    # only the ~40 HU lesion: no air (-1000), body (~0) or bone (1000)
    assert 30 < stats["percentile_00_5"] < stats["median"] < stats["percentile_99_5"] < 50
    assert 38 < stats["mean"] < 42 and 1 < stats["std"] < 5
    assert stats["min"] > 25 and stats["max"] < 55
    assert stats["num_samples"] == 3 * 5 * 5 * 5
    assert fp["labels"] == [0, 1]
    np.testing.assert_allclose(fp["class_fractions"]["1"], 125 / (16 * 16 * 12))


def test_anisotropic_mr_spacing_in_ras_order(tmp_path):
    # stored axes (i, j, k) map to (z, x, y): i is the 5 mm axis; after Orientation("RAS") it must be the last one
    affine = [[0, 0.5, 0, 0], [0, 0, 0.5, 0], [5, 0, 0, 0], [0, 0, 0, 1]]
    rng = np.random.default_rng(1)
    cases = []
    for i in range(2):
        image = rng.uniform(100, 600, (6, 8, 10)).astype(np.float32)
        label = np.zeros((6, 8, 10), np.uint8)
        label[2:4, 2:6, 3:7] = 1
        cases.append({"image": _nifti(tmp_path / f"mr{i}.nii.gz", image, affine),
                      "label": _nifti(tmp_path / f"mr{i}_seg.nii.gz", label, affine)})
    fp = extract_fingerprint(_datalist(tmp_path, cases))
    assert fp["axis_order"] == "RAS"
    np.testing.assert_allclose(fp["spacing"]["median"], [0.5, 0.5, 5.0])
    assert fp["shape"]["median"] == [8, 10, 6]
    assert fp["modality"] == ["MR"]


def test_synthetic_2d_rgb(tmp_path):
    datalist = write_synthetic_dataset(tmp_path, 4, spatial_size=(32, 24), in_channels=3)
    fp = extract_fingerprint(datalist)
    assert fp["spatial_dims"] == 2 and fp["num_channels"] == 3
    assert fp["modality"] == ["RGB"] * 3 and fp["modality_source"] == "inferred"
    assert fp["spacing"]["median"] == [1.0, 1.0]
    # MONAI's PIL reader order (W, H): a 32-row, 24-column image is [24, 32]
    assert fp["shape"]["median"] == [24, 32] and fp["axis_order"] == "WH"
    assert fp["labels"] == [0, 1] and len(fp["foreground_intensity"]) == 3


def test_synthetic_grey_2d_and_multichannel_3d(tmp_path):
    fp2 = extract_fingerprint(write_synthetic_dataset(tmp_path / "2d", 2, spatial_size=(16, 16), in_channels=1))
    assert fp2["modality"] == ["grey"] and fp2["num_channels"] == 1
    fp3 = extract_fingerprint(write_synthetic_dataset(tmp_path / "3d", 2, spatial_size=(12, 12, 12), in_channels=2))
    assert fp3["spatial_dims"] == 3 and fp3["num_channels"] == 2 and fp3["modality"] == ["MR", "MR"]


def test_crop_to_nonzero_union_over_channels(tmp_path):
    # 2D: rows 5..14 and columns 3..22 are nonzero in a 20 x 30 picture -> MONAI (W, H): shape [30, 20], crop [20, 10]
    image = np.zeros((20, 30), np.uint8)
    image[5:15, 3:23] = 100
    label = np.zeros((20, 30), np.uint8)
    label[8:10, 8:10] = 1
    fp = extract_fingerprint(_datalist(tmp_path, [{"image": _png(tmp_path / "a.png", image),
                                                   "label": _png(tmp_path / "a_seg.png", label)}]))
    assert fp["shape"]["median"] == [30, 20]
    assert fp["shape_after_crop"]["median"] == [20, 10]

    # 3D, two channels nonzero in different boxes: the crop is their union; negative values count as nonzero
    c0, c1 = np.zeros((12, 12, 12), np.float32), np.zeros((12, 12, 12), np.float32)
    c0[2:5, 3:6, 4:8] = -2.0
    c1[6:9, 5:10, 5:7] = 3.0
    label = np.zeros((12, 12, 12), np.uint8)
    label[3, 4, 5] = 1
    case = {"image": [_nifti(tmp_path / "c0.nii.gz", c0), _nifti(tmp_path / "c1.nii.gz", c1)],
            "label": _nifti(tmp_path / "c_seg.nii.gz", label)}
    fp = extract_fingerprint(_datalist(tmp_path, [case], "d3.json"))
    assert fp["num_channels"] == 2
    assert fp["shape"]["median"] == [12, 12, 12]
    assert fp["shape_after_crop"]["median"] == [7, 7, 4]  # x 2..8, y 3..9, z 4..7


def test_class_fractions_on_hand_made_labels(tmp_path):
    image = np.ones((10, 10, 10), np.float32)
    l1 = np.zeros((10, 10, 10), np.uint8)
    l1[:1] = 1  # 100 voxels = 10 %
    l1[5, :5] = 2  # 50 voxels = 5 %
    l2 = np.zeros((10, 10, 10), np.uint8)
    l2[:2] = 1  # 20 %, no class 2
    cases = [{"image": _nifti(tmp_path / f"i{i}.nii.gz", image), "label": _nifti(tmp_path / f"l{i}.nii.gz", lab)}
             for i, lab in enumerate([l1, l2])]
    fp = extract_fingerprint(_datalist(tmp_path, cases))
    assert fp["labels"] == [0, 1, 2]
    np.testing.assert_allclose([fp["class_fractions"][k] for k in "012"], [0.825, 0.15, 0.025])
    assert fp["cases"][0]["class_fractions"] == pytest.approx({"0": 0.85, "1": 0.10, "2": 0.05})
    assert fp["cases"][1]["class_fractions"] == pytest.approx({"0": 0.80, "1": 0.20})


def test_no_foreground_samples_the_whole_image(tmp_path):
    image = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    case = {"image": _nifti(tmp_path / "i.nii.gz", image),
            "label": _nifti(tmp_path / "l.nii.gz", np.zeros((3, 4, 5), np.uint8))}
    fp = extract_fingerprint(_datalist(tmp_path, [case]))
    assert fp["cases"][0]["samples_from"] == "image"
    stats = fp["foreground_intensity"][0]
    assert stats["num_samples"] == 60 and stats["min"] == 0 and stats["max"] == 59
    # and the cap: at most max_foreground_samples per case
    fp = extract_fingerprint(_datalist(tmp_path, [case]), max_foreground_samples=7)
    assert fp["foreground_intensity"][0]["num_samples"] == 7


def test_mixed_2d_and_3d_is_an_error(tmp_path):
    cases = [
        {"image": _png(tmp_path / "flat.png", np.full((8, 8), 5, np.uint8)),
         "label": _png(tmp_path / "flat_seg.png", np.zeros((8, 8), np.uint8))},
        {"image": _nifti(tmp_path / "vol.nii.gz", np.ones((8, 8, 8), np.float32)),
         "label": _nifti(tmp_path / "vol_seg.nii.gz", np.zeros((8, 8, 8), np.uint8))},
    ]
    with pytest.raises(ValueError, match=r"mixed dimensionality.*case vol is 3D"):
        extract_fingerprint(_datalist(tmp_path, cases))


def test_inconsistent_channels_is_an_error(tmp_path):
    cases = []
    for i in range(2):
        cases.append({"image": _png(tmp_path / f"rgb{i}.png", np.full((8, 8, 3), 50, np.uint8)),
                      "label": _png(tmp_path / f"rgb{i}_seg.png", np.zeros((8, 8), np.uint8))})
    cases.append({"image": _png(tmp_path / "grey.png", np.full((8, 8), 50, np.uint8)),
                  "label": _png(tmp_path / "grey_seg.png", np.zeros((8, 8), np.uint8))})
    with pytest.raises(ValueError, match=r"different numbers of channels.*1 channel\(s\): grey"):
        extract_fingerprint(_datalist(tmp_path, cases))


@pytest.mark.parametrize("labels", [{"background": 0, "tumour": 1}, {"0": "background", "1": "tumour"}])
def test_label_outside_dataset_json_labels(tmp_path, labels):
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels}))
    cases = []
    for i, top in enumerate([1, 2, 1]):
        lab = np.zeros((6, 6, 6), np.uint8)
        lab[1:3, 1:3, 1:3] = top
        cases.append({"image": _nifti(tmp_path / f"img{i}.nii.gz", np.ones((6, 6, 6), np.float32)),
                      "label": _nifti(tmp_path / f"lab{i}.nii.gz", lab)})
    expected = r"(?s)1 of 3 cases.*img1: label values \[2\] are not among the labels \[0, 1\]"
    with pytest.raises(ValueError, match=expected):
        extract_fingerprint(_datalist(tmp_path, cases))
    fp = extract_fingerprint(_datalist(tmp_path, [cases[0], cases[2]]))
    assert fp["modality"] == ["CT"] and fp["modality_source"] == "dataset.json"
    assert fp["dataset_json"] == str((tmp_path / "dataset.json").resolve())
    fp = extract_fingerprint(_datalist(tmp_path, [cases[0]]), modality=["noct"])
    assert fp["modality"] == ["noct"] and fp["modality_source"] == "argument"
    with pytest.raises(ValueError, match="names 2 channel"):
        extract_fingerprint(_datalist(tmp_path, [cases[0]]), modality=["a", "b"])


def test_non_integer_label_is_an_error_naming_the_case(tmp_path):
    lab = np.zeros((5, 5, 5), np.float32)
    lab[2, 2, 2] = 0.5
    case = {"image": _nifti(tmp_path / "soft.nii.gz", np.ones((5, 5, 5), np.float32)),
            "label": _nifti(tmp_path / "soft_seg.nii.gz", lab)}
    with pytest.raises(ValueError, match=r"soft: label has non-integer values"):
        extract_fingerprint(_datalist(tmp_path, [case]))


def test_missing_file_is_reported_by_name(tmp_path):
    case = {"image": "absent.nii.gz", "label": "absent_seg.nii.gz"}
    with pytest.raises(ValueError, match=r"absent: image file\(s\) do not exist"):
        extract_fingerprint(_datalist(tmp_path, [case]))


def test_label_threshold_binarises_0_255_masks(tmp_path):
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :3] = 255
    mask[:, 3] = 250  # JPEG-like ringing around the edge
    mask[:, 4] = 3
    image = np.full((10, 10, 3), 120, np.uint8)
    case = {"image": _png(tmp_path / "polyp.png", image), "label": _png(tmp_path / "polyp_mask.png", mask)}
    raw = extract_fingerprint(_datalist(tmp_path, [case]))
    assert raw["labels"] == [0, 3, 250, 255]
    fp = extract_fingerprint(_datalist(tmp_path, [case]), label_threshold=127)
    assert fp["labels"] == [0, 1] and fp["label_threshold"] == 127
    assert fp["class_fractions"] == pytest.approx({"0": 0.6, "1": 0.4})


def test_deterministic_and_independent_of_workers(tmp_path):
    datalist = write_synthetic_dataset(tmp_path, 5, spatial_size=(24, 24), in_channels=3, seed=3)
    a = extract_fingerprint(datalist, num_workers=1, max_foreground_samples=50)
    b = extract_fingerprint(datalist, num_workers=3, max_foreground_samples=50)
    a.pop("created"), b.pop("created")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = extract_fingerprint(datalist, num_workers=1, max_foreground_samples=50, seed=1)
    assert c["foreground_intensity"] != a["foreground_intensity"]  # the seed does pick the samples


def test_save_load_round_trip(tmp_path):
    datalist = write_synthetic_dataset(tmp_path / "data", 3, spatial_size=(12, 12, 12), in_channels=2)
    fp = extract_fingerprint(datalist)
    path = save_fingerprint(fp, tmp_path / "plan")
    assert path == tmp_path / "plan" / "fingerprint.json"
    assert load_fingerprint(path) == json.loads(json.dumps(fp))
    assert load_fingerprint(tmp_path / "plan")["num_cases"] == 3
    table = pd.read_csv(tmp_path / "plan" / "fingerprint_cases.csv")
    assert list(table["case"]) == [c["case"] for c in fp["cases"]] and len(table) == 3
    for col in ("spacing_2", "shape_0", "shape_after_crop_2", "fraction_0", "fraction_1", "foreground_mean_1"):
        assert col in table.columns
    assert not list((tmp_path / "plan").glob("*.tmp"))  # no leftovers of the atomic writes
    (tmp_path / "bad.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="version"):
        load_fingerprint(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_fingerprint(tmp_path / "nowhere.json")


@pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason="Kvasir-SEG not in ../shared/data")
def test_kvasir_fingerprint(tmp_path):
    images = sorted((KVASIR / "images").glob("*.jpg"))[:20]
    cases = [{"image": str(p), "label": str(KVASIR / "masks" / p.name)} for p in images]
    fp = extract_fingerprint(_datalist(tmp_path, cases), label_threshold=127, num_workers=4)
    assert fp["num_cases"] == 20 and fp["spatial_dims"] == 2 and fp["num_channels"] == 3
    assert fp["modality"] == ["RGB"] * 3 and fp["dtypes"] == ["uint8"]
    assert fp["labels"] == [0, 1] and 0.02 < fp["class_fractions"]["1"] < 0.5
    for stats in fp["foreground_intensity"]:
        assert 0 <= stats["percentile_00_5"] < stats["median"] < stats["percentile_99_5"] <= 255


@pytest.mark.skipif(not BRATS.is_dir(), reason="BraTS sample not in ../shared/data")
def test_brats_fingerprint(tmp_path):
    cases = []
    for folder in sorted(BRATS.glob("*/brats_*")):
        modalities = [str(folder / "Flair_subtrMeanDivStd.nii.gz"), str(folder / "T1c_subtrMeanDivStd.nii.gz")]
        cases.append({"image": modalities, "label": str(folder / "OTMultiClass.nii.gz")})
    assert len(cases) == 2
    fp = extract_fingerprint(_datalist(tmp_path, cases))
    assert fp["spatial_dims"] == 3 and fp["num_channels"] == 2 and fp["modality"] == ["MR", "MR"]
    assert fp["labels"] == [0, 1, 2, 3, 4]
    assert fp["spacing"]["median"] == [1.0, 1.0, 1.0]
    assert fp["shape"]["median"] == [240, 240, 155]
    assert len({c["case"] for c in fp["cases"]}) == 2  # same file names in two folders: told apart by the folder
