"""Tests for ``medsegdiff_bundle.data.datalist``."""

import csv
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsegdiff_bundle.data import case_name, check_case, load_datalist, select_fold, validate_cases
from tests.helpers import dicom_series as _dicom_series


# ----------------------------------------------------------------------------------------------- file helpers
def _png(path: Path, shape: tuple[int, ...]) -> str:
    """``shape`` is numpy ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(path)
    return str(path)


def _nii(path: Path, shape: tuple[int, ...], dtype=np.float32) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=dtype), np.eye(4)), str(path))
    return str(path)


def _garbage(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(512))
    return str(path)


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------------ load_datalist
def test_relative_and_list_paths_resolved_against_datalist_folder(tmp_path, monkeypatch):
    """Relative paths (single and multi-modal lists) become absolute under the datalist's folder, not the cwd."""
    root = tmp_path / "task"
    dl = _write_json(
        root / "dataset.json",
        {
            "training": [
                {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "fold": 0},
                {
                    "image": ["imagesTr/b_flair.nii.gz", "imagesTr/b_t1c.nii.gz"],
                    "label": "labelsTr/b.nii.gz",
                    "fold": 1,
                },
            ],
            "test": [{"image": "imagesTs/c.nii.gz"}],
        },
    )
    monkeypatch.chdir(tmp_path)  # a relative datalist path must still give absolute case paths
    items = load_datalist(Path("task") / "dataset.json")
    assert items[0]["image"] == str(root / "imagesTr" / "a.nii.gz")
    assert items[0]["label"] == str(root / "labelsTr" / "a.nii.gz")
    assert items[1]["image"] == [str(root / "imagesTr" / "b_flair.nii.gz"), str(root / "imagesTr" / "b_t1c.nii.gz")]
    assert all(os.path.isabs(p) for p in items[1]["image"])
    assert [it["fold"] for it in items] == [0, 1]  # non-path values untouched

    test = load_datalist(dl, data_list_key="test")
    assert test == [{"image": str(root / "imagesTs" / "c.nii.gz")}]


def test_base_dir_overrides_datalist_folder_and_absolute_paths_kept(tmp_path):
    other = tmp_path / "data"
    absolute = str(tmp_path / "elsewhere" / "x.nii.gz")
    dl = _write_json(tmp_path / "lists" / "dl.json", {"training": [{"image": "a.png", "label": absolute}]})
    items = load_datalist(dl, base_dir=other)
    assert items[0]["image"] == str(other / "a.png")
    assert items[0]["label"] == absolute


def test_plain_test_list_and_empty_list(tmp_path):
    """MSD "test" lists may be bare paths; an empty list is an empty datalist, not a crash."""
    dl = _write_json(tmp_path / "dl.json", {"test": ["imagesTs/a.nii.gz"], "validation": []})
    assert load_datalist(dl, "test") == [{"image": str(tmp_path / "imagesTs" / "a.nii.gz")}]
    assert load_datalist(dl, "validation") == []


def test_missing_datalist_names_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_datalist(missing)


def test_bad_json_names_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"training": [ {"image": "a.png",, ] }')
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        load_datalist(bad)


def test_missing_key_names_file_and_key(tmp_path):
    dl = _write_json(tmp_path / "dl.json", {"training": [{"image": "a.png"}]})
    with pytest.raises(ValueError) as err:
        load_datalist(dl, data_list_key="validation")
    msg = str(err.value)
    assert "dl.json" in msg and "'validation'" in msg and "training" in msg


def test_non_object_and_non_list_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"arr\.json.*JSON object"):
        load_datalist(_write_json(tmp_path / "arr.json", [{"image": "a.png"}]))
    with pytest.raises(ValueError, match=r"'training'.*must be a list"):
        load_datalist(_write_json(tmp_path / "dict.json", {"training": {"image": "a.png"}}))


