"""The bootstrap interval of mAP: its accumulate is COCOeval's, weighted by how often an image counts."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from edgefm.tools.evaluate import bootstrap_map, coco_evaluate, interval_gap, weighted_map


def synthetic(tmp_path, copies: dict[int, int] | None = None, images: int = 12, seed: int = 0):
    """Ground truth and noisy detections for ``images`` images of 2 classes; image ``i`` appears
    ``copies[i]`` times (0: left out), each copy under a new id with the same boxes and scores."""
    rng = np.random.default_rng(seed)
    truth = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    results = []
    copies = copies or {}
    next_id = 1
    for i in range(images):
        objects = [(rng.uniform(0, 40, 2), rng.uniform(8, 24, 2), int(rng.integers(1, 3)))
                   for _ in range(int(rng.integers(1, 4)))]
        found = [(xy + rng.normal(0, 3, 2), wh * rng.uniform(0.8, 1.2, 2), c, rng.uniform(0.2, 1.0))
                 for xy, wh, c in objects if rng.random() < 0.8]
        found += [(rng.uniform(0, 40, 2), rng.uniform(8, 24, 2), int(rng.integers(1, 3)), rng.uniform(0, 0.6))
                  for _ in range(int(rng.integers(0, 3)))]
        for _ in range(copies.get(i, 1)):
            image_id = next_id
            next_id += 1
            truth["images"].append({"id": image_id, "file_name": f"{i}.png", "width": 64, "height": 64})
            for xy, wh, c in objects:
                truth["annotations"].append({"id": len(truth["annotations"]) + 1, "image_id": image_id,
                                             "category_id": c, "bbox": [*xy, *wh], "area": float(wh.prod()),
                                             "iscrowd": 0})
            results += [{"image_id": image_id, "category_id": c, "bbox": [*xy, *wh], "score": float(s)}
                        for xy, wh, c, s in found]
    path = tmp_path / f"truth-{len(truth['images'])}.json"
    path.write_text(json.dumps(truth, default=float))
    return path, results


def evaluated(path, results) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(path))
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def test_unit_weights_give_cocoevals_own_map(tmp_path):
    evaluation = evaluated(*synthetic(tmp_path))
    assert weighted_map(evaluation, np.ones((1, 12)))[0] == pytest.approx(evaluation.stats[0], abs=1e-12)


def test_integer_weights_equal_a_set_with_images_repeated(tmp_path):
    weights = np.array([2, 0, 1, 3, 1, 0, 1, 1, 2, 1, 0, 1], dtype=float)
    base = evaluated(*synthetic(tmp_path))
    repeated = evaluated(*synthetic(tmp_path, copies=dict(enumerate(weights.astype(int)))))
    # equal scores of repeated detections sort as a block here and interleaved in COCOeval
    assert weighted_map(base, weights[None])[0] == pytest.approx(repeated.stats[0], abs=5e-3)


def test_interval_brackets_the_map_and_narrows_with_more_images(tmp_path):
    small = coco_evaluate(*synthetic(tmp_path, images=12), bootstrap=200)
    large = coco_evaluate(*synthetic(tmp_path, images=120), bootstrap=200)
    for metrics in (small, large):
        low, high = metrics["map_ci"]
        assert low <= metrics["map"] <= high and low < high
    assert np.diff(large["map_ci"])[0] < np.diff(small["map_ci"])[0]
    assert np.array_equal(bootstrap_map(evaluated(*synthetic(tmp_path)), 50, seed=3),
                          bootstrap_map(evaluated(*synthetic(tmp_path)), 50, seed=3))


def test_a_subset_of_images_scores_as_a_truth_file_of_those_images_alone(tmp_path):
    def first_five(results: list[dict]) -> list[dict]:  # fresh copies: COCO.loadRes writes into them
        return [dict(r) for r in results if r["image_id"] <= 5]

    full, results = synthetic(tmp_path)
    alone, own_results = synthetic(tmp_path, copies={i: int(i < 5) for i in range(12)})
    assert own_results == first_five(results)
    subset = coco_evaluate(full, first_five(results), bootstrap=50, image_ids=[1, 2, 3, 4, 5])
    assert subset == coco_evaluate(alone, own_results, bootstrap=50)
    assert subset["map"] > coco_evaluate(full, first_five(results))["map"]  # else the rest counts as missed


def test_a_gap_counts_only_beyond_both_half_widths():
    a = {"map": 0.40, "map_ci": [0.38, 0.42]}
    assert interval_gap(a, {"map": 0.35, "map_ci": [0.33, 0.37]})["significant"]
    assert not interval_gap(a, {"map": 0.37, "map_ci": [0.35, 0.39]})["significant"]
