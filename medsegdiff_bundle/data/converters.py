"""Dataset converters: an official raw release, as downloaded, to a datalist this package trains on.

``convert("kvasir_seg", "/data/Kvasir-SEG", "/data/kvasir_out")`` writes two files into the output folder:

* ``datalist.json``: MSD/Decathlon style (read by :func:`~medsegdiff_bundle.data.load_datalist`), a ``training``
  list of ``{"image", "label", "fold"}`` with a deterministic 5-fold split, plus ``validation`` / ``testing`` lists
  where the official release has such splits and they were found. Paths are **relative to the output folder** and
  point into the raw folder (nothing is copied), unless ``copy=True`` / ``link=True`` materialise an nnU-Net-like
  ``imagesTr/labelsTr`` (``imagesVa/labelsVa``, ``imagesTs/labelsTs``) tree under the output folder.
* ``dataset.json``: nnU-Net v2 style (``channel_names``, ``labels``, ``numTraining``, ``file_ending``, ``name``,
  ``reference``, ``licence``, ``description``) plus the label conventions this package needs
  (``label_threshold`` for 0/255 masks, ``label_mapping`` for non-contiguous label values).

Conventions shared by every converter:

* Folds: training case ids are sorted, shuffled with ``numpy.random.RandomState(seed=0)`` (a generator whose stream
  numpy keeps stable across versions), then dealt round robin into folds 0-4. The same raw data always gives the
  same folds, whatever the file-system order; fold sizes differ by at most one.
* Multi-file cases (BraTS 2021) list their files in a fixed order, documented per converter; files that hold all
  channels already (MSD 4D NIfTI, RGB images) are one path.
* Hidden files (``.*``, including the macOS ``._*`` copies that ship inside the MSD tar files) and ``__MACOSX``
  folders are ignored.
* ``label_mapping`` maps raw label values to training labels (``{"4": 3}``: raw 4 becomes 3); values not listed
  stay as they are. ``label_threshold``: the mask is binarised as ``mask > label_threshold``.

``medsegdiff convert <dataset> --src RAW --dst OUT`` calls :func:`convert`; :func:`list_datasets` names the keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..utils import write_json_atomic

__all__ = ["Case", "RawDataset", "assign_folds", "convert", "list_datasets"]

logger = logging.getLogger(__name__)

NUM_FOLDS = 5
FOLD_SEED = 0
_SPLITS = ("training", "validation", "testing")
# nnU-Net-like folder names of each split when files are copied or linked (AMOS names its validation split "Va")
_SPLIT_DIRS = {"training": ("imagesTr", "labelsTr"), "validation": ("imagesVa", "labelsVa"),
               "testing": ("imagesTs", "labelsTs")}  # fmt: skip
_NIFTI = (".nii.gz", ".nii")
_MAX_NAMED = 10  # how many offending names an error message lists before "... and N more"


# ------------------------------------------------------------------------------------------------------ data model
@dataclass
class Case:
    """One case found in a raw release.

    Attributes:
        case_id: unique id within its split (file stem or case folder name); folds are assigned from it.
        images: the image file(s); several only for multi-file cases, in the converter's documented order.
        label: the mask / label map, ``None`` where the release has none (e.g. a test set).
        extra: additional per-case keys written into the datalist entry (e.g. AMOS ``modality``).
    """

    case_id: str
    images: list[Path]
    label: Path | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class RawDataset:
    """What a converter found: the located release root, metadata for ``dataset.json`` and the cases per split.

    ``meta`` holds ``name``, ``description``, ``reference``, ``licence``, ``channel_names``, ``labels`` (nnU-Net v2
    orientation, ``{"background": 0, ...}``) and optionally ``release``, ``tensorImageSize``, ``label_threshold``,
    ``label_mapping``, ``label_convention``, ``image_files_order``.
    """

    root: Path
    meta: dict
    training: list[Case]
    validation: list[Case] = field(default_factory=list)
    testing: list[Case] = field(default_factory=list)


@dataclass(frozen=True)
class _Converter:
    name: str
    description: str
    func: Callable[[Path], RawDataset]


_REGISTRY: dict[str, _Converter] = {}


def _register(name: str, description: str) -> Callable[[Callable[[Path], RawDataset]], Callable[[Path], RawDataset]]:
    def decorator(func: Callable[[Path], RawDataset]) -> Callable[[Path], RawDataset]:
        _REGISTRY[name] = _Converter(name, description, func)
        return func

    return decorator


def list_datasets() -> dict[str, str]:
    """The dataset keys :func:`convert` accepts, each with a one-line description, in registration order."""
    return {name: conv.description for name, conv in _REGISTRY.items()}


# ------------------------------------------------------------------------------------------------- shared helpers
def _split_ext(name: str) -> tuple[str, str]:
    """``("img0001", ".nii.gz")`` from ``"img0001.nii.gz"``: double extensions count as one."""
    if name.lower().endswith(".nii.gz"):
        return name[: -len(".nii.gz")], name[-len(".nii.gz") :]
    stem, ext = os.path.splitext(name)
    return stem, ext


def _stem(path: Path) -> str:
    return _split_ext(path.name)[0]


def _visible(path: Path) -> bool:
    # "._x.nii.gz" AppleDouble files sit next to the real ones in the MSD tar files and are not NIfTI
    return not path.name.startswith(".") and path.name != "__MACOSX"


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if _visible(p))
    except OSError:
        return []


def _listing(folder: Path) -> str:
    """The visible entries of ``folder`` for an error message (folders end with ``/``)."""
    names = [p.name + ("/" if p.is_dir() else "") for p in _children(folder)]
    if not names:
        return "nothing"
    shown = ", ".join(names[:20])
    return shown + (f", ... ({len(names)} entries)" if len(names) > 20 else "")


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown + (f" ... and {len(items) - _MAX_NAMED} more" if len(items) > _MAX_NAMED else "")


def _child(folder: Path, *names: str) -> Path | None:
    """The first entry of ``folder`` matching one of ``names`` (case-insensitive; ``"a/b"`` walks sub-folders)."""
    for name in names:
        current: Path | None = folder
        for part in name.split("/"):
            wanted = part.lower()
            current = next((p for p in _children(current) if p.name.lower() == wanted), None)
            if current is None:
                break
        if current is not None:
            return current
    return None


def _unnest(folder: Path) -> Path:
    """``X/X/...`` to ``X/...``: some unzip tools put a zip's same-named top folder inside the target folder."""
    kids = _children(folder)
    if len(kids) == 1 and kids[0].is_dir() and kids[0].name.lower() == folder.name.lower():
        return kids[0]
    return folder


