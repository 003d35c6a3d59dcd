"""Largest-component post-processing chosen on validation cases (nnU-Net's): the per-case candidate Dice, the
decision, scoring a plan without a second pass, the plan file, and the plan applied by the bundle's
post-processing."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from medsegdiff_bundle.data.transforms import build_postprocessing, build_preprocessing
from medsegdiff_bundle.engine.handlers import MetricsTableHandler
from medsegdiff_bundle.evaluation import (
    CANDIDATES,
    component_candidates,
    dice_scores,
    dice_under_plan,
    load_postprocessing_plan,
    plan_transforms,
    select_postprocessing,
)


def _map(*boxes: tuple[int, int, int, int, int], size: int = 32) -> torch.Tensor:
    """A ``(1, size, size)`` label map with class ``c`` in each box ``(c, y0, y1, x0, x1)``."""
    m = torch.zeros(1, size, size, dtype=torch.long)
    for c, y0, y1, x0, x1 in boxes:
        m[0, y0:y1, x0:x1] = c
    return m


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


LESION = (1, 4, 14, 4, 14)  # 100 pixels
ISLAND = (1, 24, 28, 24, 28)  # 16 pixels, apart from the lesion


def test_binary_candidates_score_the_map_without_its_islands():
    target = _map(LESION)
    pred = _map(LESION, ISLAND)
    row = component_candidates(pred, target, 2, "a")
    assert list(row.columns) == ["case", "class", *CANDIDATES] and row["class"].tolist() == [1]
    assert row["raw"].item() == pytest.approx(_dice(pred, target)) == pytest.approx(200 / 216)
    for name in CANDIDATES[1:]:  # with one class every variant is the foreground's largest component
        assert row[name].item() == pytest.approx(1.0)


def test_candidate_dice_is_the_metric_tables_dice_and_bad_maps_are_refused():
    # class 2 absent from both maps (Dice 1, as the metric table scores it), class 3 predicted but absent
    pred, target = _map(LESION, (3, 20, 24, 2, 6)), _map((1, 6, 14, 4, 14))
    row = component_candidates(pred, target, 4, "a")
    np.testing.assert_allclose(row["raw"], dice_scores(pred[None], target[None], 4)[0].numpy(), atol=1e-7)
    assert row["raw"].tolist()[1:] == [1.0, 0.0]
    with pytest.raises(ValueError, match="case b: the prediction holds labels 0..3, outside the 3 classes"):
        component_candidates(pred, target, 3, "b")
    with pytest.raises(ValueError, match="case c: prediction .* differ"):
        component_candidates(pred, target[..., :16], 4, "c")


def test_a_true_second_lesion_keeps_the_plan_empty_and_false_islands_fill_it():
    false_islands = pd.concat([component_candidates(_map(LESION, ISLAND), _map(LESION), 2, f"f{i}") for i in range(3)])
    plan = select_postprocessing(false_islands)
    assert plan["steps"] == [{"labels": [1], "independent": False}]
    assert plan["scores"]["foreground"]["applied"] is True
    assert plan["scores"]["dice_after"] == pytest.approx(1.0)
    assert plan["scores"]["dice_before"] == pytest.approx(200 / 216)
    # two polyps, both real: the largest-component step would delete one, so the cases refuse it
    second_lesion = pd.concat([component_candidates(_map(LESION, ISLAND), _map(LESION, ISLAND), 2, f"t{i}")
                               for i in range(3)])
    assert select_postprocessing(second_lesion)["steps"] == []
    # one real second polyp against two false islands: the mean gain (+0.025) is within two standard errors of the
    # per-case gains (0.049 each), so the guard refuses what the mean alone would take
    mixed = pd.concat([false_islands.iloc[:2], second_lesion.iloc[:1]])
    gains = np.array([16 / 216, 16 / 216, _dice(_map(LESION), _map(LESION, ISLAND)) - 1.0])
    assert gains.mean() > 0 and gains.mean() < 2 * gains.std(ddof=1) / np.sqrt(3)
    guarded = select_postprocessing(mixed)
    assert guarded["steps"] == [] and guarded["scores"]["foreground"]["gain"] == pytest.approx(gains.mean())
    assert guarded["scores"]["foreground"]["standard_error"] == pytest.approx(gains.std(ddof=1) / np.sqrt(3))
    assert (guarded["scores"]["foreground"]["cases_higher"], guarded["scores"]["foreground"]["cases_lower"]) == (2, 1)
    assert select_postprocessing(mixed, min_standard_errors=0)["steps"] == [{"labels": [1], "independent": False}]
    assert select_postprocessing(mixed, min_gain=0.03, min_standard_errors=0)["steps"] == []
    # a single case has no standard error: only the mean-alone rule can take a step on it
    assert select_postprocessing(false_islands.iloc[:1])["steps"] == []
    assert select_postprocessing(false_islands.iloc[:1], min_standard_errors=0)["steps"] != []


def test_multiclass_decision_per_class_on_top_of_the_foreground_step():
    # class 1: a false island of its own, apart from everything; class 2: two true parts, apart from each other
    target = _map((1, 2, 10, 2, 10), (2, 2, 10, 20, 28), (2, 20, 28, 2, 10))
    pred = _map((1, 2, 10, 2, 10), (2, 2, 10, 20, 28), (2, 20, 28, 2, 10), (1, 22, 26, 22, 26))
    table = pd.concat([component_candidates(pred, target, 3, c) for c in "cde"], ignore_index=True)
    assert table["class"].tolist() == [1, 2] * 3
    # the foreground as one keeps the single largest region only: it deletes a true class-2 part, so it loses
    assert table.loc[1, "foreground"] < table.loc[1, "raw"] == pytest.approx(1.0)
    assert table.loc[0, "raw"] < table.loc[0, "per_class"] == pytest.approx(1.0)
    plan = select_postprocessing(table)
    assert plan["steps"] == [{"labels": [1], "independent": True}]  # class 1 alone, class 2 untouched
    assert plan["scores"]["classes"]["2"]["applied"] is False
    assert dice_under_plan(table, plan).tolist() == pytest.approx([1.0] * 3)


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_dice_under_a_plan_equals_applying_it(num_classes):
    """The table's Dice under every possible plan is exactly the Dice of the maps the plan's transforms produce,
    which is what lets test cases be scored under a validation-chosen plan without sampling them again."""
    rng = np.random.default_rng(num_classes)
    preds, targets, tables = [], [], []
    for i in range(4):
        # blobs of random classes: components touch, overlap and split in every way
        boxes = [(int(rng.integers(1, num_classes)), *sorted(rng.integers(0, 24, 2) + [0, 8]),
                  *sorted(rng.integers(0, 24, 2) + [0, 8])) for _ in range(6)]
        truth = [(int(rng.integers(1, num_classes)), *b[1:]) if rng.random() < 0.3 else b for b in boxes[:4]]
        preds.append(_map(*boxes))
        targets.append(_map(*truth))
        tables.append(component_candidates(preds[-1], targets[-1], num_classes, f"case{i}"))
    table = pd.concat(tables, ignore_index=True)
    classes = list(range(1, num_classes))
    for use_fg in (False, True):
        for r in range(len(classes) + 1):
            for own in itertools.combinations(classes, r):
                steps = ([{"labels": classes, "independent": False}] if use_fg else []) + [
                    {"labels": [c], "independent": True} for c in own]
                xforms = plan_transforms({"steps": steps}, "pred")
                expected = []
                for pred, target in zip(preds, targets):
                    d = {"pred": pred.clone()}
                    for t in xforms:
                        d = t(d)
                    expected.append(float(dice_scores(d["pred"][None], target[None], num_classes).mean()))
                got = dice_under_plan(table, {"steps": steps})
                np.testing.assert_allclose(got.loc[[f"case{i}" for i in range(4)]], expected, atol=1e-6,
                                           err_msg=str(steps))


def test_plan_files_and_their_errors(tmp_path):
    assert load_postprocessing_plan(None) == [] and load_postprocessing_plan("") == []
    good = tmp_path / "postprocessing.json"
    good.write_text(json.dumps({"steps": [{"labels": [1, 2], "independent": False}], "scores": {}}))
    assert load_postprocessing_plan(good) == [{"labels": [1, 2], "independent": False}]
    as_dict = {"steps": json.loads(good.read_text())["steps"]}
    assert load_postprocessing_plan(str(good)) == load_postprocessing_plan(as_dict)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_postprocessing_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for content, field in (({"step": []}, "'steps'"),
                           ({"steps": [{"labels": [0], "independent": True}]}, "steps\\[0\\]"),
                           ({"steps": [{"labels": [1]}]}, "steps\\[0\\]"),
                           ({"steps": [{"labels": [1], "independent": "no"}]}, "steps\\[0\\]")):
        bad.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=f"bad.json.*{field}"):
            load_postprocessing_plan(bad)
    table = component_candidates(_map(LESION), _map(LESION), 3, "a")
    for steps in ([{"labels": [1], "independent": True}, {"labels": [1, 2], "independent": False}],
                  [{"labels": [1], "independent": False}]):
        with pytest.raises(ValueError, match="foreground step must come first, once, over every class"):
            dice_under_plan(table, {"steps": steps})
    with pytest.raises(ValueError, match="the candidate table lacks"):
        select_postprocessing(pd.DataFrame({"case": ["a"], "class": [1], "raw": [0.5]}))


def test_metrics_handler_writes_candidates_and_the_plan_they_choose(tmp_path):
    """What evaluate.json writes for its (validation) cases: the candidates per case and class, and the plan."""
    handler = MetricsTableHandler(tmp_path, 2)

    class Engine:  # the two fields the handler reads from an ignite engine
        class state:
            batch = None
            output = None

    for i in range(3):
        pred = MetaTensor(_map(LESION, ISLAND).float(), meta={"filename_or_obj": f"/data/case{i}.png"})
        Engine.state.output = [{"pred": pred, "label": _map(LESION).float()}]
        handler.iteration_completed(Engine)
    table = handler.write()
    assert table["case"].tolist() == ["case0", "case1", "case2"]
    candidates = pd.read_csv(tmp_path / "postprocessing_candidates.csv")
    assert candidates["case"].tolist() == ["case0", "case1", "case2"]
    np.testing.assert_allclose(candidates["raw"], table["dice"])  # the candidates' raw Dice is the table's
    plan = json.loads((tmp_path / "postprocessing.json").read_text())
    assert plan["steps"] == [{"labels": [1], "independent": False}] and plan["scores"]["cases"] == 3
    without = MetricsTableHandler(tmp_path / "off", 2, postprocessing_candidates=False)
    without.iteration_completed(Engine)
    without.write()
    assert not (tmp_path / "off" / "postprocessing.json").exists()


def test_the_bundle_post_processing_applies_a_plan_in_the_original_geometry(tmp_path):
    """A prediction at the 32x32 patch with a false island, inverted to the 48x40 image: with the plan the written
    label map keeps the lesion only; without it, both."""
    image = tmp_path / "case.png"
    Image.fromarray(np.full((48, 40, 3), 128, np.uint8)).save(image)
    pre = build_preprocessing(2, "infer", [32, 32], 2, "rgb")
    logits = torch.zeros(2, 32, 32)
    logits[1] = (_map(LESION, ISLAND)[0] > 0).float() * 2 - 1
    outputs = {}
    for name, plan in (("raw", None), ("plan", {"steps": [{"labels": [1], "independent": False}]})):
        data = pre({"image": str(image)})
        data["pred"] = MetaTensor(torch.cat([logits, torch.zeros(1, 32, 32)]), meta=data["image"].meta,
                                  applied_operations=data["image"].applied_operations)
        post = build_postprocessing(pre, tmp_path / name, 2, overlay=False, postprocessing_plan=plan)
        post(data)
        outputs[name] = np.array(Image.open(tmp_path / name / "case_seg.png"))
    from scipy import ndimage

    assert outputs["raw"].shape == outputs["plan"].shape == (48, 40)
    assert ndimage.label(outputs["raw"])[1] == 2 and ndimage.label(outputs["plan"])[1] == 1
    assert (outputs["plan"] <= outputs["raw"]).all() and outputs["plan"].sum() > 0.8 * outputs["raw"].sum()
