"""COCO evaluation with ``pycocotools``: the library calls COCOeval and reports its numbers.

Detections arrive in the letterboxed input's pixels; :func:`to_coco_results` maps them back to
the original image (one division by the letterbox scale) and to COCO's ``[x, y, w, h]``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from edgefm.config import DetectorConfig
from edgefm.data.coco import CocoDetection, CocoSplit, collate, validate_coco
from edgefm.data.transforms import detection_transforms
from edgefm.runtime import RunModel
from edgefm.runtime.decode import decode

# raw outputs of a model (NumPy, batch first) -> per image: XYXY boxes in input pixels, scores, labels
Decoder = Callable[..., list[dict]]

SIZES = ("small", "medium", "large")
BOOTSTRAP = 1000  # resamples of the eval images behind every interval the book prints


def torch_runner(model) -> RunModel:
    """Wrap a PyTorch detector as :data:`edgefm.runtime.RunModel` (NumPy in, NumPy out), on
    whichever device the model is."""

    @torch.no_grad()
    def run(images):
        model.eval()
        device = next(model.parameters()).device
        return tuple(o.float().cpu().numpy() for o in model(torch.from_numpy(images).to(device)))

    return run


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


def coco_evaluate(annotations: Path, results: list[dict], bootstrap: int = 0, samples: bool = False,
                  image_ids: list[int] | None = None) -> dict:
    """mAP@[.5:.95], mAP@.5, mAP@.75, mAP by size and AP per class (fractions in [0, 1]), over
    the images ``image_ids`` (default: all; the others' objects are left out, not missed).

    Classes or sizes absent from the ground truth get ``None`` (COCOeval's -1). With
    ``bootstrap`` > 0, ``map_ci`` is the 95 % interval of mAP over that many resamplings of the
    images (:func:`bootstrap_maps`); ``samples`` keeps them (``map_samples``) for a paired gap.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = validate_coco(annotations)  # checked, and an ``area`` for every object
        truth.createIndex()
        if not results:
            empty = {"map_ci": [0.0, 0.0], **({"map_samples": [0.0] * bootstrap} if samples else {})}
            return {**_empty(truth), **(empty if bootstrap else {})}
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        if image_ids is not None:
            evaluation.params.imgIds = list(image_ids)  # COCOeval sorts and dedupes them
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
    if bootstrap:
        maps = bootstrap_maps(evaluation, bootstrap)
        metrics["map_ci"] = np.percentile(maps, [2.5, 97.5]).tolist()
        if samples:
            metrics["map_samples"] = maps.tolist()
    return metrics


def _category_detections(evaluation: COCOeval, k: int) -> tuple[np.ndarray, ...] | None:
    """One category's evaluated detections across images, sorted by score as COCOeval sorts
    them (area "all", 100 detections): true/false positives (T, D), each detection's image index,
    and each image's count of ground truths that count."""
    images, areas = len(evaluation.params.imgIds), len(evaluation.params.areaRng)
    entries = [(i, e) for i in range(images)
               if (e := evaluation.evalImgs[k * areas * images + i]) is not None]
    if not entries:
        return None
    max_det = evaluation.params.maxDets[-1]
    scores = np.concatenate([e["dtScores"][:max_det] for _, e in entries])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([e["dtMatches"][:, :max_det] for _, e in entries], axis=1)[:, order]
    ignored = np.concatenate([e["dtIgnore"][:, :max_det] for _, e in entries], axis=1)[:, order]
    image_of = np.concatenate([np.full(len(e["dtScores"][:max_det]), i) for i, e in entries])[order]
    counted = np.zeros(images)
    for i, e in entries:
        counted[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
    tps = np.logical_and(matched, ~ignored).astype(float)
    fps = np.logical_and(~matched.astype(bool), ~ignored).astype(float)
    return tps, fps, image_of, counted


def weighted_map(evaluation: COCOeval, weights: np.ndarray) -> np.ndarray:
    """mAP@[.5:.95] for each row of ``weights`` (R, images): image ``i`` counted ``weights[r, i]``
    times, as if it appeared that often in the set. COCOeval's accumulate, vectorised over the
    rows; a row of ones gives COCOeval's own mAP."""
    thresholds = evaluation.params.recThrs
    total = np.zeros(len(weights))
    valid = np.zeros(len(weights))
    for k in range(len(evaluation.params.catIds)):
        found = _category_detections(evaluation, k)
        if found is None:
            continue
        tps, fps, image_of, counted = found
        positives = weights @ counted  # (R,)
        w = weights[:, image_of][:, None, :]  # (R, 1, D)
        tp, fp = np.cumsum(tps[None] * w, axis=2), np.cumsum(fps[None] * w, axis=2)  # (R, T, D)
        recall = tp / np.maximum(positives, 1e-12)[:, None, None]
        precision = tp / (tp + fp + np.spacing(1))
        envelope = np.maximum.accumulate(precision[..., ::-1], axis=2)[..., ::-1]
        q = np.zeros((*tp.shape[:2], len(thresholds)))
        for r, t in np.ndindex(*tp.shape[:2]):
            at = np.searchsorted(recall[r, t], thresholds, side="left")
            inside = at < tp.shape[2]
            q[r, t, inside] = envelope[r, t, at[inside]]
        has = positives > 0
        total += np.where(has, q.mean(axis=(1, 2)), 0.0)
        valid += has
    return total / np.maximum(valid, 1)


def bootstrap_maps(evaluation: COCOeval, resamples: int = 1000, seed: int = 0, chunk: int = 50) -> np.ndarray:
    """mAP@[.5:.95] on ``resamples`` bootstrap resamplings of the evaluated images (drawn with
    replacement, as many as there are). The draws depend only on ``seed`` and the number of
    images, so two models evaluated on one split get the same resamplings: their difference,
    resampling by resampling, is a *paired* bootstrap (:func:`gap_interval`)."""
    rng = np.random.default_rng(seed)
    images = len(evaluation.params.imgIds)
    maps = []
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, images, size=(min(chunk, resamples - start), images))
        weights = np.stack([np.bincount(row, minlength=images) for row in draws]).astype(float)
        maps.append(weighted_map(evaluation, weights))
    return np.concatenate(maps)


def bootstrap_map(evaluation: COCOeval, resamples: int = 1000, seed: int = 0,
                  chunk: int = 50) -> np.ndarray:
    """The 95 % percentile interval of mAP@[.5:.95] over bootstrap resamplings of the evaluated
    images (:func:`bootstrap_maps`): how far the figure could move on another eval set of the same
    kind. ``evaluation`` has run ``evaluate()``."""
    return np.percentile(bootstrap_maps(evaluation, resamples, seed, chunk), [2.5, 97.5])


def gap_interval(a_samples: list[float], b_samples: list[float]) -> list[float]:
    """The 95 % interval of ``a``'s mAP minus ``b``'s from their ``map_samples`` on the same
    resamplings of one split (a paired bootstrap: narrower than the two intervals side by side,
    because an image hard for one model is mostly hard for the other)."""
    if len(a_samples) != len(b_samples):
        raise ValueError(f"paired bootstrap needs as many resamplings of each ({len(a_samples)} vs "
                         f"{len(b_samples)})")
    return np.percentile(np.asarray(a_samples) - np.asarray(b_samples), [2.5, 97.5]).tolist()


def interval_verdict(interval: list[float], higher: str, lower: str) -> str:
    """What a paired gap's 95 % interval (:func:`gap_interval`) lets the book say: ``higher`` or
    ``lower`` only when the interval leaves out zero."""
    return higher if interval[0] > 0 else lower if interval[1] < 0 else "no difference shown"


def interval_gap(a: dict, b: dict) -> dict:
    """``a``'s mAP minus ``b``'s, and whether the gap is larger than the two intervals'
    half-widths added: the book's rule before it says one model beats another."""
    gap = a["map"] - b["map"]
    margin = sum((ci[1] - ci[0]) / 2 for ci in (a["map_ci"], b["map_ci"]))
    return {"gap": gap, "margin": margin, "significant": abs(gap) > margin}


def _empty(truth: COCO) -> dict:
    metrics = {"map": 0.0, "map50": 0.0, "map75": 0.0, **{f"map_{s}": 0.0 for s in SIZES}}
    metrics["per_class"] = {c["name"]: 0.0 for c in truth.loadCats(truth.getCatIds())}
    return metrics


def predict_split(run: RunModel, split: CocoSplit, cfg: DetectorConfig, stride: float | None = None,
                  batch_size: int = 32, decoder: Decoder | None = None) -> list[dict]:
    """COCO result records of any model (PyTorch, ONNX Runtime, ...) on a split's images, in the
    original images' pixels: its raw outputs decoded by :func:`~edgefm.runtime.decode.decode` at
    ``stride`` (A and its students), or by ``decoder`` (a detector of another kind, the peer)."""
    if decoder is None:
        if stride is None:
            raise ValueError("predict_split needs the model's stride or a decoder for its outputs")
        decoder = partial(decode, stride=stride, max_detections=cfg.max_detections,
                          score_threshold=cfg.score_threshold)
    dataset = CocoDetection(split, detection_transforms(cfg.image_size, train=False))
    records: list[dict] = []
    for start in range(0, len(dataset), batch_size):
        images, targets = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        found = decoder(*run(images.numpy()))
        records += to_coco_results(found, [t["image_id"] for t in targets], [t["scale"] for t in targets],
                                   dataset.category_ids)
    return records


def evaluate_split(run: RunModel, split: CocoSplit, cfg: DetectorConfig, stride: float | None = None,
                   batch_size: int = 32, bootstrap: int = 0, decoder: Decoder | None = None,
                   samples: bool = False) -> dict:
    """COCO metrics of any model on a split (:func:`predict_split`); ``bootstrap`` > 0 adds
    ``map_ci`` and ``samples`` the resampled mAPs (see :func:`coco_evaluate`)."""
    return coco_evaluate(split.annotations, predict_split(run, split, cfg, stride, batch_size, decoder),
                         bootstrap, samples)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every XYXY box in ``a`` (N, 4) with every one in ``b`` (M, 4): (N, M)."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area = lambda boxes: (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def missed_truths(found: dict[str, np.ndarray], boxes: np.ndarray, labels: np.ndarray,
                  min_score: float = 0.3, iou: float = 0.5) -> np.ndarray:
    """Which ground-truth objects of one image no detection scored >= ``min_score`` finds: no
    detection of the same class overlaps them with IoU >= ``iou``. A boolean mask over ``boxes``."""
    kept = found["scores"] >= min_score
    overlap = box_iou(np.asarray(boxes, dtype=float), found["boxes"][kept])
    overlap[np.asarray(labels)[:, None] != found["labels"][kept][None, :]] = 0
    return overlap.max(axis=1, initial=0.0) < iou


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