def _locate_root(
    src: Path, required: Sequence[Sequence[str]], layout: str, prefer_name: str | None = None, max_depth: int = 2
) -> Path:
    """The folder at or below ``src`` (up to ``max_depth`` levels) that holds every ``required`` entry.

    Users point ``--src`` at the extracted download or at the folder above it, so wrapper folders
    (``Kvasir-SEG/``, ``RawData/``, ``amos22/``) are looked through. Each requirement lists alternative names.

    Raises:
        FileNotFoundError: no folder qualifies; the message says what was expected and what ``src`` holds.
    """
    candidates: list[Path] = []
    level = [src]
    for _ in range(max_depth + 1):
        for folder in level:
            if all(_child(folder, *alternatives) is not None for alternatives in required):
                candidates.append(folder)
        level = [p for folder in level for p in _children(folder) if p.is_dir()]
    if candidates:
        if prefer_name is not None:
            for folder in candidates:
                if folder.name.lower() == prefer_name.lower():
                    return folder
        return candidates[0]
    expected = " and ".join(" or ".join(f"{a}/" if "." not in a else a for a in alts) for alts in required)
    missing = [" or ".join(alts) for alts in required if _child(src, *alts) is None]
    raise FileNotFoundError(
        f"{src} does not look like {layout}: expected {expected} in it (or in a sub-folder up to {max_depth} levels "
        f"down). Missing in {src}: {', '.join(missing)}. Found: {_listing(src)}."
    )


def _list_files(folder: Path, suffixes: Sequence[str], recursive: bool = False) -> list[Path]:
    """Visible files in ``folder`` whose name ends with one of ``suffixes`` (case-insensitive), sorted by path."""
    lowered = tuple(s.lower() for s in suffixes)
    found: list[Path] = []
    for path in _children(folder):
        if path.is_dir():
            if recursive:
                found.extend(_list_files(path, suffixes, recursive=True))
        elif path.name.lower().endswith(lowered):
            found.append(path)
    return sorted(found)


def _pair_by_stem(
    images: Iterable[Path],
    labels: Iterable[Path],
    where: str,
    label_key: Callable[[str], str] = lambda stem: stem,
    image_key: Callable[[str], str] = lambda stem: stem,
) -> list[Case]:
    """One :class:`Case` per image, with the label whose key matches the image's key.

    Args:
        images: image files; the case id is ``image_key(stem)``.
        labels: label files, matched on ``label_key(stem)`` (e.g. strip ``_segmentation``).
        where: what the files are, for error messages (e.g. ``"Kvasir-SEG images/ and masks/"``).

    Raises:
        ValueError: an image has no label (each offending image is named), or two files share a key.
    """
    by_key: dict[str, Path] = {}
    for path in labels:
        key = label_key(_stem(path))
        if key in by_key:
            raise ValueError(f"{where}: two masks for case {key!r}: {by_key[key]} and {path}.")
        by_key[key] = path
    cases: list[Case] = []
    seen: dict[str, Path] = {}
    unmatched: list[str] = []
    for path in images:
        key = image_key(_stem(path))
        if key in seen:
            raise ValueError(f"{where}: two images for case {key!r}: {seen[key]} and {path}.")
        seen[key] = path
        label = by_key.pop(key, None)
        if label is None:
            unmatched.append(str(path))
        cases.append(Case(key, [path], label))
    if unmatched:
        raise ValueError(f"{where}: {len(unmatched)} image(s) without a mask: {_names(unmatched)}.")
    if by_key:  # a stray mask does not block the conversion, but usually means a partial download
        logger.warning("%s: %d mask(s) without an image, ignored: %s", where, len(by_key), _names(sorted(by_key)))
    return cases


def _images_only(images: Iterable[Path], image_key: Callable[[str], str] = lambda stem: stem) -> list[Case]:
    return [Case(image_key(_stem(p)), [p]) for p in images]


