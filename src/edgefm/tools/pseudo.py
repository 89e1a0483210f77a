"""Pseudo-labels: model A labels the unlabelled pool, and a student learns from those labels too.

What a foundation-model teacher is best at is labelling data nobody labelled. Self-training
(Xie et al., 2020, "Self-training with Noisy Student") turns the teacher's confident predictions
on unlabelled images into labels; the student then trains on the labelled scenes and the
pseudo-labelled pool with the ordinary detection loss and the ordinary augmentation. The teacher
runs once per pool image and its detections are kept as a COCO file, so a student step costs the
student's compute only (online distillation runs A at every step).

Which detections become labels is decided on val, not guessed: the score threshold at which A's
detections best match the val labels (F1 at IoU 0.5, :func:`best_threshold`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefm.artifacts import atomic_write_json
from edgefm.config import DetectorConfig
from edgefm.data.coco import CocoSplit, validate_coco
from edgefm.runtime import RunModel
from edgefm.runtime.images import read_image
from edgefm.tools.evaluate import box_iou, predict_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.95, 0.05))


def unlabelled_coco(folder: Path, categories: list[dict], limit: int) -> dict:
    """A COCO file without annotations for the first ``limit`` images of ``folder`` (by name)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) to pseudo-label")
    images = []
    for i, path in enumerate(files, start=1):
        width, height = read_image(path).size
        images.append({"id": i, "file_name": path.name, "width": width, "height": height})
    return {"images": images, "annotations": [], "categories": categories}


def xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def f1_by_threshold(records: list[dict], truth: dict, thresholds: tuple[float, ...] = THRESHOLDS,
                    iou: float = 0.5) -> dict[float, float]:
    """F1 of the detections scored >= each threshold against the ground truth of ``truth`` (a
    COCO dict): a detection is right if it is the highest-scored match (same class, IoU >= ``iou``)
    of a ground-truth box not already matched."""
    boxes: dict[tuple[int, int], np.ndarray] = {}
    for ann in truth["annotations"]:
        key = (ann["image_id"], ann["category_id"])
        boxes[key] = np.vstack([boxes.get(key, np.zeros((0, 4))), [xyxy(ann["bbox"])]])
    found: dict[tuple[int, int], list[dict]] = {}
    for record in records:
        found.setdefault((record["image_id"], record["category_id"]), []).append(record)
    scores = {}
    for threshold in thresholds:
        hits = predicted = 0
        for key, detections in found.items():
            kept = sorted((d for d in detections if d["score"] >= threshold), key=lambda d: -d["score"])
            predicted += len(kept)
            truths = boxes.get(key, np.zeros((0, 4)))
            if not kept or not len(truths):
                continue
            overlap = box_iou(np.array([xyxy(d["bbox"]) for d in kept]), truths)
            taken = np.zeros(len(truths), dtype=bool)
            for row in overlap:
                row = np.where(taken, 0.0, row)
                if row.max() >= iou:
                    taken[row.argmax()] = True
            hits += int(taken.sum())
        total = len(truth["annotations"])
        scores[threshold] = 2 * hits / max(predicted + total, 1)
    return scores


def best_threshold(records: list[dict], truth: dict) -> tuple[float, dict[float, float]]:
    """The score threshold with the highest F1 (the lowest of equals) and every threshold's F1."""
    scores = f1_by_threshold(records, truth)
    return max(scores, key=lambda t: (scores[t], -t)), scores


def pseudo_labelled(records: list[dict], unlabelled: dict, threshold: float) -> dict:
    """``unlabelled`` with the detections scored >= ``threshold`` as its annotations."""
    annotations = [{"id": i, "image_id": r["image_id"], "category_id": r["category_id"], "bbox": r["bbox"],
                    "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
                   for i, r in enumerate((r for r in records if r["score"] >= threshold), start=1)]
    return {**unlabelled, "annotations": annotations}


def label_pool(run: RunModel, stride: float, cfg: DetectorConfig, val: CocoSplit, pool: Path, limit: int,
               work: Path) -> dict:
    """Pseudo-label ``limit`` pool images with ``run`` (model A) at the threshold chosen on ``val``.

    Writes ``work/pool.json`` (a COCO file for the pool's images) and returns what was decided:
    the threshold, every threshold's val F1, and how many images and boxes the pool got."""
    truth = validate_coco(val.annotations)
    threshold, f1 = best_threshold(predict_split(run, val, cfg, stride), truth)
    unlabelled = unlabelled_coco(pool, truth["categories"], limit)
    atomic_write_json(work / "unlabelled.json", unlabelled)
    records = predict_split(run, CocoSplit(work / "unlabelled.json", pool), cfg, stride)
    labelled = pseudo_labelled(records, unlabelled, threshold)
    atomic_write_json(work / "pool.json", labelled)
    (work / "unlabelled.json").unlink()
    return {"threshold": threshold, "val_f1": {f"{t:g}": v for t, v in f1.items()},
            "images": len(labelled["images"]), "boxes": len(labelled["annotations"]),
            "val_boxes_per_image": len(truth["annotations"]) / max(len(truth["images"]), 1)}
