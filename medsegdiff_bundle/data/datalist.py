"""Datalists: read MSD/Decathlon-style JSON, split folds, and check cases before any work starts.

A datalist is a JSON file such as::

    {
        "training": [
            {"image": "imagesTr/case_000.nii.gz", "label": "labelsTr/case_000.nii.gz", "fold": 0},
            {"image": ["imagesTr/c1_flair.nii.gz", "imagesTr/c1_t1c.nii.gz"], "label": "labelsTr/c1.nii.gz", "fold": 1}
        ],
        "test": [{"image": "imagesTs/case_100.nii.gz"}]
    }

Relative paths are resolved against the datalist's folder (or ``base_dir``). :func:`validate_cases` reads only the
file headers (no voxel data), so a whole dataset can be checked in seconds and every problem reported at once.
Headers are read with SimpleITK; where it is not installed (a slim GPU image, say), 2D raster files (PNG, JPEG,
BMP, TIFF) are read with PIL and other files are only checked to exist.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from monai.data import load_decathlon_datalist
from tqdm.auto import tqdm

from ..utils import atomic_open, read_json_object

__all__ = [
    "case_name",
    "cases_from_folder",
    "check_case",
    "find_cases",
    "load_datalist",
    "output_name",
    "output_root",
    "select_fold",
    "strip_image_extension",
    "validate_cases",
]

logger = logging.getLogger(__name__)

# longest first, so ".nii.gz" wins over ".gz"
_KNOWN_EXTENSIONS = (
    ".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".bmp",
    ".tif", ".tiff", ".npy", ".npz", ".gz",
)  # fmt: skip
# formats MONAI can load but SimpleITK cannot: existence is all we check for them
_NO_HEADER_CHECK = (".npy", ".npz")
# 2D raster formats PIL reads the header of, used when SimpleITK is not installed
_PIL_FORMATS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_datalist(
    datalist: str | Path, data_list_key: str = "training", base_dir: str | Path | None = None
) -> list[dict]:
    """Read an MSD/Decathlon-style JSON datalist into case dicts with absolute paths.

    Args:
        datalist: path to the JSON file.
        data_list_key: which list to read, e.g. ``"training"``, ``"validation"`` or ``"test"``.
        base_dir: folder that relative paths are resolved against; defaults to the datalist's folder.

    Returns:
        one dict per case; ``image``/``label`` values (a path or a list of paths, e.g. one per MRI modality) are
        absolute. Other values are resolved only when the resolved path exists (MONAI's rule), e.g. ``fold`` stays
        an int.

    Raises:
        FileNotFoundError: the datalist does not exist.
        ValueError: the datalist is not valid JSON, is not a JSON object, lacks ``data_list_key`` or that entry is
            not a list.
    """
    path = Path(datalist).expanduser()
    # parse here too so that errors name the file and say what is wrong (MONAI's would be a bare JSONDecodeError)
    data = read_json_object(path, "Datalist file")
    if data_list_key not in data:
        raise ValueError(
            f"Datalist file {str(path)!r} has no {data_list_key!r} list; its keys are {sorted(data)}."
        )
    if not isinstance(data[data_list_key], list):
        raise ValueError(f"{data_list_key!r} in datalist file {str(path)!r} must be a list.")
    if not data[data_list_key]:
        return []  # MONAI indexes [0] of a "test" list to detect its format, which fails on an empty list
    # an absolute base makes every resolved path absolute, whatever the working directory
    base = Path(base_dir).expanduser() if base_dir is not None else path.parent
    try:
        return load_decathlon_datalist(path, is_segmentation=True, data_list_key=data_list_key, base_dir=base.resolve())
    except TypeError as e:
        raise ValueError(f"Bad entry in {data_list_key!r} of datalist file {str(path)!r}: {e}") from e


def select_fold(items: list[dict], fold: int | None, validation: bool) -> list[dict]:
    """nnU-Net-style cross-validation split on the items' integer ``"fold"`` key.

    Args:
        items: case dicts, e.g. from :func:`load_datalist`.
        fold: the held-out fold; ``None`` trains on everything (no validation set).
        validation: ``True`` returns the cases with ``fold == fold``; ``False`` returns all the others (cases without
            a ``"fold"`` key are always training cases).

    Raises:
        ValueError: ``fold`` is given but no item has a ``"fold"`` key, or no item is in that fold.
    """
    if fold is None:
        return [] if validation else list(items)
    folds = sorted({int(item["fold"]) for item in items if "fold" in item})
    if not folds:
        raise ValueError(f"fold={fold} was requested but no case in the datalist has a 'fold' key.")
    if int(fold) not in folds:
        raise ValueError(f"fold={fold} selects no validation case; the datalist has folds {folds}.")
    in_fold = [("fold" in item and int(item["fold"]) == int(fold)) for item in items]
    return [item for item, sel in zip(items, in_fold) if sel == validation]


def strip_image_extension(name: str) -> str:
    """``case.nii.gz`` -> ``case``: drop a known image extension (or any alphabetic one; numeric DICOM UIDs stay)."""
    lower = name.lower()
    for ext in _KNOWN_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    stem, dot, ext = name.rpartition(".")
    # an unknown alphabetic suffix is still an extension (".vtk"); a numeric one is part of a DICOM UID
    return stem if dot and stem and ext.isalpha() else name


def case_name(item: dict, key: str = "image") -> str:
    """A readable case id: the file name of ``item[key]`` (its first file for a list) without extensions.

    Args:
        item: a case dict.
        key: the key whose path names the case.

    Raises:
        KeyError: ``key`` is missing or holds no path.
    """
    value = item.get(key)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if not isinstance(value, (str, os.PathLike)):
        raise KeyError(f"Case has no path under {key!r}: {item}")
    path = Path(value)
    return path.name if path.is_dir() else strip_image_extension(path.name)


def output_name(path: str | os.PathLike, data_root_dir: str | os.PathLike | None = None) -> str:
    """The name a case's outputs carry (``<name>_seg``, ``<name>_overlay.png``, the ``case`` column of metrics.csv):
    :func:`case_name` of ``path``, under its folder relative to ``data_root_dir`` when that is given, as MONAI's
    ``SaveImage(data_root_dir=...)`` places the written files (e.g. ``case_00000/imaging``)."""
    name = case_name({"image": os.fspath(path)})
    if not data_root_dir:
        return name
    folder = os.path.relpath(os.path.dirname(os.path.abspath(path)), os.path.abspath(data_root_dir))
    return name if folder == "." else Path(folder, name).as_posix()


def output_root(cases: Sequence[dict], key: str = "image") -> str | None:
    """The ``data_root_dir`` that keeps the outputs of ``cases`` apart (see :func:`output_name`).

    ``None`` while their :func:`case_name` differ, so outputs lie side by side in one folder; where two coincide
    (one folder per case with the same file names, as KiTS' ``case_00000/imaging.nii.gz``), the deepest folder
    holding all their files, so that each case's outputs go to a sub-folder like its input's instead of
    overwriting one another.

    Args:
        cases: case dicts (e.g. from :func:`find_cases`).
        key: the key whose (first) path names a case.

    Raises:
        KeyError: a case has no path under ``key``.
        ValueError: two cases would still share their outputs (files of one name, with different extensions, in one
            folder), naming them.
    """
    names = [case_name(item, key) for item in cases]
    if len(set(names)) == len(names):
        return None
    paths = [os.path.abspath(_as_paths(item[key])[0]) for item in cases]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    named = [output_name(p, root) for p in paths]
    clashes = sorted({n for n in named if named.count(n) > 1})
    if clashes:
        shared = [p for p, n in zip(paths, named) if n in clashes]
        raise ValueError(f"{len(shared)} cases would write the same output files ({', '.join(clashes[:5])}): "
                         f"{', '.join(shared[:6])}; rename them so that their names differ without extension.")
    return root


def _as_paths(value) -> list[str] | None:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, (str, os.PathLike)) for v in values):
        return None
    return [os.fspath(v) for v in values]


def _sitk_message(e: Exception) -> str:
    # SimpleITK errors span lines and start with a C++ source location; keep the part a user can act on
    text = str(e)
    if "ERROR:" in text:
        text = text.split("ERROR:", 1)[1]
    return " ".join(text.split())


def _simpleitk():
    """The SimpleITK module, or ``None`` where it is not installed (imported here, not at the top, so that the
    package imports without it). A placeholder module without its readers counts as not installed."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    return sitk if hasattr(sitk, "ImageFileReader") else None


def _read_size_pil(path: str) -> tuple[tuple[int, ...] | None, str | None]:
    """``_read_size`` without SimpleITK: PIL for 2D raster files (``(width, height)``, the order SimpleITK reports),
    existence only for the rest."""
    if not path.lower().endswith(_PIL_FORMATS):
        return None, None
    from PIL import Image

    try:
        with Image.open(path) as image:  # lazy: reads the header, not the pixels
            return tuple(int(s) for s in image.size), None
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        return None, f"cannot read header of {path} ({e})"


def _read_size(path: str) -> tuple[tuple[int, ...] | None, str | None]:
    """``(size, None)`` from the header of ``path`` (``size`` is ``None`` when unknown), or ``(None, problem)``."""
    sitk = _simpleitk()
    if sitk is None:
        return _read_size_pil(path)
    if os.path.isdir(path):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path)
        if not files:
            return None, f"no DICOM series in {path}"
        size, problem = _read_size(files[0])
        if problem is not None:
            return None, problem
        # the first slice says (x, y, 1); the series stacks one slice per file along z
        return (*size[:2], len(files)) if len(size) >= 2 and len(files) > 1 else size, None
    if path.lower().endswith(_NO_HEADER_CHECK):
        return None, None
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        return None, f"cannot read header of {path} ({_sitk_message(e)})"
    # GetSize() is spatial only: RGB(A) pixels are components, so an RGB PNG and a grey PNG share a size
    return tuple(int(s) for s in reader.GetSize()), None


def _same_space(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    # compare the shared leading axes: a 4D (x, y, z, channel) NIfTI matches a 3D (x, y, z) label
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def check_case(item: dict, keys: Sequence[str] = ("image", "label")) -> str | None:
    """Describe in one line what is wrong with a case, or return ``None`` if it looks usable.

    Only file headers are read. Checked: the ``image`` key is present (other keys are optional, e.g. no label at
    inference), paths exist, headers are readable (a directory must hold a DICOM series), the files of a multi-file
    value (e.g. one per modality) have one size, and every other key's size matches the image's.

    Args:
        item: a case dict with absolute paths.
        keys: keys to check; the first one present is the reference that the others must match in size.
    """
    sizes: dict[str, tuple[int, ...]] = {}
    for key in keys:
        if key not in item or item[key] is None:
            if key == "image":
                return "missing key 'image'"
            continue
        paths = _as_paths(item[key])
        if paths is None:
            return f"{key!r} is not a path or a list of paths: {item[key]!r}"
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            return f"{key} file(s) do not exist: {', '.join(missing)}"
        key_sizes: list[tuple[str, tuple[int, ...]]] = []
        for p in paths:
            size, problem = _read_size(p)
            if problem is not None:
                return f"{key}: {problem}"
            if size is not None:
                key_sizes.append((p, size))
        if key_sizes:
            first_path, first = key_sizes[0]
            for p, size in key_sizes[1:]:
                if not _same_space(first, size):
                    return f"{key} files differ in size: {first_path} is {first}, {p} is {size}"
            sizes[key] = first
    if len(sizes) > 1:
        ref_key, ref = next(iter(sizes.items()))
        for key, size in list(sizes.items())[1:]:
            if not _same_space(ref, size):
                return f"{ref_key} size {ref} does not match {key} size {size}"
    return None


def _safe_check(item: dict, keys: Sequence[str]) -> str | None:
    try:
        return check_case(item, keys)
    except Exception as e:  # a checker bug or odd file must not hide the other cases' reports
        return f"check failed: {type(e).__name__}: {e}"


def _write_report(report_path: str | Path, rows: list[tuple[str, str]]) -> None:
    with atomic_open(report_path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "problem"])
        writer.writerows(rows)


def validate_cases(
    items: list[dict],
    keys: Sequence[str] = ("image", "label"),
    on_error: str = "raise",
    report_path: str | Path | None = None,
    num_workers: int = 4,
) -> list[dict]:
    """Check every case with :func:`check_case` (in a thread pool, since header reads wait on disk).

    Args:
        items: case dicts with absolute paths.
        keys: keys to check, see :func:`check_case`.
        on_error: ``"raise"`` raises one ``ValueError`` listing every bad case as ``<case_name>: <problem>``, so all
            problems are seen at once before training starts; ``"skip"`` logs a warning per bad case and drops it,
            so batch inference goes on with the rest.
        report_path: if given, a CSV with columns ``case, problem`` (only a header when all cases are good), written
            before raising.
        num_workers: threads reading headers.

    Returns:
        the good cases, in input order.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    with ThreadPoolExecutor(max_workers=max(1, int(num_workers))) as pool:
        results = pool.map(lambda item: _safe_check(item, keys), items)
        problems = list(tqdm(results, total=len(items), desc="checking cases", unit="case"))

    bad: list[tuple[str, str]] = []
    good: list[dict] = []
    for i, (item, problem) in enumerate(zip(items, problems)):
        if problem is None:
            good.append(item)
            continue
        name = f"case {i}"
        for key in (*keys, "image"):  # name by the first key that holds a path, e.g. the label if image is missing
            try:
                name = case_name(item, key)
                break
            except (KeyError, IndexError):
                continue
        bad.append((name, problem))

    if report_path is not None:
        _write_report(report_path, bad)
    if bad and on_error == "raise":
        lines = "\n".join(f"  {name}: {problem}" for name, problem in bad)
        raise ValueError(f"{len(bad)} of {len(items)} cases have problems:\n{lines}")
    for name, problem in bad:
        logger.warning("skipping case %s: %s", name, problem)
    return good


_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def cases_from_folder(folder: str | Path) -> list[dict]:
    """One case per image file (or DICOM-series sub-folder) in ``folder``, sorted by name: ``[{"image": path}]``."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    cases = []
    for path in sorted(root.iterdir()):
        if path.is_dir() or path.name.lower().endswith(_IMAGE_SUFFIXES):
            cases.append({"image": str(path.resolve())})
    if not cases:
        raise ValueError(f"no image files ({', '.join(_IMAGE_SUFFIXES)}) or DICOM folders in {root}")
    return cases


def find_cases(
    datalist: str | Path | None,
    data_list_key: str = "training",
    base_dir: str | Path | None = None,
    fold: int | None = None,
    input_dir: str | Path | None = None,
) -> list[dict]:
    """The cases an inference/evaluation run works on.

    ``input_dir`` (every image in a folder) wins when given; otherwise the datalist's ``data_list_key`` entries,
    restricted to the validation cases of ``fold`` when ``fold`` is not ``None``.
    """
    if input_dir:
        return cases_from_folder(input_dir)
    if datalist is None:
        raise ValueError("give either a datalist or an input_dir.")
    items = load_datalist(datalist, data_list_key, base_dir)
    return select_fold(items, fold, validation=True) if fold is not None else items
