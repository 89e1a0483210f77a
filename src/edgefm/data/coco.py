"""A detection dataset over any COCO-format annotation file (our scenes, COCO itself, yours).

The annotation file is validated when the dataset is opened, so a malformed file fails at once
with the file and the offending record named, not minutes into training. Images are read lazily;
an unreadable image fails with its path. Samples come out as torchvision ``tv_tensors`` so that
``torchvision.transforms.v2`` moves the boxes with the pixels.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from edgefm.errors import DatasetError
from edgefm.images import read_image


@dataclass(frozen=True)
class CocoSplit:
    """Where one split lives: its ``instances.json`` and its image folder."""

    annotations: Path
    images: Path


_BOX_TOLERANCE = 0.5  # pixels; float boxes from converters may graze the border


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or non-list {key!r}")
    return data


def validate_coco(path: Path, images_dir: Path | None = None) -> dict:
    """Load and check a COCO detection file; returns it. Raises :class:`DatasetError`.

    Checks: required keys, unique ids, every annotation's image and category exist, boxes have
    positive size and lie inside their image, and (with ``images_dir``) every image file exists.
    """
    data = _load_json(path)
    try:
        images = {int(im["id"]): im for im in data["images"]}
        category_ids = {int(c["id"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{path}: image or category record without a valid id ({error})") from None
    if len(images) != len(data["images"]):
        raise DatasetError(f"{path}: duplicate image ids")
    for image in images.values():
        for key in ("file_name", "width", "height"):
            if key not in image:
                raise DatasetError(f"{path}: image {image['id']} has no {key!r}")
        if images_dir is not None and not (Path(images_dir) / image["file_name"]).is_file():
            raise DatasetError(f"{path}: image file {Path(images_dir) / image['file_name']} is missing")
    for ann in data["annotations"]:
        _check_annotation(path, ann, images, category_ids)
    return data


def _check_annotation(path: Path, ann: dict, images: dict, category_ids: set[int]) -> None:
    where = f"{path}: annotation {ann.get('id', '?')}"
    for key in ("image_id", "category_id", "bbox"):
        if key not in ann:
            raise DatasetError(f"{where} has no {key!r}")
    if ann["image_id"] not in images:
        raise DatasetError(f"{where} refers to unknown image id {ann['image_id']}")
    if ann["category_id"] not in category_ids:
        raise DatasetError(f"{where} has unknown category id {ann['category_id']}")
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise DatasetError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise DatasetError(f"{where}: bbox {bbox} has non-positive size")
    image = images[ann["image_id"]]
    tol = _BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > image["width"] + tol or y + h > image["height"] + tol:
        raise DatasetError(
            f"{where}: bbox {bbox} lies outside its image "
            f"{image['file_name']} ({image['width']}x{image['height']})"
        )


Transform = Callable[[tv_tensors.Image, dict], tuple[tv_tensors.Image, dict]]


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets of a COCO file, validated on opening.

    Each sample is ``(image, target)``: ``image`` a uint8 ``tv_tensors.Image`` (3, H, W) and
    ``target`` a dict with ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels), ``labels``
    (contiguous class indices 0..C-1, in category-id order), ``image_id`` and ``orig_size``.
    """

    def __init__(self, split: CocoSplit, transform: Transform | None = None):
        self.split = split
        self.coco = validate_coco(split.annotations, split.images)
        self.transform = transform
        self.categories = sorted(self.coco["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in self.categories]
        self.class_names = [c["name"] for c in self.categories]
        self._label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])
        self._annotations: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in self.coco["annotations"]:
            if not ann.get("iscrowd", 0):
                self._annotations[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict]:
        info = self.images[index]
        path = self.split.images / info["file_name"]
        image = F.pil_to_tensor(read_image(path))
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise DatasetError(
                f"{path}: image is {image.shape[-1]}x{image.shape[-2]} but "
                f"{self.split.annotations} says {info['width']}x{info['height']}"
            )
        anns = self._annotations[info["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:]),
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": info["id"],
            "orig_size": (info["height"], info["width"]),
        }
        image = tv_tensors.Image(image)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack images (all the same size after a letterbox) and keep targets as a list."""
    images, targets = zip(*batch, strict=True)
    return torch.stack([torch.as_tensor(im) for im in images]), list(targets)
