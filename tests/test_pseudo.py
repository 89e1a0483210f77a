"""Pseudo-labels: the threshold chosen on val, the COCO file made for the pool, and the imitation
weighted towards objects."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgefm.config import DetectorConfig
from edgefm.data.coco import CocoDetection, CocoSplit
from edgefm.tools.distill import feature_imitation
from edgefm.tools.pseudo import (
    best_threshold,
    f1_by_threshold,
    label_pool,
    pseudo_labelled,
    unlabelled_coco,
)

CATEGORIES = [{"id": 1, "name": "shirt"}, {"id": 2, "name": "bag"}]


def truth() -> dict:
    return {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20]},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 30, 20, 20]}],
            "categories": CATEGORIES}


def detection(category, bbox, score):
    return {"image_id": 1, "category_id": category, "bbox": bbox, "score": score}


def test_f1_counts_matches_once_and_the_best_threshold_drops_the_false_positives():
    records = [detection(1, [0, 0, 20, 20], 0.9), detection(1, [1, 1, 20, 20], 0.8),  # one duplicate
               detection(2, [30, 30, 20, 20], 0.6), detection(2, [0, 40, 10, 10], 0.3),  # one wrong place
               detection(1, [30, 30, 20, 20], 0.2)]  # wrong class
    f1 = f1_by_threshold(records, truth(), thresholds=(0.1, 0.5, 0.85, 0.95))
    assert f1[0.1] == pytest.approx(2 * 2 / (5 + 2))
    assert f1[0.5] == pytest.approx(2 * 2 / (3 + 2))
    assert f1[0.85] == pytest.approx(2 * 1 / (1 + 2))
    assert f1[0.95] == 0.0
    threshold, scores = best_threshold(records, truth())
    # above the wrong place (0.3), below the second box (0.6); the duplicate (0.8) costs what it costs
    assert scores[threshold] == pytest.approx(0.8) and threshold == pytest.approx(0.35)


def test_the_pool_gets_the_confident_detections_as_a_valid_coco_file(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("b.png", "a.png"):
        Image.new("RGB", (48, 32)).save(pool / name)
    (pool / "notes.txt").write_text("not an image")
    unlabelled = unlabelled_coco(pool, CATEGORIES, limit=5)
    assert [im["file_name"] for im in unlabelled["images"]] == ["a.png", "b.png"]
    assert (unlabelled["images"][0]["width"], unlabelled["images"][0]["height"]) == (48, 32)
    assert len(unlabelled_coco(pool, CATEGORIES, limit=1)["images"]) == 1
    found = [detection(1, [1, 2, 10, 10], 0.7), detection(2, [5, 5, 4, 4], 0.2)]
    labelled = pseudo_labelled(found, unlabelled, 0.5)
    assert [a["category_id"] for a in labelled["annotations"]] == [1]
    (tmp_path / "pool.json").write_text(json.dumps(labelled))
    _, target = CocoDetection(CocoSplit(tmp_path / "pool.json", pool))[0]
    assert target["boxes"].tolist() == [[1.0, 2.0, 11.0, 12.0]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no images"):
        unlabelled_coco(empty, CATEGORIES, limit=5)


def test_label_pool_chooses_on_val_and_writes_the_pool(tmp_path):
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    Image.new("RGB", (64, 64)).save(val_dir / "a.png")
    (tmp_path / "val.json").write_text(json.dumps(truth()))
    pool = tmp_path / "pool"
    pool.mkdir()
    Image.new("RGB", (64, 64)).save(pool / "p.png")
    cfg = DetectorConfig(image_size=64)

    def run(images):  # one confident shirt at the top left of every image, on a stride-4 grid
        heat = np.full((len(images), 2, 16, 16), -9.0, dtype=np.float32)
        heat[:, 0, 2, 2] = 3.0
        boxes = np.full((len(images), 4, 16, 16), 10.0, dtype=np.float32)
        return heat, boxes

    decided = label_pool(run, 4.0, cfg, CocoSplit(tmp_path / "val.json", val_dir), pool, 10, tmp_path)
    labelled = json.loads((tmp_path / "pool.json").read_text())
    assert decided["images"] == 1 and decided["boxes"] == len(labelled["annotations"]) == 1
    assert labelled["images"][0]["file_name"] == "p.png" and not (tmp_path / "unlabelled.json").exists()
    assert decided["val_boxes_per_image"] == 2.0
    assert decided["threshold"] in (float(t) for t in decided["val_f1"])


def test_feature_imitation_counts_where_the_teacher_sees_an_object():
    teacher = torch.zeros(1, 4, 2, 2)
    student = torch.zeros(1, 4, 2, 2)
    student[..., 0, 0] = 1.0  # wrong only at the one confident cell
    heat = torch.full((1, 3, 2, 2), -20.0)
    heat[0, 1, 0, 0] = 20.0
    assert feature_imitation(student, teacher, heat).item() == pytest.approx(1.0, rel=1e-6)
    student = torch.zeros(1, 4, 2, 2)
    student[..., 1, 1] = 1.0  # wrong only on the background
    assert feature_imitation(student, teacher, heat).item() < 1e-6