# -------------------------------------------------------------------------------------------------- select_fold
ITEMS = [{"image": f"/d/c{i}.png", "fold": i % 3} for i in range(7)]


def test_select_fold_splits():
    val = select_fold(ITEMS, 1, validation=True)
    train = select_fold(ITEMS, 1, validation=False)
    assert [it["image"] for it in val] == ["/d/c1.png", "/d/c4.png"]
    assert [it["image"] for it in train] == ["/d/c0.png", "/d/c2.png", "/d/c3.png", "/d/c5.png", "/d/c6.png"]
    # no case is lost or duplicated
    assert sorted(it["image"] for it in val + train) == sorted(it["image"] for it in ITEMS)


def test_select_fold_none_means_all_training():
    assert select_fold(ITEMS, None, validation=False) == ITEMS
    assert select_fold(ITEMS, None, validation=True) == []


def test_cases_without_fold_key_always_train():
    items = [*ITEMS, {"image": "/d/extra.png"}]
    assert {"image": "/d/extra.png"} in select_fold(items, 0, validation=False)
    assert {"image": "/d/extra.png"} not in select_fold(items, 0, validation=True)


def test_select_fold_errors_name_fold():
    with pytest.raises(ValueError, match=r"fold=5 selects no validation case.*\[0, 1, 2\]"):
        select_fold(ITEMS, 5, validation=True)
    with pytest.raises(ValueError, match=r"fold=5"):
        select_fold(ITEMS, 5, validation=False)  # training on "all but a missing fold" is a silent mistake too
    with pytest.raises(ValueError, match=r"fold=0.*no case.*'fold' key"):
        select_fold([{"image": "/d/a.png"}], 0, validation=True)


# ---------------------------------------------------------------------------------------------------- case_name
@pytest.mark.parametrize(
    "value,expected",
    [
        ("/d/BraTS_001_flair.nii.gz", "BraTS_001_flair"),
        ("/d/case.001.nii.gz", "case.001"),
        ("/d/img_7.png", "img_7"),
        ("/d/scan.mha", "scan"),
        (["/d/p3_t1.nii", "/d/p3_t2.nii"], "p3_t1"),
        ("/d/1.2.840.113619", "1.2.840.113619"),  # DICOM UID: numeric "suffix" is not an extension
    ],
)
def test_case_name(value, expected):
    assert case_name({"image": value}) == expected


def test_case_name_other_key_and_missing():
    assert case_name({"label": "/d/lab.nii.gz"}, key="label") == "lab"
    with pytest.raises(KeyError, match="image"):
        case_name({"label": "/d/lab.nii.gz"})


# --------------------------------------------------------------------------------------------------- check_case
def test_good_2d_png_rgb_image_grey_label(tmp_path):
    """SimpleITK reports an RGB PNG as size (W, H) with 3 components, so it matches a grey (W, H) label."""
    item = {"image": _png(tmp_path / "img.png", (20, 30, 3)), "label": _png(tmp_path / "lab.png", (20, 30))}
    assert check_case(item) is None


def test_good_3d_nifti_and_multimodal(tmp_path):
    item = {"image": _nii(tmp_path / "img.nii.gz", (8, 9, 10)), "label": _nii(tmp_path / "lab.nii.gz", (8, 9, 10))}
    assert check_case(item) is None
    multi = {
        "image": [_nii(tmp_path / "flair.nii.gz", (8, 9, 10)), _nii(tmp_path / "t1c.nii.gz", (8, 9, 10))],
        "label": item["label"],
    }
    assert check_case(multi) is None


def test_good_4d_channel_nifti_with_3d_label(tmp_path):
    item = {"image": _nii(tmp_path / "img.nii.gz", (8, 9, 10, 4)), "label": _nii(tmp_path / "lab.nii.gz", (8, 9, 10))}
    assert check_case(item) is None


