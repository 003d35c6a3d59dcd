"""MONAI Label integration.

* The bundle plumbing of the app (``medsegdiff_bundle.label.bundle``) runs in this environment.
* A REAL MONAI Label server (``monailabel start_server``) runs from the label virtualenv
  (``scripts/setup_label_env.sh``; ``$MEDSEGDIFF_LABEL_VENV``, default ``~/.cache/medsegdiff/label-venv``) on
  127.0.0.1 and a free port, over a temporary studies folder of small synthetic NIfTI volumes and a tiny 3D model
  trained here with the repository's bundle. The tests call its REST API: info, inference (label map geometry,
  classes, uncertainty map), an unknown image id and a corrupt file (clear error status, server still up), a
  training run, and stop it leaving no process behind. Skipped, saying why, when the virtualenv is missing.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsegdiff_bundle.data import make_synthetic_case, write_synthetic_dataset
from medsegdiff_bundle.engine import load_checkpoint
from medsegdiff_bundle.label import APP_DIR
from medsegdiff_bundle.label.bundle import (
    bundle_parser,
    class_labels,
    load_overrides,
    pretrained_network,
    pretrained_network_def,
    write_train_datalist,
)
from tests.bundle_utils import REPO, run_workflow

VENV = Path(os.environ.get("MEDSEGDIFF_LABEL_VENV", Path.home() / ".cache" / "medsegdiff" / "label-venv"))
VENV_PY = VENV / "bin" / "python"
MODEL = {"spatial_dims": 3, "in_channels": 1, "num_classes": 2, "patch_size": [16, 16, 16],
         "normalization": "zscore", "channels": [8, 16, 32]}
SERVER_OVERRIDES = {**MODEL, "steps": 2, "ensemble": 2, "num_workers": 0, "amp": False, "batch_size": 2,
                    "val_interval": 1, "val_steps": 1}
UNC_TAG = "medsegdiff_uncertainty"
START_TIMEOUT = 180


# ---------------------------------------------------------------- bundle plumbing (this environment) --------


def test_overrides_come_from_inline_json_a_file_or_the_bundle_root(tmp_path):
    assert load_overrides(None, tmp_path) == {}
    (tmp_path / "bundle_overrides.json").write_text(json.dumps({"spatial_dims": 3}))
    assert load_overrides(None, tmp_path) == {"spatial_dims": 3}
    assert load_overrides('{"num_classes": 4}', tmp_path) == {"num_classes": 4}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"steps": 3}))
    assert load_overrides(str(other), tmp_path) == {"steps": 3}
    with pytest.raises(ValueError, match="neither inline JSON nor an existing file"):
        load_overrides(str(tmp_path / "missing.json"), tmp_path)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_overrides("{not json", tmp_path)
    other.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_overrides(str(other), tmp_path)


def test_parser_applies_overrides_and_skips_sections_the_config_lacks(tmp_path):
    parser = bundle_parser("inference", tmp_path, {**MODEL, "train#dataloader#shuffle": False, "steps": 3})
    assert parser.get_parsed_content("spatial_dims") == 3
    assert parser.get_parsed_content("inferer#steps") == 3
    assert parser.get_parsed_content("ckpt_path") == str(tmp_path.resolve() / "models" / "model.pt")
    assert "train" not in parser.config
    train = bundle_parser("train", tmp_path, {"train#dataloader#shuffle": False})
    assert train["train#dataloader#shuffle"] is False


def test_class_labels():
    assert class_labels(2, None, {"0": "background", "1": "foreground"}) == {"foreground": 1}
    assert class_labels(3, None, {"0": "background", "1": "foreground"}) == {"class_1": 1, "class_2": 2}
    assert class_labels(3, ["liver", "tumour"]) == {"liver": 1, "tumour": 2}
    with pytest.raises(ValueError, match="needs 2"):
        class_labels(3, ["liver"])


def test_train_datalist_keeps_a_validation_fold(tmp_path):
    items = [{"image": f"/s/img{i}.nii.gz", "label": f"/s/labels/final/img{i}.nii.gz"} for i in range(5)]
    assert write_train_datalist(items, tmp_path / "d.json", 0.2) == {"train": 4, "validation": 1}
    entries = json.loads((tmp_path / "d.json").read_text())["training"]
    assert [e["fold"] for e in entries] == [1, 1, 1, 1, 0]
    assert write_train_datalist(items[:2], tmp_path / "d.json", 0.9) == {"train": 1, "validation": 1}
    assert write_train_datalist(items[:1], tmp_path / "d.json", 0.2) == {"train": 1, "validation": 1}
    assert write_train_datalist(items[:4], tmp_path / "d.json", 0.2, min_cases=2) == {"train": 2, "validation": 2}
    with pytest.raises(ValueError, match="no labelled image"):
        write_train_datalist([], tmp_path / "d.json")
    with pytest.raises(ValueError, match="2 training processes need at least 2 training and 2 validation"):
        write_train_datalist(items[:3], tmp_path / "d.json", 0.5, min_cases=2)


def test_pretrained_network_definition_loads_the_current_weights(tmp_path):
    parser = bundle_parser("train", tmp_path, MODEL)
    source = parser.get_parsed_content("network_def")
    torch.save(source.state_dict(), tmp_path / "model.pt")
    parser["network_def"] = pretrained_network_def(parser, tmp_path / "model.pt")
    loaded = parser.get_parsed_content("network_def")
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    fresh = pretrained_network(None, spatial_dims=3, in_channels=1, num_classes=2, channels=[8, 16, 32])
    assert fresh.num_classes == 2


# ---------------------------------------------------------------- the real server (label virtualenv) -------


def _venv_problem() -> str | None:
    """Why the label virtualenv cannot run the tests (a reason to skip), or ``None``. A virtualenv that imports
    MONAI Label but not our package fails the test instead: that is a bug of the package (e.g. code that only works
    with the main environment's numpy), not a missing environment."""
    if not VENV_PY.exists():
        return (f"MONAI Label virtualenv not found at {VENV} (create it with `bash scripts/setup_label_env.sh`, "
                "or point MEDSEGDIFF_LABEL_VENV at one)")
    for module, missing_is_a_bug in (("monailabel.interfaces.app", False), ("medsegdiff_bundle.label.infer", True)):
        probe = subprocess.run([str(VENV_PY), "-c", f"import {module}"], cwd="/", capture_output=True,
                               encoding="utf-8", errors="replace", timeout=300,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
        if probe.returncode != 0:
            message = f"the virtualenv at {VENV} cannot import {module}: {probe.stderr[-1500:]}"
            if missing_is_a_bug:
                pytest.fail(message)
            return message
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None,
             timeout: float = 300) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (file name, bytes)} of a multipart/form-data body."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    assert msg.is_multipart(), content_type
    parts = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        parts[name] = (part.get_filename(), part.get_payload(decode=True))
    return parts


