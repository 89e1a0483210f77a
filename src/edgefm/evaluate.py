"""COCO evaluation with ``pycocotools``: the library calls COCOeval and reports its numbers.

Detections arrive in the letterboxed input's pixels; :func:`to_coco_results` maps them back to
the original image (one division by the letterbox scale) and to COCO's ``[x, y, w, h]``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from edgefm.config import DetectorConfig
from edgefm.data.coco import CocoDetection, CocoSplit, collate
from edgefm.data.transforms import detection_transforms
from edgefm.models.centernet import decode

# A model as evaluation sees it: float32 images (B, 3, S, S) in [0, 1] -> the head's raw arrays.
RunModel = Callable[[np.ndarray], tuple[np.ndarray, ...]]

SIZES = ("small", "medium", "large")


def to_coco_results(
    detections: list[dict[str, np.ndarray]], image_ids: list[int], scales: list[float],
    category_ids: list[int],
) -> list[dict]:
    """COCO result records from decoded detections (labels are contiguous class indices)."""
    records = []
    for found, image_id, scale in zip(detections, image_ids, scales, strict=True):
        boxes = np.asarray(found["boxes"], dtype=np.float64) / scale
        for (x0, y0, x1, y1), score, label in zip(boxes, found["scores"], found["labels"], strict=True):
            records.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return records


def coco_evaluate(annotations: Path, results: list[dict]) -> dict:
    """mAP@[.5:.95], mAP@.5, mAP@.75, mAP by size and AP per class (fractions in [0, 1]).

    Classes or sizes absent from the ground truth get ``None`` (COCOeval's -1).
    """
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        if not results:
            return _empty(truth)
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [None if s < 0 else float(s) for s in evaluation.stats]
    metrics = {"map": stats[0], "map50": stats[1], "map75": stats[2],
               **{f"map_{size}": stats[3 + i] for i, size in enumerate(SIZES)}}
    # precision: [iou thresholds, recall points, classes, area ranges, max dets]; area 0 = all
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    metrics["per_class"] = {}
    for k, category_id in enumerate(evaluation.params.catIds):
        valid = precision[:, :, k][precision[:, :, k] > -1]
        name = truth.cats[category_id]["name"]
        metrics["per_class"][name] = float(valid.mean()) if valid.size else None
    return metrics


def _empty(truth: COCO) -> dict:
    metrics = {"map": 0.0, "map50": 0.0, "map75": 0.0, **{f"map_{s}": 0.0 for s in SIZES}}
    metrics["per_class"] = {c["name"]: 0.0 for c in truth.loadCats(truth.getCatIds())}
    return metrics


def evaluate_split(run: RunModel, split: CocoSplit, cfg: DetectorConfig, stride: float,
                   batch_size: int = 32) -> dict:
    """COCO metrics of any model (PyTorch, ONNX Runtime, ...) on a split, through one decoder."""
    dataset = CocoDetection(split, detection_transforms(cfg.image_size, train=False))
    records: list[dict] = []
    for start in range(0, len(dataset), batch_size):
        images, targets = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        found = decode(*run(images.numpy()), stride=stride, max_detections=cfg.max_detections,
                       score_threshold=cfg.score_threshold)
        records += to_coco_results(found, [t["image_id"] for t in targets], [t["scale"] for t in targets],
                                   dataset.category_ids)
    return coco_evaluate(split.annotations, records)