def test_label_optional_image_required(tmp_path):
    assert check_case({"image": _png(tmp_path / "img.png", (16, 16))}) is None
    assert check_case({"label": _png(tmp_path / "lab.png", (16, 16))}) == "missing key 'image'"


def test_missing_file(tmp_path):
    item = {"image": _png(tmp_path / "img.png", (16, 16)), "label": str(tmp_path / "gone.png")}
    problem = check_case(item)
    assert problem is not None and "label" in problem and "do not exist" in problem and "gone.png" in problem


def test_missing_file_in_list(tmp_path):
    item = {"image": [_nii(tmp_path / "a.nii.gz", (4, 4, 4)), str(tmp_path / "b.nii.gz")]}
    problem = check_case(item)
    assert problem is not None and "b.nii.gz" in problem and "a.nii.gz" not in problem


@pytest.mark.parametrize("name", ["corrupt.nii.gz", "corrupt.png"])
def test_corrupt_file(tmp_path, name):
    item = {"image": _garbage(tmp_path / name)}
    problem = check_case(item)
    assert problem is not None and "cannot read header" in problem and name in problem
    assert "\n" not in problem  # one line, without SimpleITK's multi-line C++ trace


def test_corrupt_label(tmp_path):
    item = {"image": _nii(tmp_path / "img.nii.gz", (4, 4, 4)), "label": _garbage(tmp_path / "lab.nii.gz")}
    problem = check_case(item)
    assert problem is not None and problem.startswith("label:") and "lab.nii.gz" in problem


def test_image_label_size_mismatch(tmp_path):
    item = {"image": _nii(tmp_path / "img.nii.gz", (8, 9, 10)), "label": _nii(tmp_path / "lab.nii.gz", (8, 9, 11))}
    problem = check_case(item)
    assert problem is not None and "does not match" in problem
    assert "(8, 9, 10)" in problem and "(8, 9, 11)" in problem


def test_image_label_size_mismatch_2d_rgb(tmp_path):
    item = {"image": _png(tmp_path / "img.png", (20, 30, 3)), "label": _png(tmp_path / "lab.png", (20, 31))}
    problem = check_case(item)
    # sizes are SimpleITK's (x, y) = (W, H); the 3 RGB components are not a spatial axis
    assert problem == "image size (30, 20) does not match label size (31, 20)"


@pytest.fixture
def without_simpleitk(monkeypatch):
    """As on a machine without SimpleITK (the GPU image): header checks fall back to PIL / existence."""
    import medsegdiff_bundle.data.datalist as datalist

    monkeypatch.setattr(datalist, "_simpleitk", lambda: None)


@pytest.mark.usefixtures("without_simpleitk")
def test_without_simpleitk_raster_headers_are_read_with_pil(tmp_path):
    good = {"image": _png(tmp_path / "img.png", (20, 30, 3)), "label": _png(tmp_path / "lab.png", (20, 30))}
    assert check_case(good) is None
    Image.fromarray(np.zeros((20, 31), dtype=np.uint8)).save(tmp_path / "lab.jpg")
    bad = {"image": good["image"], "label": str(tmp_path / "lab.jpg")}
    assert check_case(bad) == "image size (30, 20) does not match label size (31, 20)"  # SimpleITK's (W, H) too
    problem = check_case({"image": _garbage(tmp_path / "corrupt.png")})
    assert problem is not None and "cannot read header" in problem and "corrupt.png" in problem


@pytest.mark.usefixtures("without_simpleitk")
def test_without_simpleitk_other_formats_are_only_checked_to_exist(tmp_path):
    assert check_case({"image": _garbage(tmp_path / "volume.nii.gz")}) is None
    assert "do not exist" in check_case({"image": str(tmp_path / "gone.nii.gz")})


def test_a_placeholder_simpleitk_module_counts_as_missing(monkeypatch):
    import sys
    import types

    from medsegdiff_bundle.data.datalist import _simpleitk

    assert _simpleitk() is not None  # the real one, installed here
    monkeypatch.setitem(sys.modules, "SimpleITK", types.ModuleType("SimpleITK"))
    assert _simpleitk() is None


