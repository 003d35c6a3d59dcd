"""The exported Model-Zoo bundle runs WITHOUT the medsegdiff_bundle package, and the TorchScript exports.

The bundle is exported with tiny trained weights, unzipped into a fresh folder and run in subprocesses whose
``PYTHONPATH`` starts with a folder holding a fake ``medsegdiff_bundle`` that raises ImportError: it shadows the
editable install (its finder sits at the end of ``sys.meta_path``, after the ``PYTHONPATH`` entries), so any
accidental use of the real package fails loudly. The subprocesses run from the bundle folder, as Model-Zoo bundles
are run (``python -m``/``-c`` put the current folder on ``sys.path``, which the configs' ``scripts`` needs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medsegdiff_bundle.export import example_inputs, export_bundle, export_torchscript
from medsegdiff_bundle.networks import MedSegDiffV2
from tests.bundle_utils import REPO, run_workflow

pytestmark = pytest.mark.slow

NAME = "medsegdiff_v2"
CHANNELS = [8, 16, 32]
TINY_CLI = ["--channels", "[8,16,32]", "--patch_size", "[32,32]", "--num_workers", "0", "--amp", "false"]
HIDDEN = "medsegdiff_bundle is hidden for the test"
REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/logging.conf",
                  "docs/README.md", "LICENSE", "large_files.yml", "models/model.pt", "scripts/__init__.py",
                  "scripts/medsegdiff_bundle/__init__.py",
                  "scripts/medsegdiff_bundle/networks/medsegdiff.py")  # fmt: skip
ZOO_PACKAGES = {"monai", "torch", "numpy", "ignite", "nibabel", "SimpleITK", "skimage", "pandas", "matplotlib",
                "tqdm", "scipy", "itk", "PIL"}  # fmt: skip

# run inside the unzipped bundle: the real package must be unreachable, the configs must check out
CHECK_SCRIPT = f"""
import sys
try:
    import medsegdiff_bundle
except ImportError as error:
    assert {HIDDEN!r} in str(error), error
else:
    raise SystemExit("the real medsegdiff_bundle package is importable")
from monai.bundle import ConfigWorkflow
root = sys.argv[1]
for config, kind in (("train", "train"), ("inference", "infer"), ("evaluate", "infer")):
    wf = ConfigWorkflow(config_file=f"configs/{{config}}.json", workflow_type=kind, bundle_root=root,
                        channels={CHANNELS}, num_workers=0, amp=False)
    wf.initialize()
    missing = wf.check_properties()
    assert not missing, (config, missing)
    net = wf.parser.get_parsed_content("network_def")
    assert type(net).__module__ == "scripts.medsegdiff_bundle.networks.medsegdiff", type(net).__module__
    wf.parser.get_parsed_content("train#trainer" if kind == "train" else "evaluator")
import os
import scripts.medsegdiff_bundle as vendored
assert os.path.realpath(vendored.__file__).startswith(os.path.realpath(os.getcwd())), vendored.__file__
assert "medsegdiff_bundle" not in sys.modules
print("CHECKS OK")
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The repo's bundle trained one tiny epoch on its synthetic data (bundle root with models/ and data/)."""
    root = tmp_path_factory.mktemp("trained")
    run_workflow("train", "train", root, channels=CHANNELS, patch_size=[32, 32], max_epochs=1, val_interval=1,
                 val_steps=1, num_workers=0)  # fmt: skip
    assert (root / "models" / "model.pt").is_file()
    return root


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> tuple[Path, Path]:
    return export_bundle(tmp_path_factory.mktemp("dist"), NAME, weights=trained / "models" / "model.pt")


@pytest.fixture(scope="module")
def bundle(exported, tmp_path_factory) -> Path:
    """The ZIP unzipped into a fresh folder: the bundle a user downloads."""
    dst = tmp_path_factory.mktemp("unzipped")
    with zipfile.ZipFile(exported[1]) as zf:
        zf.extractall(dst)
    return dst / NAME


