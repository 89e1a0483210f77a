"""A detection dataset over any COCO-format annotation file (our scenes, COCO itself, yours).

The annotation file is validated when the dataset is opened, so a malformed file fails at once
with the file and the offending record named, not minutes into training. Images are read lazily;
an unreadable image fails with its path. Samples come out as torchvision ``tv_tensors`` so that
``torchvision.transforms.v2`` moves the boxes with the pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from edgefm.errors import DatasetError
from edgefm.runtime.images import read_image


@dataclass(frozen=True)
class CocoSplit:
    """Where one split lives: its ``instances.json`` and its image folder (paths or strings)."""

    annotations: Path
    images: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", Path(self.annotations))
        object.__setattr__(self, "images", Path(self.images))


_BOX_TOLERANCE = 0.5  # pixels; float boxes from converters may graze the border


def _load_json(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; give the annotation file (e.g. {path / 'instances.json'})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    except OSError as error:
        raise DatasetError(f"{path}: cannot read it ({error.strerror})") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or non-list {key!r}")
    return data


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _record(path: Path, kind: str, position: int, record: object, fields: dict[str, type]) -> dict:
    """Check one record is an object with ``fields`` of the right types; returns it."""
    if not isinstance(record, dict):
        raise DatasetError(f"{path}: {kind} #{position} is {type(record).__name__}, not an object")
    for name, wanted in fields.items():
        where = f"{path}: {kind} {record.get('id', f'#{position}')}"
        if name not in record:
            raise DatasetError(f"{where} has no {name!r}")
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, (int, float) if wanted is float else wanted):
            kind = "a number" if wanted is float else wanted.__name__
            raise DatasetError(f"{where}: {name} must be {kind}, got {value!r}")
    return record


def validate_coco(path: Path, images_dir: Path | None = None, read_images: bool = False) -> dict:
    """Load and check a COCO detection file; returns it. Raises :class:`DatasetError`.

    Checks: every record is an object with the fields and types it needs, ids are unique, every
    annotation's image and category exist, boxes have positive size and lie inside their image,
    and (with ``images_dir``) every image file exists; with ``read_images`` every image is also
    decoded (in its displayed orientation) and its size compared with the record's. An annotation
    without ``area`` gets its box's area (as pycocotools does for detections), without ``iscrowd``
    0. What this accepts, training and evaluation accept.
    """
    data = _load_json(path)
    category_ids: set[int] = set()
    for i, category in enumerate(data["categories"]):
        _record(path, "category", i, category, {"id": int, "name": str})
        category_ids.add(category["id"])
    if len(category_ids) != len(data["categories"]):
        raise DatasetError(f"{path}: duplicate category ids")
    images: dict[int, dict] = {}
    for i, image in enumerate(data["images"]):
        _record(path, "image", i, image, {"id": int, "file_name": str, "width": int, "height": int})
        if image["width"] <= 0 or image["height"] <= 0:
            raise DatasetError(f"{path}: image {image['id']} ({image['file_name']}) has size "
                               f"{image['width']}x{image['height']}")
        if image["id"] in images:
            raise DatasetError(f"{path}: duplicate image id {image['id']}")
        images[image["id"]] = image
        if images_dir is not None:
            _check_image_file(path, Path(images_dir), image, read_images)
    seen: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        _check_annotation(path, i, ann, images, category_ids)
        if ann["id"] in seen:
            raise DatasetError(f"{path}: duplicate annotation id {ann['id']}")
        seen.add(ann["id"])
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    return data


def _check_image_file(path: Path, images_dir: Path, image: dict, read: bool) -> None:
    file = images_dir / image["file_name"]
    if not file.is_file():
        raise DatasetError(f"{path}: image file {file} is missing")
    if read:
        width, height = read_image(file).size
        if (width, height) != (image["width"], image["height"]):
            raise DatasetError(f"{file}: image is {width}x{height} but {path} says "
                               f"{image['width']}x{image['height']} (image {image['id']})")


def _check_annotation(path: Path, position: int, ann: object, images: dict, category_ids: set[int]) -> None:
    ann = _record(path, "annotation", position, ann, {"id": int, "image_id": int, "category_id": int})
    where = f"{path}: annotation {ann['id']}"
    if ann["image_id"] not in images:
        raise DatasetError(f"{where} refers to unknown image id {ann['image_id']}")
    if ann["category_id"] not in category_ids:
        raise DatasetError(f"{where} has unknown category id {ann['category_id']}")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise DatasetError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise DatasetError(f"{where}: bbox {bbox} has non-positive size")
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        raise DatasetError(f"{where}: area must be a number >= 0, got {ann['area']!r}")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise DatasetError(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
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