def test_multifile_image_size_mismatch(tmp_path):
    item = {
        "image": [_nii(tmp_path / "flair.nii.gz", (8, 9, 10)), _nii(tmp_path / "t1c.nii.gz", (8, 9, 12))],
        "label": _nii(tmp_path / "lab.nii.gz", (8, 9, 10)),
    }
    problem = check_case(item)
    assert problem is not None and "image files differ in size" in problem
    assert "flair.nii.gz" in problem and "t1c.nii.gz" in problem


def test_not_a_path(tmp_path):
    problem = check_case({"image": 3})
    assert problem is not None and "not a path" in problem


def test_dicom_series_directory(tmp_path):
    """A folder is read as a DICOM series: size is (x, y, number of slices), so it matches a 3D label."""
    series = _dicom_series(tmp_path / "dcm", nx=10, ny=8, nz=3)
    assert check_case({"image": series, "label": _nii(tmp_path / "lab.nii.gz", (10, 8, 3))}) is None
    problem = check_case({"image": series, "label": _nii(tmp_path / "lab4.nii.gz", (10, 8, 4))})
    assert problem == "image size (10, 8, 3) does not match label size (10, 8, 4)"
    assert case_name({"image": series}) == "dcm"


def test_empty_directory_is_no_dicom_series(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    assert check_case({"image": str(empty)}) == f"image: no DICOM series in {empty}"


# ----------------------------------------------------------------------------------------------- validate_cases
def _mixed_cases(tmp_path):
    """Five cases, in order: good, missing label, good, corrupt image, size mismatch."""
    good1 = {"image": _png(tmp_path / "good1.png", (16, 16, 3)), "label": _png(tmp_path / "good1_seg.png", (16, 16))}
    missing = {"image": _png(tmp_path / "missing.png", (16, 16)), "label": str(tmp_path / "missing_seg.png")}
    cube = (6, 6, 6)
    good2 = {"image": _nii(tmp_path / "good2.nii.gz", cube), "label": _nii(tmp_path / "good2_seg.nii.gz", cube)}
    corrupt = {"image": _garbage(tmp_path / "corrupt.nii.gz"), "label": _nii(tmp_path / "corrupt_seg.nii.gz", cube)}
    mismatch = {"image": _nii(tmp_path / "mismatch.nii.gz", cube), "label": _nii(tmp_path / "mm_seg.nii.gz", (6, 6, 7))}
    return [good1, missing, good2, corrupt, mismatch]


def test_validate_raise_lists_all_bad_cases(tmp_path):
    items = _mixed_cases(tmp_path)
    with pytest.raises(ValueError) as err:
        validate_cases(items, on_error="raise", num_workers=3)
    msg = str(err.value)
    assert "3 of 5 cases" in msg
    lines = [line.strip() for line in msg.splitlines()[1:]]
    assert [line.split(":", 1)[0] for line in lines] == ["missing", "corrupt", "mismatch"]
    assert "do not exist" in lines[0] and "cannot read header" in lines[1] and "does not match" in lines[2]
    assert "good1" not in msg and "good2" not in msg


def test_validate_raise_writes_report_first(tmp_path):
    report = tmp_path / "out" / "report.csv"
    with pytest.raises(ValueError):
        validate_cases(_mixed_cases(tmp_path), report_path=report)
    with open(report, newline="") as f:
        assert [row["case"] for row in csv.DictReader(f)] == ["missing", "corrupt", "mismatch"]


def test_validate_skip_keeps_good_in_order_and_writes_report(tmp_path, caplog):
    items = _mixed_cases(tmp_path)
    report = tmp_path / "report.csv"
    with caplog.at_level(logging.WARNING, logger="medsegdiff_bundle.data.datalist"):
        good = validate_cases(items, on_error="skip", report_path=report, num_workers=2)
    assert good == [items[0], items[2]]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all(w.startswith("skipping case ") for w in warned)
    assert any("corrupt" in w and "cannot read header" in w for w in warned)

    with open(report, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["case", "problem"]
        rows = list(reader)
    assert [r["case"] for r in rows] == ["missing", "corrupt", "mismatch"]
    assert "missing_seg.png" in rows[0]["problem"] and "(6, 6, 7)" in rows[2]["problem"]
    assert [p.name for p in tmp_path.glob(".report.csv*")] == []  # no temp file left behind


def test_validate_all_good_empty_report(tmp_path):
    items = _mixed_cases(tmp_path)
    good = [items[0], items[2]]
    report = tmp_path / "report.csv"
    report.write_text("stale,content\n")  # replaced, not appended to
    assert validate_cases(good, report_path=report) == good
    assert report.read_text(encoding="utf-8").splitlines() == ["case,problem"]


def test_validate_names_case_without_image(tmp_path):
    items = [{"label": _png(tmp_path / "orphan_seg.png", (8, 8))}, {}]
    with pytest.raises(ValueError) as err:
        validate_cases(items)
    msg = str(err.value)
    assert "orphan_seg: missing key 'image'" in msg and "case 1: missing key 'image'" in msg


def test_validate_rejects_unknown_on_error():
    with pytest.raises(ValueError, match="on_error"):
        validate_cases([], on_error="ignore")


def test_validate_end_to_end_from_datalist(tmp_path):
    """Datalist -> fold split -> checks, with relative paths."""
    _png(tmp_path / "images" / "a.png", (12, 12, 3))
    _png(tmp_path / "labels" / "a.png", (12, 12))
    _png(tmp_path / "images" / "b.png", (12, 12, 3))
    _png(tmp_path / "labels" / "b.png", (12, 13))
    dl = _write_json(
        tmp_path / "datalist.json",
        {
            "training": [
                {"image": "images/a.png", "label": "labels/a.png", "fold": 0},
                {"image": "images/b.png", "label": "labels/b.png", "fold": 1},
            ]
        },
    )
    items = load_datalist(dl)
    assert validate_cases(select_fold(items, 1, validation=False)) == [items[0]]
    with pytest.raises(ValueError, match=r"b: image size \(12, 12\) does not match label size \(13, 12\)"):
        validate_cases(select_fold(items, 1, validation=True))


def test_output_root_keeps_outputs_of_cases_with_one_file_name_apart(tmp_path):
    from medsegdiff_bundle.data import output_name, output_root

    unique = [{"image": str(tmp_path / "imagesTs" / f"case_{i}.nii.gz")} for i in range(3)]
    assert output_root(unique) is None  # names differ: outputs side by side, as always
    assert output_name(unique[0]["image"]) == "case_0"

    per_folder = [{"image": [str(tmp_path / "kits" / f"case_{i}" / "imaging.nii.gz"), "second.nii.gz"]}
                  for i in range(2)] + [{"image": str(tmp_path / "kits" / "extra" / "a" / "imaging.nii.gz")}]
    root = output_root(per_folder)
    assert Path(root) == tmp_path / "kits"
    assert [output_name(c["image"][0] if isinstance(c["image"], list) else c["image"], root) for c in per_folder] == [
        "case_0/imaging", "case_1/imaging", "extra/a/imaging"]

    clash = [{"image": str(tmp_path / "x" / "scan.nii.gz")}, {"image": str(tmp_path / "x" / "scan.nii")},
             {"image": str(tmp_path / "y" / "scan.mha")}]
    with pytest.raises(ValueError, match=r"2 cases would write the same output files \(x/scan\)") as err:
        output_root(clash)
    assert "scan.nii.gz" in str(err.value) and "scan.mha" not in str(err.value)
    with pytest.raises(KeyError, match="no path under 'image'"):
        output_root([{"label": "a.png"}])