def assign_folds(case_ids: Iterable[str], num_folds: int = NUM_FOLDS, seed: int = FOLD_SEED) -> dict[str, int]:
    """Deterministic k-fold split: ``{case_id: fold}``.

    Ids are sorted (so the input order does not matter), shuffled with ``numpy.random.RandomState(seed)`` and dealt
    round robin, so fold sizes differ by at most one.

    Raises:
        ValueError: ``num_folds < 1`` or duplicate ids.
    """
    ids = list(case_ids)
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}.")
    dupes = sorted(k for k, n in Counter(ids).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate case ids: {_names(dupes)}.")
    ordered = sorted(ids)
    perm = np.random.RandomState(seed).permutation(len(ordered))
    return {ordered[j]: position % num_folds for position, j in enumerate(perm)}


def _relpath(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` with ``/`` separators (absolute if no relative path exists, e.g. other drive)."""
    try:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(base))).as_posix()
    except ValueError:
        return Path(os.path.abspath(path)).as_posix()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _labels_to_nnunet(labels: dict) -> dict[str, int]:
    """MSD ``{"0": "background"}`` or nnU-Net ``{"background": 0}`` to nnU-Net's ``{"background": 0}``."""
    if labels and all(str(k).strip().isdigit() for k in labels):
        return {str(name): int(value) for value, name in sorted(labels.items(), key=lambda kv: int(kv[0]))}
    return {str(name): int(value) for name, value in labels.items()}


def _most_common_ending(paths: Iterable[Path]) -> str | None:
    endings = Counter(_split_ext(p.name)[1].lower() for p in paths)
    return endings.most_common(1)[0][0] if endings else None


# ---------------------------------------------------------------------------------------------------- Kvasir-SEG
@_register("kvasir_seg", "Kvasir-SEG (Simula, 2020): 1000 colonoscopy RGB frames (JPEG) with binary polyp masks")
def _kvasir_seg(src: Path) -> RawDataset:
    """Kvasir-SEG: ``Kvasir-SEG/images/<id>.jpg`` with ``Kvasir-SEG/masks/<id>.jpg``; no official split.

    Masks are JPEG, so values near 0 and 255 carry compression noise: foreground is ``mask > 127``.
    """
    root = _locate_root(src, [("images",), ("masks",)], "the Kvasir-SEG release (images/*.jpg, masks/*.jpg)")
    exts = (".jpg", ".jpeg", ".png")
    training = _pair_by_stem(_list_files(_child(root, "images"), exts), _list_files(_child(root, "masks"), exts),
                             where=f"Kvasir-SEG {root}/images and masks")  # fmt: skip
    meta = {
        "name": "Kvasir-SEG",
        "description": "Polyp segmentation in colonoscopy frames (Baerum Hospital, Norway); masks drawn by a medical "
        "doctor and verified by a gastroenterologist.",
        "reference": "Jha et al., Kvasir-SEG: A Segmented Polyp Dataset, MMM 2020. "
        "https://datasets.simula.no/kvasir-seg/",
        "licence": "Research and educational use only; commercial use needs prior written permission (Simula). "
        "Cite Jha et al. 2020.",
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "polyp": 1},
        "label_threshold": 127,
        "label_convention": "masks are JPEG 0/255 with compression noise; polyp = mask > 127",
    }
    return RawDataset(root, meta, training)


# --------------------------------------------------------------------------------------------- ISIC 2018 Task 1
_ISIC_FOLDERS = {
    "training": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "testing": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}


def _isic_label_key(stem: str) -> str:
    return re.sub(r"_segmentation$", "", stem, flags=re.IGNORECASE)


@_register("isic2018", "ISIC 2018 Task 1: dermoscopy RGB images (JPEG) with binary lesion masks (PNG 0/255)")
def _isic2018(src: Path) -> RawDataset:
    """ISIC 2018 Task 1: ``ISIC2018_Task1-2_<Split>_Input/ISIC_<id>.jpg`` with
    ``ISIC2018_Task1_<Split>_GroundTruth/ISIC_<id>_segmentation.png``; Training is required, Validation and Test are
    used when present (without their GroundTruth folder they become image-only lists).
    """
    train_in, train_gt = _ISIC_FOLDERS["training"]
    root = _locate_root(src, [(train_in,), (train_gt,)], "the ISIC 2018 Task 1 release")
    splits: dict[str, list[Case]] = {}
    for split, (input_name, gt_name) in _ISIC_FOLDERS.items():
        input_dir = _child(root, input_name)
        if input_dir is None:
            continue
        images = _list_files(_unnest(input_dir), (".jpg", ".jpeg"))  # skips the LICENSE/ATTRIBUTION .txt files
        gt_dir = _child(root, gt_name)
        if gt_dir is None:
            if split == "training":
                raise FileNotFoundError(f"{root}/{gt_name} is missing (found: {_listing(root)}).")
            splits[split] = _images_only(images)
            continue
        masks = _list_files(_unnest(gt_dir), (".png",))
        splits[split] = _pair_by_stem(images, masks, where=f"ISIC 2018 {input_name} / {gt_name}",
                                      label_key=_isic_label_key)  # fmt: skip
    meta = {
        "name": "ISIC2018_Task1",
        "description": "Skin lesion boundary segmentation in dermoscopic images (ISIC 2018 challenge, Task 1).",
        "reference": "Codella et al., arXiv:1902.03368 (2019); Tschandl et al., HAM10000, Sci. Data 5:180161 (2018). "
        "https://challenge.isic-archive.com/data/#2018",
        "licence": "CC BY-NC 4.0 (see the LICENSE.txt shipped in the download); cite Codella et al. and "
        "Tschandl et al.",
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "lesion": 1},
        "label_threshold": 127,
        "label_convention": "masks are single-channel PNG, 0 = background, 255 = lesion; lesion = mask > 127",
    }
    return RawDataset(root, meta, splits["training"], splits.get("validation", []), splits.get("testing", []))


# -------------------------------------------------------------------------------------------------------- REFUGE2
_REFUGE_SPLITS = {
    "training": ("train", "training", "training400"),
    "validation": ("val", "valid", "validation", "validation400"),
    "testing": ("test", "testing", "test400"),
}
_REFUGE_IMAGE_DIRS = ("images", "image", "imgs", "img")
_REFUGE_MASK_DIRS = ("masks", "mask", "disc_cup_masks", "disc_masks", "gts", "gt", "labels", "annotations")


@_register("refuge2", "REFUGE2: colour fundus photographs (JPEG) with optic disc and cup masks (BMP 0/128/255)")
def _refuge2(src: Path) -> RawDataset:
    """REFUGE2: ``<Split>/<Images>/*.jpg`` with ``<Split>/<Masks>/*.bmp`` (or ``.png``), searched recursively.

    Accepted (case-insensitive) split folders: ``train|training|training400``, ``val|valid|validation|validation400``,
    ``test|testing|test400``; image folders ``images|image|imgs|img``; mask folders
    ``masks|mask|Disc_Cup_Masks|Disc_Masks|gts|gt|labels|annotations``. Masks: 0 = cup, 128 = disc rim,
    255 = background, mapped to background 0, optic_disc 1 (the rim: disc minus cup), optic_cup 2. The whole optic
    disc is labels {1, 2}.
    """
    layout = ("the REFUGE2 release (a train/ folder, optional val/ and test/, each with images/ and masks/; "
              "accepted names: " + ", ".join("|".join(v) for v in _REFUGE_SPLITS.values()) + ")")  # fmt: skip
    root = _locate_root(src, [_REFUGE_SPLITS["training"]], layout)
    splits: dict[str, list[Case]] = {}
    for split, aliases in _REFUGE_SPLITS.items():
        split_dir = _child(root, *aliases)
        if split_dir is None:
            continue
        image_dir = _child(split_dir, *_REFUGE_IMAGE_DIRS)
        mask_dir = _child(split_dir, *_REFUGE_MASK_DIRS)
        if image_dir is None:
            raise FileNotFoundError(f"{split_dir} has no image folder ({'|'.join(_REFUGE_IMAGE_DIRS)}); "
                                    f"found: {_listing(split_dir)}.")  # fmt: skip
        images = _list_files(image_dir, (".jpg", ".jpeg", ".png"), recursive=True)  # REFUGE1 has Glaucoma/ sub-folders
        if mask_dir is None:
            if split == "training":
                raise FileNotFoundError(f"{split_dir} has no mask folder ({'|'.join(_REFUGE_MASK_DIRS)}); "
                                        f"found: {_listing(split_dir)}.")  # fmt: skip
            splits[split] = _images_only(images)
            continue
        masks = _list_files(mask_dir, (".bmp", ".png"), recursive=True)
        splits[split] = _pair_by_stem(images, masks, where=f"REFUGE2 {image_dir} / {mask_dir}")
    meta = {
        "name": "REFUGE2",
        "description": "Optic disc and cup segmentation in colour fundus photographs (Retinal Fundus Glaucoma "
        "Challenge, 2nd edition).",
        "reference": "Orlando et al., Med. Image Anal. 59:101570 (2020); Fang et al., arXiv:2202.08994 (2022). "
        "https://refuge.grand-challenge.org/",
        "licence": "Research use under the REFUGE challenge data terms (see the download page); cite Orlando et al. "
        "and Fang et al.",
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "optic_disc": 1, "optic_cup": 2},
        "label_mapping": {"255": 0, "128": 1, "0": 2},
        "label_convention": "raw masks: 255 = background, 128 = optic disc rim, 0 = optic cup; after label_mapping "
        "1 = disc rim (disc minus cup), 2 = cup, whole disc = {1, 2}",
    }
    return RawDataset(root, meta, splits["training"], splits.get("validation", []), splits.get("testing", []))


# ----------------------------------------------------------------------------------------------------- BraTS 2021
_BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")  # nnU-Net Dataset137 channel order: _0000 = T1 ... _0003 = FLAIR


def _nifti(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{ext}" for ext in _NIFTI if (folder / f"{stem}{ext}").is_file()), None)


def _brats_case_dirs(src: Path, max_depth: int = 3) -> list[Path]:
    """Folders named like their files (``X/X_flair.nii.gz``) at or below ``src``; BraTS zips add 1-2 wrappers."""
    found: list[Path] = []
    level = [src]
    for _ in range(max_depth + 1):
        nxt: list[Path] = []
        for folder in level:
            if any(_nifti(folder, f"{folder.name}_{m}") for m in (*_BRATS_MODALITIES, "seg")):
                found.append(folder)  # a case folder: do not descend
            else:
                nxt.extend(p for p in _children(folder) if p.is_dir())
        level = nxt
    return sorted(found, key=lambda p: p.name)


@_register("brats2021", "BraTS 2021 Task 1: glioma MRI (T1, T1ce, T2, FLAIR NIfTI) with tumour sub-region labels")
def _brats2021(src: Path) -> RawDataset:
    """BraTS 2021: one folder per case ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz``.

    ``image`` lists the modalities in the order **T1, T1ce, T2, FLAIR** (nnU-Net's Dataset137 order). Cases with a
    ``_seg`` file are training cases; cases without one are the validation set when they sit under a folder whose
    name contains "valid" (the official ``..._ValidationData``), otherwise an error. Labels 0, 1 (necrotic tumour
    core), 2 (peritumoral edema), 4 (GD-enhancing tumour): ``label_mapping`` ``{"4": 3}`` makes them contiguous.
    """
    case_dirs = _brats_case_dirs(src)
    if not case_dirs:
        raise FileNotFoundError(
            f"{src} does not look like the BraTS 2021 release: expected case folders such as "
            f"BraTS2021_00000/BraTS2021_00000_{{t1,t1ce,t2,flair,seg}}.nii.gz (up to 3 levels down). "
            f"Found: {_listing(src)}."
        )
    training: list[Case] = []
    validation: list[Case] = []
    problems: list[str] = []
    for case_dir in case_dirs:
        name = case_dir.name
        images = [_nifti(case_dir, f"{name}_{m}") for m in _BRATS_MODALITIES]
        missing = [f"{name}_{m}.nii.gz" for m, p in zip(_BRATS_MODALITIES, images) if p is None]
        if missing:
            problems.append(f"{case_dir}: missing {', '.join(missing)}")
            continue
        seg = _nifti(case_dir, f"{name}_seg")
        if seg is not None:
            training.append(Case(name, images, seg))
        elif any("valid" in part.lower() for part in case_dir.relative_to(src).parts[:-1] + (src.name,)):
            validation.append(Case(name, images))
        else:
            problems.append(f"{case_dir}: no {name}_seg.nii.gz (image without mask)")
    if problems:
        raise ValueError(f"BraTS 2021: {len(problems)} incomplete case(s): {_names(problems)}.")
    if not training and validation:
        raise ValueError(f"BraTS 2021: {src} holds {len(validation)} validation cases (no _seg files) but no training "
                         "cases; point --src at the training data (or at the folder holding both).")  # fmt: skip
    meta = {
        "name": "BraTS2021",
        "description": "Adult glioma sub-region segmentation in multi-parametric MRI (RSNA-ASNR-MICCAI BraTS 2021, "
        "Task 1); skull-stripped, co-registered to SRI24, 1 mm isotropic.",
        "reference": "Baid et al., arXiv:2107.02314 (2021); Menze et al., IEEE TMI 34(10) (2015); Bakas et al., "
        "Sci. Data 4:170117 (2017). https://www.synapse.org/brats2021",
        "licence": "BraTS 2021 data-use terms of the Synapse release (registration; research use); cite Baid et al., "
        "Menze et al. and Bakas et al.",
        "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
        "labels": {"background": 0, "necrotic_tumour_core": 1, "peritumoral_edema": 2, "enhancing_tumour": 3},
        "label_mapping": {"4": 3},
        "label_convention": "raw labels 0, 1 = NCR, 2 = ED, 4 = ET; label_mapping 4 -> 3 gives contiguous classes",
        "image_files_order": [f"_{m}" for m in _BRATS_MODALITIES],
        "tensorImageSize": "3D",
    }
    return RawDataset(src, meta, training, validation)


# --------------------------------------------------------------------------------------------------------- AMOS22
# labels of AMOS' own dataset.json, typos included ("arota"), so names match the official release
_AMOS_LABELS = {
    "0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
    "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas",
    "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum", "14": "bladder",
    "15": "prostate/uterus",
}  # fmt: skip
_AMOS_MR_FROM = 501  # AMOS numbers its CT scans 1-500 and its MRI scans above 500


def _amos_modality(case_id: str) -> str:
    digits = re.search(r"(\d+)$", case_id)
    return "MR" if digits and int(digits.group(1)) >= _AMOS_MR_FROM else "CT"


@_register("amos22", "AMOS22: abdominal CT and MRI (NIfTI) with 15 organ labels")
def _amos22(src: Path) -> RawDataset:
    """AMOS22: ``imagesTr/labelsTr`` (required), ``imagesVa/labelsVa``, ``imagesTs`` (``labelsTs`` if present), files
    ``amos_XXXX.nii.gz``. Label names come from the release's own ``dataset.json`` when present. Every entry gets
    ``"modality": "CT"`` (ids up to 500) or ``"MR"`` (ids above 500).
    """
    root = _locate_root(src, [("imagesTr",), ("labelsTr",)], "the AMOS22 release (imagesTr/, labelsTr/, imagesVa/, "
                        "labelsVa/, imagesTs/, dataset.json)")  # fmt: skip
    labels = _AMOS_LABELS
    own_json = _child(root, "dataset.json")
    if own_json is not None and own_json.is_file():
        labels = _read_json(own_json).get("labels") or labels
    splits: dict[str, list[Case]] = {}
    for split, (image_name, label_name) in _SPLIT_DIRS.items():
        image_dir = _child(root, image_name)
        if image_dir is None:
            continue
        images = _list_files(image_dir, _NIFTI)
        label_dir = _child(root, label_name)
        if label_dir is None:
            splits[split] = _images_only(images)
        else:
            splits[split] = _pair_by_stem(images, _list_files(label_dir, _NIFTI),
                                          where=f"AMOS22 {image_name}/{label_name}")  # fmt: skip
        for case in splits[split]:
            case.extra["modality"] = _amos_modality(case.case_id)
    labelled = splits.get("training", []) + splits.get("validation", [])
    all_ct = all(c.extra["modality"] == "CT" for c in labelled)
    meta = {
        "name": "AMOS22",
        "description": "Abdominal multi-organ segmentation in CT and MRI (MICCAI 2022 AMOS challenge).",
        "reference": "Ji et al., AMOS, NeurIPS 2022 Datasets and Benchmarks (arXiv:2206.08023). "
        "https://amos22.grand-challenge.org/ ; https://zenodo.org/record/7262581",
        "licence": "CC BY 4.0 (Zenodo record 7262581); cite Ji et al. 2022.",
        # nnU-Net's Dataset219 name for mixed CT/MR input (z-score normalisation instead of CT windowing)
        "channel_names": {"0": "CT" if all_ct else "either_CT_or_MR"},
        "labels": _labels_to_nnunet(labels),
        "label_convention": "integer labels 0-15 as in the release's dataset.json; per-case modality: ids <= 500 CT, "
        "> 500 MR",
        "tensorImageSize": "3D",
    }
    return RawDataset(root, meta, splits["training"], splits.get("validation", []), splits.get("testing", []))


# ----------------------------------------------------------------------------------------------------------- BTCV
_BTCV_LABELS = {
    "background": 0, "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "esophagus": 5,
    "liver": 6, "stomach": 7, "aorta": 8, "inferior_vena_cava": 9, "portal_and_splenic_vein": 10, "pancreas": 11,
    "right_adrenal_gland": 12, "left_adrenal_gland": 13,
}  # fmt: skip


def _btcv_key(stem: str) -> str:
    return re.sub(r"^(img|label)", "", stem, flags=re.IGNORECASE)


@_register("btcv", "BTCV Abdomen (MICCAI 2015 Beyond the Cranial Vault): 30 labelled CT (NIfTI), 13 organs")
def _btcv(src: Path) -> RawDataset:
    """BTCV Abdomen ``RawData``: ``Training/img/imgXXXX.nii.gz`` with ``Training/label/labelXXXX.nii.gz`` and
    ``Testing/img/imgXXXX.nii.gz`` (no labels). The case id is the image stem (``img0001``).
    """
    root = _locate_root(src, [("Training/img",), ("Training/label",)],
                        "the BTCV Abdomen RawData release (Training/img/, Training/label/, Testing/img/)")  # fmt: skip
    training = _pair_by_stem(_list_files(_child(root, "Training/img"), _NIFTI),
                             _list_files(_child(root, "Training/label"), _NIFTI),
                             where=f"BTCV {root}/Training/img and Training/label", label_key=_btcv_key,
                             image_key=_btcv_key)  # fmt: skip
    for case in training:  # keep the release's names as ids: img0001, not 0001
        case.case_id = _stem(case.images[0])
    test_dir = _child(root, "Testing/img")
    testing = _images_only(_list_files(test_dir, _NIFTI)) if test_dir is not None else []
    meta = {
        "name": "BTCV_Abdomen",
        "description": "Multi-organ segmentation in abdominal CT (MICCAI 2015 Multi-Atlas Labeling Beyond the "
        "Cranial Vault challenge, Abdomen).",
        "reference": "Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault workshop. "
        "https://www.synapse.org/#!Synapse:syn3193805",
        "licence": "Synapse registration and the challenge's data-use terms (see syn3193805); cite Landman et al. "
        "2015.",
        "channel_names": {"0": "CT"},
        "labels": dict(_BTCV_LABELS),
        "label_convention": "integer labels 0-13 (standard BTCV organ order)",
        "tensorImageSize": "3D",
    }
    return RawDataset(root, meta, training, testing=testing)


# ------------------------------------------------------------------------------- Medical Segmentation Decathlon
_MSD_TASKS = {
    "msd_task01_braintumour": ("Task01_BrainTumour", "glioma MRI, 4 channels in one 4D NIfTI, 3 tumour labels"),
    "msd_task02_heart": ("Task02_Heart", "mono-modal MRI, left atrium"),
    "msd_task03_liver": ("Task03_Liver", "portal-venous CT, liver and tumour"),
    "msd_task04_hippocampus": ("Task04_Hippocampus", "mono-modal MRI, anterior and posterior hippocampus"),
    "msd_task05_prostate": ("Task05_Prostate", "T2 + ADC MRI in one 4D NIfTI, peripheral and transition zone"),
    "msd_task06_lung": ("Task06_Lung", "CT, lung tumours"),
    "msd_task07_pancreas": ("Task07_Pancreas", "portal-venous CT, pancreas and tumour"),
    "msd_task08_hepaticvessel": ("Task08_HepaticVessel", "CT, hepatic vessels and tumour"),
    "msd_task09_spleen": ("Task09_Spleen", "CT, spleen"),
    "msd_task10_colon": ("Task10_Colon", "CT, colon cancer primaries"),
}


def _msd_converter(task: str | None) -> Callable[[Path], RawDataset]:
    """A converter for one Medical Segmentation Decathlon task (``task=None``: any MSD-format task folder)."""

    def convert_msd(src: Path) -> RawDataset:
        layout = f"an MSD task folder{f' ({task})' if task else ''} with dataset.json, imagesTr/, labelsTr/, imagesTs/"
        root = _locate_root(src, [("dataset.json",), ("imagesTr",), ("labelsTr",)], layout, prefer_name=task)
        if task is not None and re.match(r"Task\d\d_", root.name) and root.name.lower() != task.lower():
            raise ValueError(f"{root} is {root.name}, but this converter expects {task}.")
        own = _read_json(_child(root, "dataset.json"))
        missing = [k for k in ("modality", "labels") if not isinstance(own.get(k), dict)]
        if missing:
            raise ValueError(f"{root}/dataset.json lacks {', '.join(missing)} (not an MSD dataset.json?).")
        training = _pair_by_stem(_list_files(_child(root, "imagesTr"), _NIFTI),
                                 _list_files(_child(root, "labelsTr"), _NIFTI),
                                 where=f"{root.name} imagesTr/labelsTr")  # fmt: skip
        test_dir = _child(root, "imagesTs")
        testing = _images_only(_list_files(test_dir, _NIFTI)) if test_dir is not None else []
        for key, found in (("numTraining", len(training)), ("numTest", len(testing))):
            if isinstance(own.get(key), int) and own[key] != found:  # a partial download still converts
                logger.warning("%s: dataset.json says %s=%d but %d cases were found.", root.name, key, own[key], found)
        meta = {
            "name": str(own.get("name", root.name)).strip(),
            "description": str(own.get("description", "")).strip(),
            "reference": str(own.get("reference", "")).strip(),
            "licence": str(own.get("licence", own.get("license", ""))).strip(),
            "channel_names": {str(k): str(v) for k, v in sorted(own["modality"].items(), key=lambda kv: int(kv[0]))},
            "labels": _labels_to_nnunet(own["labels"]),
            "label_convention": "integer labels as in the task's dataset.json",
        }
        if "release" in own or "relase" in own:  # several MSD dataset.json files spell it "relase"
            meta["release"] = str(own.get("release", own.get("relase"))).strip()
        if "tensorImageSize" in own:
            meta["tensorImageSize"] = own["tensorImageSize"]
        return RawDataset(root, meta, training, testing=testing)

    return convert_msd


for _name, (_task, _blurb) in _MSD_TASKS.items():
    _register(_name, f"Medical Segmentation Decathlon {_task}: {_blurb}")(_msd_converter(_task))
_register("msd", "any Medical Segmentation Decathlon-format task folder (dataset.json, imagesTr, labelsTr, imagesTs)")(
    _msd_converter(None)
)
del _name, _task, _blurb


# ------------------------------------------------------------------------------------------------------ convert
def _check_unique(raw: RawDataset) -> None:
    for split in _SPLITS:
        ids = [c.case_id for c in getattr(raw, split)]
        dupes = sorted(k for k, n in Counter(ids).items() if n > 1)
        if dupes:
            raise ValueError(f"{raw.meta['name']}: duplicate case ids in {split}: {_names(dupes)}.")


def _materialise(raw: RawDataset, dst: Path, link: bool) -> RawDataset:
    """Copy (or symlink) every file into ``dst/imagesTr/<id>_0000.ext``, ``dst/labelsTr/<id>.ext`` and so on."""
    root, out = raw.root.resolve(), dst.resolve()
    if out == root or root in out.parents:
        raise ValueError(f"--dst {dst} is inside the raw folder {raw.root}; copy/link needs an output folder "
                         "outside it.")  # fmt: skip
    jobs: list[tuple[Path, Path]] = []
    moved: dict[str, list[Case]] = {}
    for split in _SPLITS:
        image_dir, label_dir = _SPLIT_DIRS[split]
        moved[split] = []
        for case in getattr(raw, split):
            images = [dst / image_dir / f"{case.case_id}_{i:04d}{_split_ext(p.name)[1]}"
                      for i, p in enumerate(case.images)]  # fmt: skip
            label = dst / label_dir / f"{case.case_id}{_split_ext(case.label.name)[1]}" if case.label else None
            jobs.extend(zip(case.images, images))
            if label is not None:
                jobs.append((case.label, label))
            moved[split].append(dataclasses.replace(case, images=images, label=label))
    verb = "linking" if link else "copying"
    # tqdm decides by itself (disable=None: only on a terminal) for large trees; small ones stay silent
    progress = tqdm(jobs, desc=f"{verb} {raw.meta['name']}", unit="file", disable=None if len(jobs) > 100 else True)
    for source, target in progress:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        if link:
            os.symlink(os.path.abspath(source), target)
        else:
            shutil.copy2(source, target)
    return dataclasses.replace(raw, **moved)


def _entry(case: Case, base: Path, fold: int | None) -> dict:
    images = [_relpath(p, base) for p in case.images]
    entry: dict = {"image": images if len(images) > 1 else images[0]}
    if case.label is not None:
        entry["label"] = _relpath(case.label, base)
    if fold is not None:
        entry["fold"] = fold
    entry.update(case.extra)
    return entry


def convert(
    dataset: str,
    src: str | Path,
    dst: str | Path,
    copy: bool = False,
    link: bool = False,
    *,
    paths_relative_to: str | Path | None = None,
    num_folds: int = NUM_FOLDS,
    seed: int = FOLD_SEED,
) -> Path:
    """Convert an official raw release into ``dst/datalist.json`` and ``dst/dataset.json``.

    Args:
        dataset: a key of :func:`list_datasets`, e.g. ``"kvasir_seg"`` or ``"msd_task09_spleen"``.
        src: the extracted download (or a folder up to two levels above its root).
        dst: output folder, created if needed.
        copy: copy the files into an nnU-Net-like ``imagesTr/labelsTr`` (``imagesVa/labelsVa``,
            ``imagesTs/labelsTs``) tree under ``dst``; images become ``<id>_0000<ext>`` (``_0001``... for further
            files of a multi-file case), labels ``<id><ext>``. Files are copied as they are (no format conversion, no
            label remapping: ``label_mapping`` / ``label_threshold`` still apply).
        link: as ``copy`` but with symbolic links to the raw files.
        paths_relative_to: write paths relative to this folder instead of ``dst`` (e.g. the raw root, for a datalist
            to share that is used with ``--dataset_dir RAW``).
        num_folds: cross-validation folds.
        seed: seed of the fold shuffle.

    Returns:
        the path of the written ``datalist.json``.

    Raises:
        ValueError: unknown ``dataset`` (the message lists the known ones), both ``copy`` and ``link``, an image
            without a mask (named), no training case found, duplicate case ids, or ``dst`` would overwrite a
            ``dataset.json`` this converter did not write (e.g. the MSD task's own).
        FileNotFoundError: ``src`` does not exist, or expected sub-folders are missing (the message says which
            and lists what ``src`` holds).
    """
    key = str(dataset).strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {', '.join(_REGISTRY)}.")
    if copy and link:
        raise ValueError("choose copy=True or link=True, not both.")
    src_path = Path(src).expanduser()
    if not src_path.exists():
        raise FileNotFoundError(f"source folder {src_path} does not exist.")
    if not src_path.is_dir():
        raise FileNotFoundError(f"source {src_path} is not a folder (extract the download first).")
    src_path = src_path.absolute()
    converter = _REGISTRY[key]
    raw = converter.func(src_path)
    if not raw.training:
        raise ValueError(f"{key}: no training case found in {raw.root} (found: {_listing(raw.root)}).")
    _check_unique(raw)

    out = Path(dst).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    dataset_json_path = out / "dataset.json"
    if dataset_json_path.is_file() and "converted_by" not in _read_json(dataset_json_path):
        raise ValueError(f"{dataset_json_path} exists and was not written by this converter (the release's own "
                         "dataset.json?); choose another --dst.")  # fmt: skip
    if copy or link:
        raw = _materialise(raw, out, link=link)
    base = Path(paths_relative_to).expanduser().absolute() if paths_relative_to is not None else out

    folds = assign_folds([c.case_id for c in raw.training], num_folds=num_folds, seed=seed)
    meta = raw.meta
    conventions = {k: meta[k] for k in ("label_threshold", "label_mapping", "label_convention", "image_files_order")
                   if k in meta}  # fmt: skip
    counts = {"numTraining": len(raw.training)}
    if raw.validation:
        counts["numValidation"] = len(raw.validation)
    if raw.testing:
        counts["numTest"] = len(raw.testing)

    label_files = [c.label for c in raw.training if c.label is not None]
    file_ending = _most_common_ending(p for c in raw.training for p in c.images)
    label_ending = _most_common_ending(label_files)
    dataset_json = {
        "name": meta["name"],
        "description": meta["description"],
        "reference": meta["reference"],
        "licence": meta["licence"],
        **({"release": meta["release"]} if "release" in meta else {}),
        **({"tensorImageSize": meta["tensorImageSize"]} if "tensorImageSize" in meta else {}),
        "channel_names": meta["channel_names"],
        "labels": meta["labels"],
        **counts,
        "file_ending": file_ending,
        **({"label_file_ending": label_ending} if label_ending and label_ending != file_ending else {}),
        **conventions,
        "converted_by": f"medsegdiff convert {key}",
    }
    datalist: dict = {
        "name": meta["name"],
        "dataset": key,
        "channel_names": meta["channel_names"],
        "labels": meta["labels"],
        **conventions,
        "num_folds": num_folds,
        "fold_seed": seed,
        "paths_relative_to": "datalist folder" if paths_relative_to is None else "dataset root (--dataset_dir)",
        **counts,
        "training": [_entry(c, base, folds[c.case_id]) for c in sorted(raw.training, key=lambda c: c.case_id)],
    }
    for split in ("validation", "testing"):
        cases = getattr(raw, split)
        if cases:
            datalist[split] = [_entry(c, base, None) for c in sorted(cases, key=lambda c: c.case_id)]

    write_json_atomic(dataset_json_path, dataset_json)
    datalist_path = out / "datalist.json"
    write_json_atomic(datalist_path, datalist)
    logger.info("%s: %s written (%s)", key, datalist_path, ", ".join(f"{k}={v}" for k, v in counts.items()))
    return datalist_path