@pytest.fixture(scope="module")
def hidden_env(tmp_path_factory) -> dict:
    shim = tmp_path_factory.mktemp("hide") / "medsegdiff_bundle"
    shim.mkdir()
    (shim / "__init__.py").write_text(f"raise ImportError({HIDDEN!r})\n", encoding="utf-8")
    return {**os.environ, "PYTHONPATH": str(shim.parent), "PYTHONDONTWRITEBYTECODE": "1"}


def _run(args: list[str], bundle: Path, env: dict) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=bundle, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _tiny_network(weights: Path) -> MedSegDiffV2:
    net = MedSegDiffV2(spatial_dims=2, in_channels=3, num_classes=2, channels=CHANNELS)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


# -- the exported files ------------------------------------------------------------------------------------------


def test_export_writes_folder_and_deterministic_zip(exported, trained, tmp_path):
    folder, zip_path = exported
    assert folder == zip_path.parent / NAME and zip_path.name == f"{NAME}.zip"
    for rel in REQUIRED_FILES:
        assert (folder / rel).is_file(), rel
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    assert names == sorted(names) and all(n.startswith(f"{NAME}/") for n in names)
    assert {f"{NAME}/{rel}" for rel in REQUIRED_FILES} <= set(names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert f"{NAME}/scripts/medsegdiff_bundle/cli.py" not in names  # python-fire is no Zoo requirement
    again = export_bundle(tmp_path, NAME, weights=trained / "models" / "model.pt")[1]
    assert again.read_bytes() == zip_path.read_bytes()  # same inputs, same bytes


def test_configs_reference_only_the_vendored_code(exported):
    folder = exported[0]
    for path in sorted((folder / "configs").glob("*.json")):
        text = path.read_text(encoding="utf-8")
        assert text.count("medsegdiff_bundle") == text.count("scripts.medsegdiff_bundle"), path.name
    train = json.loads((folder / "configs" / "train.json").read_text(encoding="utf-8"))
    assert train["network_def"]["_target_"] == "scripts.medsegdiff_bundle.networks.MedSegDiffV2"
    assert train["imports"].index("$import scripts") < train["imports"].index("$import scripts.medsegdiff_bundle")
    assert any("scripts.medsegdiff_bundle." in entry for entry in train["initialize"])


def test_vendored_code_imports_only_zoo_requirements(exported):
    import ast

    scripts = exported[0] / "scripts"
    for path in sorted(scripts.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = {node.module.split(".")[0]}
            else:
                continue
            for top in tops:
                assert top in ZOO_PACKAGES or top in sys.stdlib_module_names or top == "scripts", (path, top)
        assert not any(line.lstrip().startswith(("from medsegdiff_bundle", "import medsegdiff_bundle"))
                       for line in text.splitlines()), path  # fmt: skip


def test_metadata_and_large_files(exported, trained):
    folder = exported[0]
    meta = json.loads((folder / "configs" / "metadata.json").read_text(encoding="utf-8"))
    source = json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["version"] == source["version"] and meta["version"] in meta["changelog"]
    packages = meta["required_packages_version"]
    assert "medsegdiff-bundle" not in packages and "fire" not in packages
    assert {"pytorch-ignite", "nibabel", "SimpleITK", "pandas", "matplotlib", "scipy", "tqdm"} <= set(packages)
    import hashlib

    yaml = pytest.importorskip("yaml")
    large = yaml.safe_load((folder / "large_files.yml").read_text(encoding="utf-8"))["large_files"]
    md5 = hashlib.md5((trained / "models" / "model.pt").read_bytes()).hexdigest()
    assert large == [{"path": "models/model.pt", "url": "", "hash_val": md5, "hash_type": "md5"}]
    assert "PLACEHOLDER" in (folder / "large_files.yml").read_text(encoding="utf-8")
    assert "configs/train.json" in (folder / "docs" / "README.md").read_text(encoding="utf-8")
    assert "bundle/configs/" not in (folder / "docs" / "README.md").read_text(encoding="utf-8")


def test_export_without_weights_ships_no_model(tmp_path):
    folder, zip_path = export_bundle(tmp_path / "dist", "bare")
    assert not (folder / "models" / "model.pt").exists() and (folder / "models").is_dir()
    assert 'hash_val: ""' in (folder / "large_files.yml").read_text(encoding="utf-8")
    with zipfile.ZipFile(zip_path) as zf:
        assert "bare/large_files.yml" in zf.namelist() and "bare/models/model.pt" not in zf.namelist()


# -- the unzipped bundle, without the package ----------------------------------------------------------------------


def test_unzipped_bundle_checks_out_without_the_package(bundle, hidden_env, tmp_path):
    output = _run(["-c", CHECK_SCRIPT, str(tmp_path / "root")], bundle, hidden_env)
    assert "CHECKS OK" in output
    schema = str(REPO / "tests" / "resources" / "meta_schema.json")
    output = _run(["-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
                   "--filepath", schema], bundle, hidden_env)  # fmt: skip
    assert "metadata is verified with no error" in output


def test_unzipped_bundle_trains_without_the_package(bundle, hidden_env, tmp_path):
    root = tmp_path / "run"
    _run(["-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json", "--bundle_root", str(root),
          "--max_epochs", "1", "--val_interval", "1", "--val_steps", "1", *TINY_CLI], bundle, hidden_env)  # fmt: skip
    assert (root / "models" / "model.pt").is_file()
    assert (root / "data" / "datalist.json").is_file()  # the vendored synthetic-data generator ran
    assert any((root / "models").glob("checkpoint_epoch=1*.pt"))


def test_unzipped_bundle_infers_with_its_weights_without_the_package(bundle, hidden_env, trained, tmp_path):
    images = sorted((trained / "data" / "images").glob("*.png"))[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    output = _run(["-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", ".",
                   "--input_dir", str(folder), "--output_dir", str(out), "--steps", "2", "--ensemble", "2",
                   *TINY_CLI], bundle, hidden_env)  # fmt: skip
    assert "Restored all variables from ./models/model.pt" in output
    for p in images:
        seg = np.array(Image.open(out / f"{p.stem}_seg.png"))
        assert seg.shape == np.array(Image.open(p)).shape[:2]
        assert (out / f"{p.stem}_uncertainty.png").is_file()
    assert pd.read_csv(out / "failed_cases.csv").empty


def test_ckpt_export_of_the_traced_network(bundle, hidden_env, trained, tmp_path):
    """``python -m monai.bundle ckpt_export network_ts ...`` (``network_def`` itself cannot be scripted, and
    ckpt_export traces with one input only) writes a TorchScript file equal to the eager network."""
    ts = tmp_path / "model.ts"
    _run(["-m", "monai.bundle", "ckpt_export", "network_ts", "--filepath", str(ts), "--ckpt_file", "models/model.pt",
          "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", "--bundle_root", ".",
          "--channels", "[8,16,32]"], bundle, hidden_env)  # fmt: skip
    extra = {"metadata.json": ""}
    loaded = torch.jit.load(str(ts), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"]
    net = _tiny_network(trained / "models" / "model.pt")
    inputs = example_inputs(net, 2, 3, 32)
    with torch.no_grad():
        for expected, got in zip(net(*inputs), loaded(*inputs)):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# -- TorchScript in process --------------------------------------------------------------------------------------


def test_export_torchscript_matches_the_eager_network(trained, tmp_path):
    net = _tiny_network(trained / "models" / "model.pt")
    path = export_torchscript(net, tmp_path / "model.ts", spatial_dims=2, in_channels=3, size=32)
    loaded = torch.jit.load(str(path), map_location="cpu")
    inputs = example_inputs(net, 2, 3, 32, seed=1)
    other = example_inputs(net, 2, 3, (64, 48), batch=1, seed=2)  # another batch and a non-square size
    with torch.no_grad():
        for x in (inputs, other):
            for expected, got in zip(net(*x), loaded(*x)):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # the timestep matters in the artefact too (NBP-Filter, AdaGN)
        late = (inputs[0], inputs[1], torch.full_like(inputs[2], 999))
        assert not torch.allclose(loaded(*late)[0], loaded(*inputs)[0])
