"""Tests for ``medsegdiff_bundle.data.converters`` and the shipped ``datasets_json/`` files.

Every dataset family gets a tiny FAKE raw layout with the official names (8x8 images, 4x4x4 NIfTI) in tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsegdiff_bundle.data import load_datalist, validate_cases
from medsegdiff_bundle.data.converters import assign_folds, convert, list_datasets

REPO = Path(__file__).resolve().parents[1]
DATASETS_JSON = REPO / "datasets_json"
SHARED_KVASIR = REPO.parent / "shared" / "data" / "Kvasir-SEG"
MSD_KEYS = [
    "msd_task01_braintumour", "msd_task02_heart", "msd_task03_liver", "msd_task04_hippocampus", "msd_task05_prostate",
    "msd_task06_lung", "msd_task07_pancreas", "msd_task08_hepaticvessel", "msd_task09_spleen", "msd_task10_colon",
]  # fmt: skip
SHIPPED = ["kvasir_seg", "isic2018", "refuge2", "brats2021", "amos22", "btcv", *MSD_KEYS]
DATASET_JSON_KEYS = ("channel_names", "labels", "numTraining", "file_ending", "name", "reference", "licence",
                     "description")  # fmt: skip


# ------------------------------------------------------------------------------------------------ file helpers
def _image(path: Path, mode: str = "RGB", value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (8, 8, 3) if mode == "RGB" else (8, 8)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


def _nii(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, dtype=np.uint8), np.eye(4)), str(path))


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _assert_balanced(entries: list[dict], num_folds: int = 5) -> None:
    counts = Counter(e["fold"] for e in entries)
    assert set(counts) == set(range(min(num_folds, len(entries))))
    assert max(counts.values()) - min(counts.values()) <= 1


def _paths(entry: dict) -> list[str]:
    images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
    return images + ([entry["label"]] if "label" in entry else [])


def _assert_relative_and_existing(datalist: Path) -> None:
    data = _read(datalist)
    for split in ("training", "validation", "testing"):
        for entry in data.get(split, []):
            for p in _paths(entry):
                assert not os.path.isabs(p), p
                assert (datalist.parent / p).is_file(), p


def _assert_dataset_json(path: Path) -> dict:
    data = _read(path)
    missing = [k for k in DATASET_JSON_KEYS if k not in data]
    assert not missing, f"{path} lacks {missing}"
    assert data["labels"]["background"] == 0
    assert sorted(data["labels"].values()) == list(range(len(data["labels"])))  # contiguous classes
    assert all(k.isdigit() for k in data["channel_names"])
    return data


# ----------------------------------------------------------------------------------------------- fake releases
def _kvasir(root: Path, n: int = 12) -> Path:
    for i in range(n):
        _image(root / "Kvasir-SEG" / "images" / f"cju{i:03d}.jpg")
        _image(root / "Kvasir-SEG" / "masks" / f"cju{i:03d}.jpg", "L", 255)
    (root / "Kvasir-SEG" / "kavsir_bboxes.json").write_text("{}")
    return root


def _isic(root: Path) -> Path:
    splits = {"Training": (7, True), "Validation": (2, True), "Test": (3, False)}
    for split, (n, with_gt) in splits.items():
        input_dir = root / f"ISIC2018_Task1-2_{split}_Input"
        if split == "Test":  # some unzip tools nest the zip's folder inside a folder of the same name
            input_dir = input_dir / input_dir.name
        for i in range(n):
            case = f"ISIC_{split[0]}{i:06d}"
            _image(input_dir / f"{case}.jpg")
            if with_gt:
                _image(root / f"ISIC2018_Task1_{split}_GroundTruth" / f"{case}_segmentation.png", "L", 255)
        (input_dir / "LICENSE.txt").write_text("licence")
        (input_dir / "ATTRIBUTION.txt").write_text("attribution")
    return root


def _brats(root: Path, n_train: int = 6, n_val: int = 2) -> Path:
    for folder, n, seg in (("RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021", n_train, True),
                           ("RSNA_ASNR_MICCAI_BraTS2021_ValidationData", n_val, False)):  # fmt: skip
        for i in range(n):
            case = f"BraTS2021_{i + (0 if seg else 1000):05d}"
            for suffix in ("flair", "t1", "t1ce", "t2", *(("seg",) if seg else ())):
                _nii(root / folder / case / f"{case}_{suffix}.nii.gz", 4 if suffix == "seg" else 0)
    return root


def _msd(root: Path, task: str = "Task04_Hippocampus", n_train: int = 6, n_test: int = 2) -> Path:
    task_dir = root / task
    prefix = task.split("_", 1)[1].lower()
    train = [f"{prefix}_{i:03d}" for i in range(1, n_train + 1)]
    test = [f"{prefix}_{i:03d}" for i in range(100, 100 + n_test)]
    for case in train:
        _nii(task_dir / "imagesTr" / f"{case}.nii.gz")
        _nii(task_dir / "labelsTr" / f"{case}.nii.gz", 1)
        (task_dir / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"AppleDouble")  # shipped inside the MSD tars
    for case in test:
        _nii(task_dir / "imagesTs" / f"{case}.nii.gz")
    own = {
        "name": "Hippocampus", "description": "Left and right hippocampus segmentation",
        "reference": "Vanderbilt University Medical Center", "licence": "CC-BY-SA 4.0", "relase": "1.0 04/05/2018",
        "tensorImageSize": "3D", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": n_train, "numTest": n_test,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test],
    }  # fmt: skip
    (task_dir / "dataset.json").write_text(json.dumps(own))
    return task_dir


# -------------------------------------------------------------------------------------------------- registry/folds
def test_list_datasets_names_every_converter():
    names = list_datasets()
    assert set(SHIPPED) <= set(names) and "msd" in names
    assert all(isinstance(d, str) and d and "\n" not in d for d in names.values())


def test_assign_folds_is_deterministic_balanced_and_order_free():
    ids = [f"case_{i:03d}" for i in range(23)]
    folds = assign_folds(ids)
    assert folds == assign_folds(list(reversed(ids)))  # file-system order does not matter
    counts = Counter(folds.values())
    assert set(counts) == set(range(5)) and max(counts.values()) - min(counts.values()) <= 1
    assert folds != assign_folds(ids, seed=1)
    assert set(assign_folds(ids, num_folds=3).values()) == {0, 1, 2}
    with pytest.raises(ValueError, match="duplicate case ids: case_000"):
        assign_folds(["case_000", "case_000"])


# ----------------------------------------------------------------------------------------------------- Kvasir
def test_kvasir_seg(tmp_path):
    src = _kvasir(tmp_path / "download")  # the folder above Kvasir-SEG/ is accepted too
    datalist = convert("kvasir_seg", src, tmp_path / "out")
    assert datalist == tmp_path / "out" / "datalist.json"
    data = _read(datalist)
    assert data["numTraining"] == 12 and len(data["training"]) == 12
    assert data["label_threshold"] == 127 and "validation" not in data and "testing" not in data
    _assert_balanced(data["training"])
    _assert_relative_and_existing(datalist)
    first = data["training"][0]
    assert first == {"image": "../download/Kvasir-SEG/images/cju000.jpg",
                     "label": "../download/Kvasir-SEG/masks/cju000.jpg", "fold": first["fold"]}  # fmt: skip
    meta = _assert_dataset_json(tmp_path / "out" / "dataset.json")
    assert meta["labels"] == {"background": 0, "polyp": 1} and meta["file_ending"] == ".jpg"
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"} and meta["label_threshold"] == 127
    items = load_datalist(datalist)
    assert len(items) == 12 and all(os.path.isabs(i["image"]) for i in items)
    assert len(validate_cases(items)) == 12  # headers readable, image and mask sizes match


def test_kvasir_errors_name_what_is_missing(tmp_path):
    src = _kvasir(tmp_path / "a", n=3)
    (src / "Kvasir-SEG" / "masks" / "cju001.jpg").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) without a mask: .*cju001\.jpg"):
        convert("kvasir_seg", src, tmp_path / "out")

    no_masks = tmp_path / "b"
    _image(no_masks / "images" / "x.jpg")
    with pytest.raises(FileNotFoundError, match=r"Missing in .*: masks\. Found: images/"):
        convert("kvasir_seg", no_masks, tmp_path / "out")

    empty = tmp_path / "c"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(ValueError, match="no training case found"):
        convert("kvasir_seg", empty, tmp_path / "out")


def test_convert_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'kvasir'; known datasets: kvasir_seg, isic2018"):
        convert("kvasir", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert("kvasir_seg", tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ValueError, match="not both"):
        convert("kvasir_seg", tmp_path, tmp_path / "out", copy=True, link=True)


# ------------------------------------------------------------------------------------------------------- ISIC
def test_isic2018_training_validation_testing(tmp_path):
    src = _isic(tmp_path / "isic")
    datalist = convert("isic2018", src, tmp_path / "out")
    data = _read(datalist)
    assert (data["numTraining"], data["numValidation"], data["numTest"]) == (7, 2, 3)
    _assert_balanced(data["training"])
    _assert_relative_and_existing(datalist)
    assert all("label" in e and e["label"].endswith("_segmentation.png") for e in data["validation"])
    assert all("label" not in e and "fold" not in e for e in data["testing"])  # no Test GroundTruth folder here
    nested = "ISIC2018_Task1-2_Test_Input/ISIC2018_Task1-2_Test_Input/ISIC_T000000.jpg"
    assert data["testing"][0]["image"].endswith(nested)
    meta = _assert_dataset_json(tmp_path / "out" / "dataset.json")
    assert meta["label_file_ending"] == ".png" and meta["label_threshold"] == 127
    assert len(load_datalist(datalist, "testing")) == 3 and len(load_datalist(datalist, "validation")) == 2


def test_isic2018_missing_ground_truth_is_named(tmp_path):
    _image(tmp_path / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg")
    with pytest.raises(FileNotFoundError, match="ISIC2018_Task1_Training_GroundTruth"):
        convert("isic2018", tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- REFUGE2
@pytest.mark.parametrize("split_names, image_dir, mask_dir", [
    (("Train", "Validation", "Test"), "Images", "Disc_Cup_Masks"),
    (("train", "val", "test"), "images", "mask"),
])  # fmt: skip
def test_refuge2_layout_variants(tmp_path, split_names, image_dir, mask_dir):
    root = tmp_path / "REFUGE2"
    for split, n in zip(split_names, (6, 2, 2)):
        for i in range(n):
            sub = ("Glaucoma" if i % 2 else "Non-Glaucoma") if split == "Train" else ""  # REFUGE1-style sub-folders
            case = f"{split[0].lower()}{i:04d}"
            _image(root / split / image_dir / sub / f"{case}.jpg")
            _image(root / split / mask_dir / sub / f"{case}.bmp", "L", 128)
    datalist = convert("refuge2", tmp_path, tmp_path / "out")
    data = _read(datalist)
    assert (data["numTraining"], data["numValidation"], data["numTest"]) == (6, 2, 2)
    _assert_balanced(data["training"])
    _assert_relative_and_existing(datalist)
    assert data["label_mapping"] == {"255": 0, "128": 1, "0": 2}
    meta = _assert_dataset_json(tmp_path / "out" / "dataset.json")
    assert meta["labels"] == {"background": 0, "optic_disc": 1, "optic_cup": 2}
    assert meta["label_mapping"] == data["label_mapping"] and meta["label_file_ending"] == ".bmp"


def test_refuge2_unknown_layout_lists_accepted_names(tmp_path):
    _image(tmp_path / "fundus" / "a.jpg")
    with pytest.raises(FileNotFoundError, match=r"train\|training\|training400.*Found: fundus/"):
        convert("refuge2", tmp_path, tmp_path / "out")
    _image(tmp_path / "train" / "images" / "a.jpg")
    with pytest.raises(FileNotFoundError, match=r"has no mask folder \(masks\|mask\|disc_cup_masks"):
        convert("refuge2", tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------------- BraTS 2021
def test_brats2021_multimodal_order_mapping_and_copy(tmp_path):
    src = _brats(tmp_path / "raw")
    datalist = convert("brats2021", src, tmp_path / "out")
    data = _read(datalist)
    assert data["numTraining"] == 6 and data["numValidation"] == 2
    _assert_balanced(data["training"])
    _assert_relative_and_existing(datalist)
    first = data["training"][0]
    order = ("t1", "t1ce", "t2", "flair")
    assert [Path(p).name for p in first["image"]] == [f"BraTS2021_00000_{m}.nii.gz" for m in order]
    assert first["label"].endswith("BraTS2021_00000_seg.nii.gz")
    assert data["label_mapping"] == {"4": 3} and data["image_files_order"] == ["_t1", "_t1ce", "_t2", "_flair"]
    assert all("label" not in e and len(e["image"]) == 4 for e in data["validation"])
    meta = _assert_dataset_json(tmp_path / "out" / "dataset.json")
    assert meta["label_mapping"] == {"4": 3}
    assert meta["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    items = load_datalist(datalist)
    assert isinstance(items[0]["image"], list) and all(os.path.isabs(p) for p in items[0]["image"])

    copied = convert("brats2021", src, tmp_path / "copied", copy=True)
    data = _read(copied)
    assert data["training"][0]["image"] == [f"imagesTr/BraTS2021_00000_{i:04d}.nii.gz" for i in range(4)]
    assert data["training"][0]["label"] == "labelsTr/BraTS2021_00000.nii.gz"
    assert data["validation"][0]["image"][0] == "imagesVa/BraTS2021_01000_0000.nii.gz"
    assert not (tmp_path / "copied" / "imagesTr" / "BraTS2021_00000_0000.nii.gz").is_symlink()
    _assert_relative_and_existing(copied)
    assert len(validate_cases(load_datalist(copied))) == 6


def test_brats2021_incomplete_cases_are_named(tmp_path):
    src = _brats(tmp_path / "raw", n_train=2, n_val=0)
    case = src / "RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021" / "BraTS2021_00001"
    (case / "BraTS2021_00001_t1ce.nii.gz").unlink()
    (case.parent / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"2 incomplete case\(s\).*BraTS2021_00000_seg\.nii\.gz \(image without mask\)"
                                         r".*missing BraTS2021_00001_t1ce\.nii\.gz"):  # fmt: skip
        convert("brats2021", src, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"BraTS2021_00000_\{t1,t1ce,t2,flair,seg\}\.nii\.gz"):
        convert("brats2021", empty, tmp_path / "out")


# ------------------------------------------------------------------------------------------------------ AMOS22
def _amos(root: Path, own_json: bool) -> Path:
    amos = root / "amos22"
    for images, labels, ids in (("imagesTr", "labelsTr", (1, 5, 7, 507, 508, 9)), ("imagesVa", "labelsVa", (2, 600)),
                                ("imagesTs", None, (3, 4))):  # fmt: skip
        for i in ids:
            _nii(amos / images / f"amos_{i:04d}.nii.gz")
            if labels:
                _nii(amos / labels / f"amos_{i:04d}.nii.gz", 1)
    if own_json:
        labels = {str(i): f"organ {i}" for i in range(16)} | {"0": "background"}
        (amos / "dataset.json").write_text(json.dumps({"name": "AMOS", "labels": labels}))
    return root


def test_amos22_splits_modality_and_own_labels(tmp_path):
    datalist = convert("amos22", _amos(tmp_path / "raw", own_json=True), tmp_path / "out")
    data = _read(datalist)
    assert (data["numTraining"], data["numValidation"], data["numTest"]) == (6, 2, 2)
    _assert_balanced(data["training"])
    _assert_relative_and_existing(datalist)
    modality = {Path(e["image"]).name: e["modality"] for e in data["training"] + data["validation"] + data["testing"]}
    assert modality["amos_0005.nii.gz"] == "CT" and modality["amos_0507.nii.gz"] == "MR"
    assert modality["amos_0600.nii.gz"] == "MR" and modality["amos_0003.nii.gz"] == "CT"
    meta = _assert_dataset_json(tmp_path / "out" / "dataset.json")
    assert meta["labels"]["organ 15"] == 15 and len(meta["labels"]) == 16
    assert meta["channel_names"] == {"0": "either_CT_or_MR"}
    assert load_datalist(datalist)[0]["modality"] in ("CT", "MR")


def test_amos22_without_own_dataset_json_uses_official_names(tmp_path):
    convert("amos22", _amos(tmp_path / "raw", own_json=False), tmp_path / "out")
    meta = _assert_dataset_json(tmp_path / "out" / "dataset.json")
    assert list(meta["labels"])[:2] == ["background", "spleen"] and meta["labels"]["prostate/uterus"] == 15


# -------------------------------------------------------------------------------------------------------- BTCV
def test_btcv_link_tree(tmp_path):
    raw = tmp_path / "Abdomen" / "RawData"
    for i in (*range(1, 5), *range(21, 24)):
        _nii(raw / "Training" / "img" / f"img{i:04d}.nii.gz")
        _nii(raw / "Training" / "label" / f"label{i:04d}.nii.gz", 3)
    for i in (61, 62):
        _nii(raw / "Testing" / "img" / f"img{i:04d}.nii.gz")
    datalist = convert("btcv", tmp_path / "Abdomen", tmp_path / "out", link=True)
    data = _read(datalist)
    assert data["numTraining"] == 7 and data["numTest"] == 2
    _assert_balanced(data["training"])
    _assert_relative_and_existing(datalist)
    assert data["training"][0] == {"image": "imagesTr/img0001_0000.nii.gz", "label": "labelsTr/img0001.nii.gz",
                                   "fold": data["training"][0]["fold"]}  # fmt: skip
    assert data["testing"] == [{"image": "imagesTs/img0061_0000.nii.gz"}, {"image": "imagesTs/img0062_0000.nii.gz"}]
    linked = tmp_path / "out" / "labelsTr" / "img0001.nii.gz"
    assert linked.is_symlink() and linked.resolve() == (raw / "Training" / "label" / "label0001.nii.gz").resolve()
    meta = _assert_dataset_json(tmp_path / "out" / "dataset.json")
    assert len(meta["labels"]) == 14 and meta["labels"]["left_adrenal_gland"] == 13


def test_btcv_label_missing_is_named(tmp_path):
    _nii(tmp_path / "Training" / "img" / "img0001.nii.gz")
    _nii(tmp_path / "Training" / "img" / "img0002.nii.gz")
    _nii(tmp_path / "Training" / "label" / "label0001.nii.gz")
    with pytest.raises(ValueError, match=r"without a mask: .*img0002\.nii\.gz"):
        convert("btcv", tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------------------------------------- MSD
def test_msd_task_reads_its_dataset_json_and_skips_appledouble(tmp_path):
    _msd(tmp_path / "Decathlon")
    datalist = convert("msd_task04_hippocampus", tmp_path / "Decathlon", tmp_path / "out")
    data = _read(datalist)
    assert data["numTraining"] == 6 and data["numTest"] == 2
    _assert_balanced(data["training"])
    _assert_relative_and_existing(datalist)
    assert not any("._" in e["image"] for e in data["training"])
    meta = _assert_dataset_json(tmp_path / "out" / "dataset.json")
    assert meta["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert meta["channel_names"] == {"0": "MRI"} and meta["release"] == "1.0 04/05/2018"
    assert meta["name"] == "Hippocampus" and meta["licence"] == "CC-BY-SA 4.0"
    # the generic key converts any MSD-format task folder
    assert _read(convert("msd", tmp_path / "Decathlon" / "Task04_Hippocampus", tmp_path / "out2"))["numTraining"] == 6


def test_msd_guards(tmp_path):
    task_dir = _msd(tmp_path)
    with pytest.raises(ValueError, match="expects Task09_Spleen"):
        convert("msd_task09_spleen", task_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="not written by this converter"):  # never overwrite the task's dataset.json
        convert("msd_task04_hippocampus", task_dir, task_dir)
    with pytest.raises(ValueError, match="copy/link needs an output folder outside it"):
        convert("msd_task04_hippocampus", task_dir, task_dir / "converted", copy=True)
    (task_dir / "dataset.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks modality, labels"):
        convert("msd_task04_hippocampus", task_dir, tmp_path / "out")


def test_every_msd_task_is_registered():
    names = list_datasets()
    for key in MSD_KEYS:
        assert key in names and key.split("_", 2)[1].title() in names[key].replace("_", " ").title()


# ----------------------------------------------------------------------------------------- shipped datasets_json
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_json_files(name):
    folder = DATASETS_JSON / name
    meta = _assert_dataset_json(folder / "dataset.json")
    assert meta["converted_by"] == f"medsegdiff convert {name}"
    assert isinstance(meta["numTraining"], int) or (meta["numTraining"] is None and "numTraining_note" in meta)
    datalist = folder / "datalist.json"
    if not datalist.exists():
        assert "medsegdiff convert" in (folder / "README.md").read_text(encoding="utf-8")
        return
    data = _read(datalist)
    assert data["dataset"] == name and data["numTraining"] == meta["numTraining"] == len(data["training"])
    assert data.get("numTest") == meta.get("numTest") == (len(data["testing"]) if "testing" in data else None)
    _assert_balanced(data["training"])
    for entry in data["training"] + data.get("testing", []):
        assert all(not os.path.isabs(p) and ".." not in p for p in _paths(entry))
    assert len(load_datalist(datalist, base_dir="/data/download")) == meta["numTraining"]


def test_shipped_counts_and_readme():
    assert _read(DATASETS_JSON / "kvasir_seg" / "datalist.json")["numTraining"] == 1000
    btcv = _read(DATASETS_JSON / "btcv" / "datalist.json")
    ids = [Path(e["image"]).name for e in btcv["training"]]
    assert ids == [f"img{i:04d}.nii.gz" for i in (*range(1, 11), *range(21, 41))]
    assert btcv["testing"][0] == {"image": "Testing/img/img0061.nii.gz"}
    assert _read(DATASETS_JSON / "msd_task01_braintumour" / "datalist.json")["numTest"] == 266
    isic = _read(DATASETS_JSON / "isic2018" / "dataset.json")
    brats = _read(DATASETS_JSON / "brats2021" / "dataset.json")
    assert (isic["numTraining"], isic["numValidation"], isic["numTest"]) == (2594, 100, 1000)
    assert (brats["numTraining"], brats["numValidation"]) == (1251, 219) and brats["label_mapping"] == {"4": 3}
    readme = (DATASETS_JSON / "README.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in readme for name in SHIPPED)


def test_shipped_json_files_are_reproducible(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_datasets_json", DATASETS_JSON / "make_datasets_json.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    bboxes = SHARED_KVASIR / "kavsir_bboxes.json"
    kvasir_ids = sorted(_read(bboxes)) if bboxes.is_file() else None
    # isic2018 and brats2021 need ~15k empty mock files (~10 s here); their dataset.json depends only on the
    # official counts, which test_shipped_counts_and_readme checks
    specs = [s for s in module._specs(kvasir_ids) if s.name not in ("isic2018", "brats2021")]
    written = module.build(tmp_path, specs)
    assert len(written) == 2 * len(specs)
    for path in written:
        shipped = DATASETS_JSON / path.relative_to(tmp_path)
        assert path.read_text(encoding="utf-8") == shipped.read_text(encoding="utf-8"), shipped


# ---------------------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not SHARED_KVASIR.is_dir(), reason="../shared/data/Kvasir-SEG is absent")
def test_real_kvasir_seg_subset(tmp_path):
    datalist = convert("kvasir_seg", SHARED_KVASIR, tmp_path / "kvasir")
    data = _read(datalist)
    assert data["numTraining"] == 618
    _assert_balanced(data["training"])
    _assert_relative_and_existing(datalist)
    for item in load_datalist(datalist):
        assert Path(item["image"]).stem == Path(item["label"]).stem
