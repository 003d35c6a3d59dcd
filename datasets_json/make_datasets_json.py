"""Regenerate the JSON files under ``datasets_json/``: this script is how every shipped file was made.

For each dataset the official release layout is mocked in a temporary folder with EMPTY files carrying the official
names, then the real converter runs on the mock::

    convert(name, src=mock_root, dst=tmp, paths_relative_to=mock_root)

so every shipped ``datalist.json`` is exactly what ``medsegdiff convert`` writes for the official release, except that
its paths are relative to the release root (use it with ``--dataset_dir`` set to your download) instead of to the
datalist's folder. Converters only look at names, so empty files are enough.

A ``datalist.json`` is shipped only where the case ids of the official release are known with certainty (see
``README.md``). For the other datasets only ``dataset.json`` is shipped: it is made the same way from a mock with the
official case COUNTS and placeholder ids (that run's datalist is thrown away), plus a ``README.md`` that says how to
make the datalist from a download.

Usage::

    python datasets_json/make_datasets_json.py [--kvasir-bboxes Kvasir-SEG/kavsir_bboxes.json] [--only NAME ...]

Kvasir-SEG's 1000 ids are read from ``kavsir_bboxes.json``, a file of the official release (one entry per image);
without ``--kvasir-bboxes`` the shipped Kvasir-SEG files are left as they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from medsegdiff_bundle.data.converters import convert  # noqa: E402

__all__ = ["SPECS", "build", "main"]


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _pairs(image_dir: Path, label_dir: Path | None, ids: list[str], ext: str, label_name: Callable[[str], str]) -> None:
    for folder in (image_dir, label_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    for case in ids:
        (image_dir / f"{case}{ext}").touch()
        if label_dir is not None:
            (label_dir / label_name(case)).touch()


@dataclass
class Spec:
    """How one dataset's files are made.

    Attributes:
        name: converter key and folder name under ``datasets_json/``.
        mock: builds the empty-file mock under the given folder and returns the release root to convert.
        ship_datalist: ship ``datalist.json`` (official ids known) or only ``dataset.json`` + ``README.md``.
        why: for dataset.json-only folders, why no datalist is shipped.
        download_root: what ``--src`` / ``--dataset_dir`` must point at.
        overrides: keys replaced in the written ``dataset.json`` (``None`` values are written as null).
    """

    name: str
    mock: Callable[[Path], Path]
    ship_datalist: bool
    download_root: str
    why: str = ""
    overrides: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------- mocks
def _mock_kvasir(ids: list[str]) -> Callable[[Path], Path]:
    def mock(tmp: Path) -> Path:
        root = tmp / "Kvasir-SEG"
        _pairs(root / "images", root / "masks", ids, ".jpg", lambda c: f"{c}.jpg")
        return root

    return mock


def _mock_isic(tmp: Path) -> Path:
    # official counts: Training 2594, Validation 100, Test 1000 (ground truth of all three is released)
    for split, count in (("Training", 2594), ("Validation", 100), ("Test", 1000)):
        ids = [f"ISIC_P{split[0]}{i:06d}" for i in range(count)]
        _pairs(tmp / f"ISIC2018_Task1-2_{split}_Input", tmp / f"ISIC2018_Task1_{split}_GroundTruth", ids, ".jpg",
               lambda c: f"{c}_segmentation.png")  # fmt: skip
    return tmp


def _mock_refuge2(tmp: Path) -> Path:
    # split sizes differ between the distributed copies: one placeholder per split, counts written as null
    for split in ("train", "val", "test"):
        _pairs(tmp / "REFUGE2" / split / "images", tmp / "REFUGE2" / split / "mask", [f"P_{split}"], ".jpg",
               lambda c: f"{c}.bmp")  # fmt: skip
    return tmp / "REFUGE2"


def _mock_brats(tmp: Path) -> Path:
    # official counts: 1251 training cases (with _seg), 219 validation cases (without)
    for folder, prefix, count, seg in (("RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021", "P", 1251, True),
                                       ("RSNA_ASNR_MICCAI_BraTS2021_ValidationData", "V", 219, False)):  # fmt: skip
        for i in range(count):
            case = f"BraTS2021_{prefix}{i:05d}"
            for suffix in ("t1", "t1ce", "t2", "flair", *(("seg",) if seg else ())):
                _touch(tmp / folder / case / f"{case}_{suffix}.nii.gz")
    return tmp


def _mock_amos(tmp: Path) -> Path:
    # official counts: training 200 CT + 40 MRI, validation 100 CT + 20 MRI, test 200 CT + 40 MRI; CT ids <= 500
    root = tmp / "amos22"
    for images, labels, ct, mr in (("imagesTr", "labelsTr", 200, 40), ("imagesVa", "labelsVa", 100, 20),
                                   ("imagesTs", None, 200, 40)):  # fmt: skip
        ids = [f"placeholder_{images[-2:]}_{n:04d}" for n in (*range(1, ct + 1), *range(501, 501 + mr))]
        _pairs(root / images, root / labels if labels else None, ids, ".nii.gz", lambda c: f"{c}.nii.gz")
    return root


def _mock_btcv(tmp: Path) -> Path:
    # RawData.zip of Synapse syn3193805: 30 labelled training scans, 20 test scans
    root = tmp / "RawData"
    train = [f"{i:04d}" for i in (*range(1, 11), *range(21, 41))]
    test = [f"{i:04d}" for i in range(61, 81)]
    _pairs(root / "Training" / "img", root / "Training" / "label", [f"img{i}" for i in train], ".nii.gz",
           lambda c: f"label{c[3:]}.nii.gz")  # fmt: skip
    _pairs(root / "Testing" / "img", None, [f"img{i}" for i in test], ".nii.gz", str)
    return root


def _mock_msd(task: str, header: dict, train: list[str], test: list[str]) -> Callable[[Path], Path]:
    def mock(tmp: Path) -> Path:
        root = tmp / task
        _pairs(root / "imagesTr", root / "labelsTr", train, ".nii.gz", lambda c: f"{c}.nii.gz")
        _pairs(root / "imagesTs", None, test, ".nii.gz", str)
        own = {**header, "numTraining": len(train), "numTest": len(test),
               "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
               "test": [f"./imagesTs/{c}.nii.gz" for c in test]}  # fmt: skip
        (root / "dataset.json").write_text(json.dumps(own, indent=4), encoding="utf-8")
        return root

    return mock


def _placeholders(prefix: str, count: int) -> list[str]:
    return [f"{prefix}_placeholder_{i:03d}" for i in range(count)]


# Header fields of the tasks' own dataset.json files (the converter copies name, description, reference, licence,
# release, tensorImageSize, modality, labels). Labels, modalities and counts were checked against public copies;
# see README.md for which header strings were checked and which are transcribed from memory.
_MSD_CT, _MSKCC, _LIC = {"0": "CT"}, "Memorial Sloan Kettering Cancer Center", "CC-BY-SA 4.0"
_MSD = {
    "msd_task01_braintumour": ("Task01_BrainTumour", {
        "name": "BRATS", "description": "Gliomas segmentation tumour and oedema in on brain images",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html", "licence": _LIC, "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}},
        [f"BRATS_{i:03d}" for i in range(1, 485)], [f"BRATS_{i:03d}" for i in range(485, 751)]),
    "msd_task02_heart": ("Task02_Heart", {
        "name": "LeftAtrium", "description": "Left atrium segmentation", "reference": "King's College London",
        "licence": _LIC, "tensorImageSize": "3D", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "left atrium"}},
        [f"la_{i:03d}" for i in (3, 4, 5, 7, 9, 10, 11, 14, 16, 17, 18, 19, 20, 21, 22, 23, 24, 26, 29, 30)],
        [f"la_{i:03d}" for i in (1, 2, 6, 8, 12, 13, 15, 25, 27, 28)]),
    "msd_task03_liver": ("Task03_Liver", {
        "name": "LiTS", "description": "Liver and liver tumour segmentation",
        "reference": "https://competitions.codalab.org/competitions/17094", "licence": _LIC, "tensorImageSize": "3D",
        "modality": _MSD_CT, "labels": {"0": "background", "1": "liver", "2": "cancer"}},
        _placeholders("liver", 131), _placeholders("liver_ts", 70)),
    "msd_task04_hippocampus": ("Task04_Hippocampus", {
        "name": "Hippocampus", "description": "Left and right hippocampus segmentation",
        "reference": "Vanderbilt University Medical Center", "licence": _LIC, "tensorImageSize": "3D",
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}},
        _placeholders("hippocampus", 260), _placeholders("hippocampus_ts", 130)),
    "msd_task05_prostate": ("Task05_Prostate", {
        "name": "PROSTATE", "description": "Prostate transitional zone and peripheral zone segmentation",
        "reference": "Radboud University, Nijmegen Medical Centre", "licence": _LIC, "tensorImageSize": "4D",
        "modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "PZ", "2": "TZ"}},
        _placeholders("prostate", 32), _placeholders("prostate_ts", 16)),
    "msd_task06_lung": ("Task06_Lung", {
        "name": "Lung", "description": "Lung and cancer segmentation", "reference": "The Cancer Imaging Archive",
        "licence": _LIC, "tensorImageSize": "3D", "modality": _MSD_CT, "labels": {"0": "background", "1": "cancer"}},
        _placeholders("lung", 63), _placeholders("lung_ts", 32)),
    "msd_task07_pancreas": ("Task07_Pancreas", {
        "name": "Pancreas", "description": "Pancreas and cancer segmentation", "reference": _MSKCC,
        "licence": _LIC, "relase": "1.0 04/05/2018", "tensorImageSize": "3D", "modality": _MSD_CT,
        "labels": {"0": "background", "1": "pancreas", "2": "cancer"}},
        _placeholders("pancreas", 281), _placeholders("pancreas_ts", 139)),
    "msd_task08_hepaticvessel": ("Task08_HepaticVessel", {
        "name": "HepaticVessel", "description": "Hepatic Vessels and Tumour Segmentation", "reference": _MSKCC,
        "licence": _LIC, "release": "1.1 14/08/2018", "tensorImageSize": "3D", "modality": _MSD_CT,
        "labels": {"0": "background", "1": "Vessel", "2": "Tumour"}},
        _placeholders("hepaticvessel", 303), _placeholders("hepaticvessel_ts", 140)),
    "msd_task09_spleen": ("Task09_Spleen", {
        "name": "Spleen", "description": "Spleen Segmentation", "reference": _MSKCC, "licence": _LIC,
        "release": "1.0 06/08/2018", "tensorImageSize": "3D", "modality": _MSD_CT,
        "labels": {"0": "background", "1": "spleen"}},
        [f"spleen_{i}" for i in (2, 3, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 24, 25, 26, 27, 28, 29,
                                 31, 32, 33, 38, 40, 41, 44, 45, 46, 47, 49, 52, 53, 56, 59, 60, 61, 62, 63)],
        [f"spleen_{i}" for i in (1, 7, 11, 15, 23, 30, 34, 35, 36, 37, 39, 42, 43, 48, 50, 51, 54, 55, 57, 58)]),
    "msd_task10_colon": ("Task10_Colon", {
        "name": "Colon", "description": "Colon cancer segmentation", "reference": _MSKCC, "licence": _LIC,
        "tensorImageSize": "3D", "modality": _MSD_CT, "labels": {"0": "background", "1": "colon cancer primaries"}},
        _placeholders("colon", 126), _placeholders("colon_ts", 64)),
}  # fmt: skip
_MSD_IDS_KNOWN = {"msd_task01_braintumour", "msd_task02_heart", "msd_task09_spleen"}


def _specs(kvasir_ids: list[str] | None) -> list[Spec]:
    specs: list[Spec] = []
    if kvasir_ids is not None:
        specs.append(Spec("kvasir_seg", _mock_kvasir(kvasir_ids), True, "the Kvasir-SEG folder (images/, masks/)"))
    specs += [
        Spec("isic2018", _mock_isic, False, "the folder holding the ISIC2018_Task1* folders",
             why="the 2594 + 100 + 1000 ISIC image ids of the official release cannot be listed here with certainty"),
        Spec("refuge2", _mock_refuge2, False, "the REFUGE2 folder (train/, val/, test/)",
             why="REFUGE2 copies differ in folder names and split sizes, so neither ids nor counts are fixed; the "
             "counts are written as null",
             overrides={"numTraining": None, "numValidation": None, "numTest": None,
                        "numTraining_note": "depends on the REFUGE2 copy; `medsegdiff convert refuge2` writes the "
                        "counts it finds"}),
        Spec("brats2021", _mock_brats, False, "the folder holding the BraTS2021_XXXXX case folders (or the folder "
             "above the training and validation data)",
             why="the 1251 training case ids (BraTS2021_00000 ... BraTS2021_01666, with gaps) cannot be listed here "
             "with certainty"),
        Spec("amos22", _mock_amos, False, "the amos22 folder (imagesTr/, labelsTr/, imagesVa/, labelsVa/, imagesTs/)",
             why="the 240 + 120 + 240 AMOS case ids (amos_XXXX, with gaps) cannot be listed here with certainty"),
        Spec("btcv", _mock_btcv, True, "the RawData folder (Training/img, Training/label, Testing/img)"),
    ]
    for name, (task, header, train, test) in _MSD.items():
        known = name in _MSD_IDS_KNOWN
        why = "" if known else f"the case ids of {task} (numbered with gaps) cannot be listed here with certainty"
        if name == "msd_task03_liver":
            why = ("the training ids (liver_0 ... liver_130) are known, but the 70 test ids cannot be listed here "
                   "with certainty")  # fmt: skip
        specs.append(Spec(name, _mock_msd(task, header, train, test), known, f"the {task} folder", why=why))
    return specs


SPECS = _specs(None)


def _readme(spec: Spec, dataset_json: dict) -> str:
    counts = ", ".join(f"{k} {dataset_json[k]}" for k in ("numTraining", "numValidation", "numTest")
                       if dataset_json.get(k) is not None)  # fmt: skip
    return (
        f"# {spec.name}: dataset.json only\n\n"
        f"No `datalist.json` is shipped here: {spec.why}. Make it from your download:\n\n"
        f"```bash\nmedsegdiff convert {spec.name} --src /path/to/download --dst /path/to/{spec.name}\n```\n\n"
        f"where `--src` is {spec.download_root}; the converter writes `datalist.json` (5 folds, seed 0) and "
        f"`dataset.json` into `--dst`.\n\n"
        f"`dataset.json` here is what that command writes for the official release"
        f"{f' ({counts})' if counts else ''}. It was made by `python datasets_json/make_datasets_json.py`: the "
        "converter ran on an empty-file mock of the official layout with the official case counts and placeholder "
        "ids. See `../README.md` for the label conventions and licence.\n"
    )


def build(out_dir: Path, specs: list[Spec]) -> list[Path]:
    """Write ``out_dir/<name>/{datalist.json, dataset.json, README.md}`` for ``specs``; returns the files written."""
    written: list[Path] = []
    for spec in specs:
        target = out_dir / spec.name
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            mock_root = spec.mock(Path(tmp) / "raw")
            datalist = convert(spec.name, mock_root, Path(tmp) / "out", paths_relative_to=mock_root)
            dataset_json = json.loads((datalist.parent / "dataset.json").read_text(encoding="utf-8"))
            dataset_json.update(spec.overrides)
            (target / "dataset.json").write_text(json.dumps(dataset_json, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")  # fmt: skip
            written.append(target / "dataset.json")
            if spec.ship_datalist:
                shutil.copyfile(datalist, target / "datalist.json")
                written.append(target / "datalist.json")
            else:
                (target / "README.md").write_text(_readme(spec, dataset_json), encoding="utf-8")
                written.append(target / "README.md")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kvasir-bboxes", type=Path, help="kavsir_bboxes.json of the official Kvasir-SEG release")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: datasets_json/)")
    parser.add_argument("--only", nargs="*", help="dataset keys to (re)build")
    args = parser.parse_args(argv)
    kvasir_ids = None
    if args.kvasir_bboxes is not None:
        kvasir_ids = sorted(json.loads(args.kvasir_bboxes.read_text(encoding="utf-8")))
    specs = [s for s in _specs(kvasir_ids) if not args.only or s.name in args.only]
    for path in build(args.out, specs):
        print(path)


if __name__ == "__main__":
    main()
