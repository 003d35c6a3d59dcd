"""The bundle's metadata.json verifies against the (offline) MONAI meta schema, and the bundle has its files.

``tests/resources/meta_schema.json`` stands in for the official ``meta_schema_20240725.json``: MONAI's
``verify_metadata`` only downloads the schema when ``--filepath`` does not exist, so pointing it at the local
file keeps these tests offline.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import monai
import numpy
import pytest
import torch
from monai.bundle import verify_metadata

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundle"
META_FILE = BUNDLE / "configs" / "metadata.json"
SCHEMA_FILE = REPO_ROOT / "tests" / "resources" / "meta_schema.json"

# the local schema has no published hash to check against
pytestmark = pytest.mark.filterwarnings("ignore:No hash value provided:UserWarning")

OFFICIAL_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
TENSOR_FIELDS = (
    "type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def",
)  # fmt: skip


@pytest.fixture
def metadata() -> dict:
    return json.loads(META_FILE.read_text(encoding="utf-8"))


def _write(tmp_path: Path, meta: dict) -> Path:
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta, indent=4))
    return path


def _verify(meta_file: Path) -> None:
    # the schema file exists, so MONAI's download_url skips the download (no network)
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA_FILE))


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# (a) verification passes -------------------------------------------------------------------------------------


def test_verify_metadata_cli_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata",
         "--meta_file", "bundle/configs/metadata.json", "--filepath", "tests/resources/meta_schema.json"],
        cwd=REPO_ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "metadata is verified with no error" in output, output
    # the local schema was used as is (offline): MONAI found the file and skipped the download
    assert "skipped downloading" in output, output


def test_verify_metadata_in_process_passes():
    _verify(META_FILE)  # raises ValueError on any schema violation


def test_metadata_points_at_official_schema(metadata):
    # the shipped bundle must name the official schema (the local file is only a test stand-in)
    assert metadata["schema"] == OFFICIAL_SCHEMA_URL


def test_local_schema_is_a_draft07_schema():
    from jsonschema import Draft7Validator

    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema["$schema"].startswith("http://json-schema.org/draft-07/")
    Draft7Validator.check_schema(schema)  # raises SchemaError if the schema itself is malformed


# (b) verification fails when something required is missing ------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ("copyright",),
        ("version",),
        ("changelog",),
        ("numpy_version",),
        ("required_packages_version",),
        ("network_data_format", "inputs"),
        ("network_data_format", "outputs", "pred", "channel_def"),
        ("network_data_format", "inputs", "image", "is_patch_data"),
        ("network_data_format", "inputs", "image", "spatial_shape"),
    ],
    ids=lambda p: ".".join(p),
)
def test_missing_required_field_fails(tmp_path, metadata, path):
    broken = copy.deepcopy(metadata)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    assert path[-1] in parent, f"test premise: {'.'.join(path)} is present in metadata.json"
    del parent[path[-1]]
    with pytest.raises(ValueError, match="Failed validating"):
        _verify(_write(tmp_path, broken))


def test_missing_required_field_fails_cli(tmp_path, metadata):
    broken = copy.deepcopy(metadata)
    del broken["copyright"]
    meta_file = _write(tmp_path, broken)
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata",
         "--meta_file", str(meta_file), "--filepath", str(SCHEMA_FILE)],
        cwd=REPO_ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "copyright" in output, output
    assert "metadata is verified with no error" not in output, output


@pytest.mark.parametrize(
    "path, value",
    [
        (("version",), "0.1"),  # not semver
        (("changelog",), {}),  # must have at least one entry
        (("required_packages_version", "nibabel"), 5),  # versions are strings
        (("network_data_format", "outputs", "pred", "num_channels"), "2"),  # integer
        (("network_data_format", "outputs", "pred", "is_patch_data"), "false"),  # boolean
    ],
    ids=lambda x: ".".join(x) if isinstance(x, tuple) else None,
)
def test_wrong_type_fails(tmp_path, metadata, path, value):
    broken = copy.deepcopy(metadata)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(ValueError, match="Failed validating"):
        _verify(_write(tmp_path, broken))


# (c) version and changelog ---------------------------------------------------------------------------------------


def test_version_is_in_changelog(metadata):
    assert metadata["version"] in metadata["changelog"], (
        f"version {metadata['version']} has no changelog entry; keys: {list(metadata['changelog'])}"
    )
    assert metadata["changelog"][metadata["version"]].strip(), "the changelog entry for the current version is empty"


@pytest.mark.parametrize("path", sorted((BUNDLE / "configs").iterdir()), ids=lambda p: p.name)
def test_bundle_configs_are_ascii(path):
    """MONAI's ConfigParser opens configs in the locale's encoding; DICOM and ITK readers can switch a process to the C
    locale (ASCII), where a UTF-8 character (e.g. a superscript 2 in a changelog) then fails every later load."""
    data = path.read_bytes()
    bad = [(i, data[i:i + 2]) for i, byte in enumerate(data) if byte > 127][:3]
    assert not bad, f"{path.name}: non-ASCII bytes at offsets {bad}"


def test_bundle_version_matches_package(metadata):
    import medsegdiff_bundle

    assert metadata["required_packages_version"]["medsegdiff-bundle"] == medsegdiff_bundle.__version__


def test_no_optional_packages_version(metadata):
    # MONAI maps `optional_packages_version` onto `required_packages_version`, overwriting it
    assert "optional_packages_version" not in metadata


# (d) the metadata tracks the installed stack ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, installed",
    [
        ("monai_version", monai.__version__),
        ("pytorch_version", torch.__version__),
        ("numpy_version", numpy.__version__),
    ],
)
def test_versions_match_installed(metadata, key, installed):
    assert _major_minor(metadata[key]) == _major_minor(installed), (
        f"metadata.json {key}={metadata[key]} but {installed} is installed: update bundle/configs/metadata.json"
    )


def test_pytorch_version_has_no_local_suffix(metadata):
    # Model Zoo convention (as monai.bundle.utils writes it): "2.13.0", not "2.13.0+cpu"
    assert "+" not in metadata["pytorch_version"]


def test_required_packages_are_installed(metadata):
    from importlib.metadata import PackageNotFoundError, version

    for package, pinned in metadata["required_packages_version"].items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            pytest.fail(f"required package {package} (metadata.json pins {pinned}) is not installed")
        assert _major_minor(installed) == _major_minor(pinned), f"{package}: metadata {pinned}, installed {installed}"


def test_network_data_format_describes_every_tensor(metadata):
    for group in ("inputs", "outputs"):
        for name, tensor in metadata["network_data_format"][group].items():
            missing = [f for f in TENSOR_FIELDS if f not in tensor]
            assert not missing, f"{group}.{name} lacks {missing}"
            assert len(tensor["channel_def"]) == tensor["num_channels"], f"{group}.{name}: channel_def vs num_channels"
            assert sorted(int(k) for k in tensor["channel_def"]) == list(range(tensor["num_channels"]))


# (e) the bundle's own files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("relpath", ["configs/metadata.json", "configs/logging.conf", "docs/README.md", "LICENSE"])
def test_bundle_file_exists(relpath):
    path = BUNDLE / relpath
    assert path.is_file(), f"bundle/{relpath} is missing"
    assert path.stat().st_size > 0, f"bundle/{relpath} is empty"


def test_logging_conf_is_accepted_by_monai():
    # MONAI validates the INI (class/args allowlist) before `logging.config.fileConfig`; apply it the same way
    import logging

    logging_file = str(BUNDLE / "configs" / "logging.conf")
    try:  # MONAI >= 1.6 (GHSA-wvpx-5qmp-46g3); raises ValueError for a rejected file
        from monai.bundle.workflows import _reject_executable_logging_config
    except ImportError:  # older MONAI applies the file as is
        content = Path(logging_file).read_text(encoding="utf-8")
    else:
        content = _reject_executable_logging_config(logging_file)
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    try:
        import io
        from logging.config import fileConfig

        fileConfig(io.StringIO(content), disable_existing_loggers=False)
        assert root.level == logging.INFO
        assert any(isinstance(h, logging.StreamHandler) for h in root.handlers)
    finally:
        for handler in root.handlers[:]:
            if handler not in saved[1]:
                root.removeHandler(handler)
        for handler in saved[1]:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved[0])


def test_license_is_apache():
    text = (BUNDLE / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License, Version 2.0" in text
    assert "http://www.apache.org/licenses/LICENSE-2.0" in text
