"""MONAI Label app serving the MedSegDiff-V2 bundle.

    source ~/.cache/medsegdiff/label-venv/bin/activate      # scripts/setup_label_env.sh
    monailabel start_server --app medsegdiff_bundle/label/app --studies STUDIES \\
        --conf models medsegdiff --conf bundle_root BUNDLE_ROOT [--conf KEY VALUE ...]

(see ``medsegdiff_bundle/label/README.md``).

``--conf`` keys:

* ``models``: ``medsegdiff`` (or ``all``); required, as in MONAI Label's sample apps.
* ``bundle_root``: folder with ``models/model.pt`` (default: the repository's ``bundle/``); training writes there.
* ``bundle_overrides``: the model's bundle keys, a JSON file or inline JSON (default:
  ``<bundle_root>/bundle_overrides.json`` when it exists, e.g. the output folder of ``medsegdiff auto``).
* ``uncertainty_dir``: where uncertainty maps are written (default ``<tmp>/medsegdiff_label/uncertainty``).
* ``uncertainty_tag``: datastore tag the uncertainty map of a datastore image is saved under (default
  ``medsegdiff_uncertainty``; empty: don't save), so that clients download it with
  ``GET /datastore/label?label=<image>&tag=medsegdiff_uncertainty``.
* ``preload``: build the network at start-up (``false``); ``skip_trainers``: no train task (``false``).

Errors are answered as HTTP errors with a ``detail`` message: an unknown image id -> 404, an image that cannot be
read -> 422, anything else failing in inference -> 500.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import strtobool

import medsegdiff_bundle
from medsegdiff_bundle.label.bundle import DEFAULT_BUNDLE_ROOT, load_overrides
from medsegdiff_bundle.label.infer import ImageReadError, MedSegDiffInferTask
from medsegdiff_bundle.label.train import MedSegDiffTrainTask

logger = logging.getLogger(__name__)

MODEL = "medsegdiff"
UNCERTAINTY_TAG = "medsegdiff_uncertainty"


class MedSegDiffApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        models = [m.strip() for m in conf.get("models", "").split(",") if m.strip()]
        if not models:
            raise ValueError(f"no model selected: start the server with --conf models {MODEL}")
        unknown = [m for m in models if m not in (MODEL, "all")]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; this app serves {MODEL!r} (or 'all')")
        self.bundle_root = os.path.realpath(os.path.expanduser(conf.get("bundle_root") or str(DEFAULT_BUNDLE_ROOT)))
        self.overrides = load_overrides(conf.get("bundle_overrides"), self.bundle_root)
        self.uncertainty_dir = conf.get("uncertainty_dir") or None
        self.uncertainty_tag = conf.get("uncertainty_tag", UNCERTAINTY_TAG)
        logger.info(f"MedSegDiff app: bundle_root={self.bundle_root}; overrides={self.overrides}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedSegDiff-V2",
            description="MedSegDiff-V2 diffusion segmentation (MONAI bundle): label map + uncertainty map",
            version=medsegdiff_bundle.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        task = MedSegDiffInferTask(
            self.bundle_root,
            self.overrides,
            uncertainty_dir=self.uncertainty_dir,
            preload=bool(strtobool(self.conf.get("preload", "false"))),
        )
        if not task.is_valid():
            logger.warning(f"{MODEL}: no weights at {task.get_path(validate=False)}; the model is not served "
                           "until training (POST /train/medsegdiff) writes them")
        return {MODEL: task}

    def init_trainers(self) -> dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        return {MODEL: MedSegDiffTrainTask(self.bundle_root, self.overrides)}

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        datastore = datastore if datastore else self.datastore()
        image = request.get("image")
        model = request.get("model")
        task = self._infers.get(model)
        if task is not None and not task.is_valid():
            raise HTTPException(status_code=503, detail=f"model {model!r} has no weights yet "
                                                        f"({task.get_path(validate=False)}); train it first")
        from_datastore = isinstance(image, str) and not os.path.exists(image)
        if from_datastore and not datastore.get_image_uri(image):
            raise HTTPException(status_code=404, detail=f"image {image!r} not found in the datastore")
        try:
            result = super().infer(request, datastore)
        except HTTPException:
            raise
        except ImageReadError as e:
            logger.error(f"infer {image!r}: {e}")
            raise HTTPException(status_code=422, detail=str(e)) from e
        except MONAILabelException as e:
            raise HTTPException(status_code=400, detail=f"{e.error.value}: {e.msg}") from e
        except Exception as e:  # noqa: BLE001 - answer with the reason instead of a bare 500
            logger.exception(f"infer {image!r} failed")
            raise HTTPException(status_code=500, detail=f"inference failed for image {image!r}: "
                                                        f"{type(e).__name__}: {e}") from e

        unc = (result.get("params") or {}).get("uncertainty")
        if unc and from_datastore and self.uncertainty_tag and os.path.exists(unc.get("file", "")):
            try:
                datastore.save_label(image, unc["file"], self.uncertainty_tag,
                                     {"model": model, "kind": unc.get("kind"), "type": "uncertainty"})
                unc["tag"] = self.uncertainty_tag
                unc["label"] = image
            except Exception as e:  # noqa: BLE001 - the segmentation is still valid
                logger.warning(f"could not store the uncertainty map of {image!r} in the datastore: {e}")
        return result
