"""COCO evaluation with ``pycocotools``: the library calls COCOeval and reports its numbers.

Detections arrive in the letterboxed input's pixels; :func:`to_coco_results` maps them back to
the original image (one division by the letterbox scale) and to COCO's ``[x, y, w, h]``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from edgefm.config import DetectorConfig
from edgefm.data.coco import CocoDetection, CocoSplit, collate
from edgefm.data.transforms import detection_transforms
from edgefm.decode import decode
from edgefm.runtime import RunModel

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


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every XYXY box in ``a`` (N, 4) with every one in ``b`` (M, 4): (N, M)."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area = lambda boxes: (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def detection_agreement(reference: list[dict], candidate: list[dict], min_score: float = 0.3,
                        iou: float = 0.5) -> dict:
    """How far two models' detections of the same images agree, counting those scored >=
    ``min_score``. A detection is *matched* if the other model has one of the same class with
    IoU >= ``iou``: ``recall`` is the fraction of the reference's that are matched, ``precision``
    the fraction of the candidate's; ``mean_iou`` is the mean best IoU of the matched reference
    detections and ``max_score_gap`` the largest score change between them and their match."""
    counts = {"reference": [0, 0], "candidate": [0, 0]}  # [matched, total]
    ious, gaps = [], [0.0]
    for ref, cand in zip(reference, candidate, strict=True):
        r, c = ref["scores"] >= min_score, cand["scores"] >= min_score
        overlap = box_iou(ref["boxes"][r], cand["boxes"][c])
        overlap[ref["labels"][r][:, None] != cand["labels"][c][None, :]] = 0
        for side, axis in (("reference", 1), ("candidate", 0)):
            counts[side][1] += overlap.shape[1 - axis]
            if overlap.size:
                counts[side][0] += int((overlap.max(axis=axis) >= iou).sum())
        if overlap.size:
            best = overlap.argmax(axis=1)
            hits = overlap.max(axis=1) >= iou
            ious += overlap.max(axis=1)[hits].tolist()
            gaps += np.abs(ref["scores"][r][hits] - cand["scores"][c][best[hits]]).tolist()
    (matched_ref, total_ref), (matched_cand, total_cand) = counts["reference"], counts["candidate"]
    return {"recall": matched_ref / max(total_ref, 1), "precision": matched_cand / max(total_cand, 1),
            "mean_iou": float(np.mean(ious)) if ious else None, "max_score_gap": float(max(gaps)),
            "reference_detections": total_ref, "candidate_detections": total_cand, "min_score": min_score,
            "iou": iou}