def _study_volume(seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    image, label = make_synthetic_case(shape, num_classes=2, in_channels=1, seed=seed)
    return image[0].astype(np.float32), label[0].astype(np.uint8)


class Server:
    """``monailabel start_server`` in its own session (process group), stopped with the whole group."""

    def __init__(self, app: Path, studies: Path, conf: dict[str, str], log: Path, sessions: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [str(VENV_PY), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
               "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in conf.items():
            cmd += ["--conf", key, value]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
               "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(sessions)}
        env["PYTHONPATH"] = str(REPO)  # this checkout's code, whatever the venv's editable install points at
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(app.parent), env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pgid = self.proc.pid  # start_new_session: the server leads its own process group

    def log_tail(self, n: int = 6000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _, body = _request(f"{self.url}/info/", timeout=5)
                if status == 200:
                    return json.loads(body)
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1)
        raise AssertionError(f"server did not answer /info/ within {timeout} s:\n{self.log_tail()}")

    def group_alive(self) -> bool:
        """Whether any process of the server's group is left (reaps the leader first)."""
        self.proc.poll()
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def _wait_group(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.group_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the whole process group (server, uvicorn, training subprocesses), SIGKILL what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.group_alive():
                break
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            if self._wait_group(timeout):
                break
        self.proc.poll()
        if not self._log.closed:
            self._log.close()


@pytest.fixture(scope="module")
def label_server(tmp_path_factory):
    problem = _venv_problem()
    if problem:
        pytest.skip(problem)
    tmp = tmp_path_factory.mktemp("monailabel")

    # a tiny 3D model trained with the repository's bundle, in this environment
    bundle_root = tmp / "bundle"
    write_synthetic_dataset(bundle_root / "data", 4, (16, 16, 16), num_classes=2, in_channels=1)
    run_workflow("train", "train", bundle_root, **MODEL, max_epochs=1, val_interval=1, val_steps=1, num_workers=0)
    assert (bundle_root / "models" / "model.pt").is_file()
    (bundle_root / "bundle_overrides.json").write_text(json.dumps(SERVER_OVERRIDES, indent=2))

    # studies: volumes larger than the patch (sliding window), anisotropic, not RAS-oriented, shifted origin
    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    affines = {}
    for i, shape in enumerate([(20, 18, 16), (16, 16, 16), (18, 16, 20), (16, 16, 16)]):
        image, label = _study_volume(10 + i, shape)
        affine = np.diag([-1.5, -0.8, 2.0, 1.0])
        affine[:3, 3] = [12.0, -7.5, 3.25 * i]
        affine[:3, :3] = affine[:3, :3] @ np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]]) if i == 2 else affine[:3, :3]
        nib.save(nib.Nifti1Image(image * 100 + 50, affine), studies / f"vol{i}.nii.gz")
        if i < 2:
            nib.save(nib.Nifti1Image(label, affine), studies / "labels" / "final" / f"vol{i}.nii.gz")
        affines[f"vol{i}"] = affine
    (studies / "corrupt.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))

    # a copy of the app: start_server creates model/ lib/ logs/ bin/ inside the app folder
    app = tmp / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__", "model", "lib", "logs", "bin"))
    conf = {"models": "medsegdiff", "bundle_root": str(bundle_root), "uncertainty_dir": str(tmp / "uncertainty"),
            "preload": "true"}
    server = Server(app, studies, conf, tmp / "server.log", tmp / "sessions")
    try:
        info = server.wait_ready()
        yield {"server": server, "info": info, "studies": studies, "bundle_root": bundle_root, "tmp": tmp,
               "affines": affines}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def inferred(label_server):
    """One inference on vol0 through the REST API (multipart: label file + params JSON)."""
    server = label_server["server"]
    body = urllib.parse.urlencode({"params": json.dumps({"seed": 0})}).encode()
    status, headers, content = _request(f"{server.url}/infer/medsegdiff?image=vol0", "POST", body,
                                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, f"{status}: {content[:2000]!r}\n{server.log_tail()}"
    parts = _multipart(headers.get("content-type") or headers.get("Content-Type"), content)
    name, data = parts["image"]
    path = label_server["tmp"] / f"response_{name}"
    path.write_bytes(data)
    return {"label": path, "params": json.loads(parts["params"][1])}


def test_info_lists_the_model_and_the_trainer(label_server):
    info = label_server["info"]
    assert info["name"] == "MedSegDiff-V2"
    model = info["models"]["medsegdiff"]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {"foreground": 1}
    assert {"sampler", "steps", "ensemble"} <= set(model["config"])
    assert "medsegdiff" in info["trainers"]
    assert {"max_epochs", "val_split", "multi_gpu", "gpus"} <= set(info["trainers"]["medsegdiff"]["config"])


def test_infer_returns_the_label_map_in_the_input_geometry(label_server, inferred):
    label = nib.load(str(inferred["label"]))
    study = nib.load(str(label_server["studies"] / "vol0.nii.gz"))
    assert inferred["label"].name.endswith(".nii.gz")
    assert label.shape == study.shape == (20, 18, 16)
    np.testing.assert_allclose(label.affine, study.affine, atol=1e-4)
    values = np.asarray(label.dataobj)
    assert set(np.unique(values)) <= {0, 1}
    assert inferred["params"]["label_names"] == {"foreground": 1}


def test_infer_exposes_the_uncertainty_map(label_server, inferred):
    unc = inferred["params"]["uncertainty"]
    assert unc["kind"] == "std" and unc["shape"] == [20, 18, 16]
    assert 0.0 <= unc["min"] <= unc["mean"] <= unc["max"]
    study = nib.load(str(label_server["studies"] / "vol0.nii.gz"))
    on_disk = nib.load(unc["file"])
    assert on_disk.shape == study.shape
    np.testing.assert_allclose(on_disk.affine, study.affine, atol=1e-4)
    # stored in the datastore too, so a remote client can download it
    assert unc["tag"] == UNC_TAG and unc["label"] == "vol0"
    server = label_server["server"]
    status, _, content = _request(f"{server.url}/datastore/label?label=vol0&tag={UNC_TAG}")
    assert status == 200, content[:500]
    path = label_server["tmp"] / "downloaded_uncertainty.nii.gz"
    path.write_bytes(content)
    downloaded = nib.load(str(path))
    assert downloaded.shape == study.shape and downloaded.get_data_dtype() == np.float32
    np.testing.assert_allclose(downloaded.affine, study.affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(downloaded.dataobj), np.asarray(on_disk.dataobj))


def test_server_matches_the_bundles_own_inference(label_server, inferred, tmp_path):
    """The app runs what `medsegdiff infer` runs: same label map and uncertainty map (other torch build)."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(label_server["studies"] / "vol0.nii.gz", folder)
    keep = {k: v for k, v in SERVER_OVERRIDES.items() if k not in ("batch_size", "val_interval", "val_steps")}
    run_workflow("inference", "infer", label_server["bundle_root"], input_dir=str(folder),
                 output_dir=str(tmp_path / "out"), save_overlay=False, seed=0, **keep)
    bundle_label = np.asarray(nib.load(str(tmp_path / "out" / "vol0_seg.nii.gz")).dataobj)
    bundle_unc = np.asarray(nib.load(str(tmp_path / "out" / "vol0_uncertainty.nii.gz")).dataobj)
    server_label = np.asarray(nib.load(str(inferred["label"])).dataobj)
    server_unc = np.asarray(nib.load(inferred["params"]["uncertainty"]["file"]).dataobj)
    assert bundle_label.shape == server_label.shape
    assert (bundle_label == server_label).mean() > 0.99
    np.testing.assert_allclose(server_unc, bundle_unc, atol=1e-3)


def test_infer_on_a_reoriented_volume_keeps_its_geometry(label_server):
    server = label_server["server"]
    status, headers, content = _request(f"{server.url}/infer/medsegdiff?image=vol2&output=image", "POST")
    assert status == 200, content[:2000]
    path = label_server["tmp"] / "vol2_label.nii.gz"
    path.write_bytes(content)
    label, study = nib.load(str(path)), nib.load(str(label_server["studies"] / "vol2.nii.gz"))
    assert label.shape == study.shape == (18, 16, 20)
    np.testing.assert_allclose(label.affine, study.affine, atol=1e-4)


def test_unknown_image_id_is_a_404_with_a_message(label_server):
    server = label_server["server"]
    status, _, content = _request(f"{server.url}/infer/medsegdiff?image=no_such_image", "POST")
    assert status == 404
    assert "no_such_image" in json.loads(content)["detail"]


def test_corrupt_file_is_a_clear_error_and_the_server_stays_up(label_server):
    server = label_server["server"]
    status, _, content = _request(f"{server.url}/infer/medsegdiff?image=corrupt", "POST")
    assert status == 422
    detail = json.loads(content)["detail"]
    assert "cannot read image" in detail and "corrupt.nii.gz" in detail
    assert server.proc.poll() is None
    status, _, _ = _request(f"{server.url}/info/")
    assert status == 200


def test_unknown_model_is_an_error(label_server):
    server = label_server["server"]
    status, _, content = _request(f"{server.url}/infer/nope?image=vol0", "POST")
    assert 400 <= status < 600 and b"nope" in content


def _train(label_server, params: dict) -> dict:
    """POST /train/medsegdiff and poll GET /train/ until the task ends; returns the task record."""
    server = label_server["server"]
    status, _, content = _request(f"{server.url}/train/medsegdiff", "POST", json.dumps(params).encode(),
                                  {"Content-Type": "application/json"})
    assert status == 200, content[:2000]
    deadline = time.monotonic() + 400
    task: dict = {}
    while time.monotonic() < deadline:
        status, _, content = _request(f"{server.url}/train/")
        task = json.loads(content) if status == 200 else {}
        if task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    assert task.get("status") == "DONE", f"{task}\n{server.log_tail()}"
    return json.loads((label_server["bundle_root"] / "monailabel" / "last_train.json").read_text())


def test_train_task_fine_tunes_the_model_through_the_api(label_server):
    model = label_server["bundle_root"] / "models" / "model.pt"
    before = load_checkpoint(model)
    summary = _train(label_server, {"max_epochs": 1, "val_split": 0.5, "device": "cpu"})
    assert summary["world_size"] == 1 and summary["train"] == summary["validation"] == 1
    datalist = json.loads((label_server["bundle_root"] / "monailabel" / "datalist.json").read_text())["training"]
    assert sorted(Path(e["image"]).name for e in datalist) == ["vol0.nii.gz", "vol1.nii.gz"]  # labelled ones only
    assert sorted(e["fold"] for e in datalist) == [0, 1]
    after = load_checkpoint(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # fine-tuned weights replaced model.pt
    # the infer task picks the new weights up
    server = label_server["server"]
    status, _, content = _request(f"{server.url}/infer/medsegdiff?image=vol1&output=json", "POST")
    assert status == 200, content[:2000]
    assert json.loads(content)["uncertainty"]["shape"] == [16, 16, 16]


def test_train_task_runs_multi_gpu_train_json_with_several_processes(label_server):
    """processes=2 goes through torchrun + multi_gpu_train.json (DDP over gloo here, on the CPU)."""
    server = label_server["server"]
    # annotate two more images through the API: each rank needs a training and a validation case
    for i, shape in ((2, (18, 16, 20)), (3, (16, 16, 16))):
        _, label = _study_volume(10 + i, shape)
        path = label_server["tmp"] / f"vol{i}_annotation.nii.gz"
        nib.save(nib.Nifti1Image(label, label_server["affines"][f"vol{i}"]), path)
        boundary = "medsegdiff-boundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"; filename=\"vol{i}.nii.gz\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n")
        body = head.encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        status, _, content = _request(f"{server.url}/datastore/label?image=vol{i}", "PUT", body,
                                      {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 200, content[:1000]

    model = label_server["bundle_root"] / "models" / "model.pt"
    before = load_checkpoint(model)
    summary = _train(label_server, {"max_epochs": 1, "val_split": 0.25, "processes": 2})
    assert summary["world_size"] == 2 and summary["train"] == 2 and summary["validation"] == 2
    after = load_checkpoint(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    status, _, content = _request(f"{server.url}/infer/medsegdiff?image=vol3&output=json", "POST")
    assert status == 200, content[:2000]  # the DDP run's model.pt is a plain state dict the infer task loads


VENV_2D_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from medsegdiff_bundle.data import write_synthetic_dataset
from medsegdiff_bundle.engine import bf16_is_fast
from medsegdiff_bundle.label.bundle import bundle_parser
from medsegdiff_bundle.label.infer import MedSegDiffInferTask

root = Path(sys.argv[1])
write_synthetic_dataset(root / "data", 2, (48, 40), num_classes=3, in_channels=3, seed=3)
overrides = {"num_classes": 3, "patch_size": [32, 32], "channels": [8, 16, 32], "steps": 2, "ensemble": 2,
             "amp": False, "class_names": ["polyp", "tool"]}
task = MedSegDiffInferTask(root, overrides, uncertainty_dir=root / "unc")
before = task.is_valid()
(root / "models").mkdir()
torch.save(bundle_parser("inference", root, overrides).get_parsed_content("network_def").state_dict(),
           root / "models" / "model.pt")
image = root / "data" / "images" / "case_0001.png"
label_file, result = task({"image": str(image), "device": "cpu"})
amp_task = MedSegDiffInferTask(root, {**overrides, "amp": True}, uncertainty_dir=root / "unc")
from monai.transforms import KeepLargestConnectedComponentd
plan = root / "postprocessing.json"
plan.write_text(json.dumps({"steps": [{"labels": [1, 2], "independent": False}]}))
plan_task = MedSegDiffInferTask(root, {**overrides, "postprocessing_plan": str(plan)}, uncertainty_dir=root / "unc")
kept = [list(t.converter.applied_labels) for t in plan_task.post_transforms({})
        if isinstance(t, KeepLargestConnectedComponentd)]
plan_label, _ = plan_task({"image": str(image), "device": "cpu"})
try:
    MedSegDiffInferTask(root, {**overrides, "postprocessing_plan": str(root / "absent.json")})
    bad_plan = ""
except FileNotFoundError as e:
    bad_plan = str(e)
print(json.dumps({"plan_steps": kept, "plan_label_shape": list(np.array(Image.open(plan_label)).shape),
                  "default_steps": sum(isinstance(t, KeepLargestConnectedComponentd) for t in task.post_transforms({})),
                  "bad_plan": bad_plan,"valid_before": before, "valid_after": task.is_valid(), "labels": task.labels,
                  "label_shape": list(np.array(Image.open(label_file)).shape),
                  "values": sorted(int(v) for v in np.unique(np.array(Image.open(label_file)))),
                  "image_shape": list(np.array(Image.open(image)).shape), "uncertainty": result["uncertainty"],
                  "request_anchor_weight": task.inferer({"anchor_weight": "0.25"}).sampler.anchor_weight,
                  "default_anchor_weight": task.inferer({}).sampler.anchor_weight,
                  "config_mirror": task._config["mirror"],
                  "request_mirror": list(task.inferer({"mirror": "true"}).sampler.mirror_axes),
                  "request_no_mirror": list(task.inferer({"mirror": False}).sampler.mirror_axes),
                  "default_mirror": list(task.inferer({}).sampler.mirror_axes),
                  "cpu_amp_config_off": task.inferer({"device": "cpu"}).amp,
                  "cpu_amp_config_on": amp_task.inferer({"device": "cpu"}).amp,
                  "cpu_bf16_is_fast": bf16_is_fast("cpu")}))
"""


def test_infer_task_2d_png_and_missing_weights(tmp_path):
    """In the label venv, without a server: 2D RGB PNG in, PNG label map of the input's size out; no weights ->
    the task is not valid (BasicInferTask alone would serve an untrained network)."""
    problem = _venv_problem()
    if problem:
        pytest.skip(problem)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([str(VENV_PY), "-c", VENV_2D_SCRIPT, str(tmp_path)], cwd="/", capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["valid_before"] is False and out["valid_after"] is True
    assert out["labels"] == {"polyp": 1, "tool": 2}
    assert out["label_shape"] == out["image_shape"][:2] == [48, 40]
    assert set(out["values"]) <= {0, 1, 2}
    assert Path(out["uncertainty"]["file"]).is_file()
    # the anchor blend is a per-request parameter, off unless asked for
    assert out["request_anchor_weight"] == 0.25 and out["default_anchor_weight"] == 0.0
    # test-time mirroring per request: every spatial axis or none; the bundle's setting otherwise
    assert out["request_mirror"] == [0, 1] and out["request_no_mirror"] == []
    assert out["default_mirror"] == ([0, 1] if out["config_mirror"] else [])
    # a CPU request runs bf16 only where the config allows it and this CPU computes bf16 natively
    assert out["cpu_amp_config_off"] is False and out["cpu_amp_config_on"] is out["cpu_bf16_is_fast"]
    # a post-processing plan from the bundle's overrides: its steps run after the argmax; none by default; a plan
    # file that is not there fails when the task is made, naming it
    assert out["plan_steps"] == [[1, 2]] and out["default_steps"] == 0
    assert out["plan_label_shape"] == [48, 40]
    assert "absent.json" in out["bad_plan"]


VENV_TRAIN_PLAN_SCRIPT = r"""
import json, sys
from pathlib import Path
from medsegdiff_bundle.engine import bf16_is_fast
from medsegdiff_bundle.label.train import MedSegDiffTrainTask

root = Path(sys.argv[1])
items = [{"image": str(root / f"img{i}.png"), "label": str(root / f"lab{i}.png")} for i in range(2)]
amp = {}
for name, overrides in (("bundle_default", {}), ("user_off", {"amp": False})):
    path, _, _ = MedSegDiffTrainTask(root / name, overrides).plan({"device": "cpu"}, items)
    amp[name] = json.loads(path.read_text(encoding="utf-8")).get("amp", "unset")
print(json.dumps({**amp, "cpu_bf16_is_fast": bf16_is_fast("cpu")}))
"""


def test_train_task_on_the_cpu_keeps_bf16_only_where_it_pays(tmp_path):
    """A CPU training request on a GPU machine: bf16 where this CPU computes it natively, a user's amp kept."""
    problem = _venv_problem()
    if problem:
        pytest.skip(problem)
    run = subprocess.run([str(VENV_PY), "-c", VENV_TRAIN_PLAN_SCRIPT, str(tmp_path)], cwd="/", capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["bundle_default"] is out["cpu_bf16_is_fast"] and out["user_off"] is False


def test_server_stops_leaving_no_process(label_server):
    server = label_server["server"]
    assert server.group_alive()
    server.stop()
    assert server.proc.returncode is not None
    assert not server.group_alive(), "processes of the server's group are still running"
    with pytest.raises(OSError):
        _request(f"{server.url}/info/", timeout=5)
