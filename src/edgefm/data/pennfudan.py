"""The Penn-Fudan pedestrian dataset, converted to COCO format (the ``full`` profile's data).

Penn-Fudan ships ``PNGImages/*.png`` and instance masks ``PedMasks/*_mask.png`` (0 = background,
k = k-th pedestrian). Boxes are the masks' extents; ``area`` is the box area, as in the scenes, so
COCO's size buckets mean the same thing in both datasets. Images are not copied: the COCO files
point at the original ``PNGImages`` folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from edgefm.artifacts import atomic_write_json
from edgefm.data.coco import CocoSplit, DatasetError, read_image

URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"}]


def download(parent: Path) -> Path:
    """Download and unpack Penn-Fudan into ``parent`` (needs a network); returns its folder."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(URL, download_root=str(parent))
    return parent / "PennFudanPed"


def _boxes_from_mask(mask_path: Path) -> list[list[int]]:
    try:
        with Image.open(mask_path) as mask_image:
            mask = np.asarray(mask_image)
    except (FileNotFoundError, OSError) as error:
        raise DatasetError(f"{mask_path}: cannot read instance mask ({error})") from error
    boxes = []
    for instance in np.unique(mask[mask > 0]):
        rows, cols = np.nonzero(mask == instance)
        x0, y0 = int(cols.min()), int(rows.min())
        boxes.append([x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1])
    return boxes


def convert(root: Path, out: Path, eval_count: int = 50, val_count: int = 20) -> dict[str, CocoSplit]:
    """Write ``out/{train,val,eval}/instances.json`` for the Penn-Fudan folder ``root``.

    In file-name order, the last ``eval_count`` images form the eval split and the ``val_count``
    before them the val split, on which the book makes its choices (``val_count`` 0: no val
    split); the rest train. Penn-Fudan has 170 images: 100 / 20 / 50 by default.
    """
    root, out = Path(root), Path(out)
    image_dir = root / "PNGImages"
    files = sorted(image_dir.glob("*.png"))
    if not files:
        raise DatasetError(f"{image_dir}: no PNG images; is {root} a Penn-Fudan folder?")
    if eval_count + val_count >= len(files):
        raise DatasetError(f"{root}: {len(files)} images, too few for {eval_count} eval and {val_count} val "
                           "images and a train split")
    held_out = len(files) - eval_count - val_count
    parts = {"train": files[:held_out], "val": files[held_out:-eval_count], "eval": files[-eval_count:]}
    if not val_count:
        del parts["val"]
    splits = {}
    for split, paths in parts.items():
        images, annotations = [], []
        for image_id, path in enumerate(paths, start=1):
            width, height = read_image(path).size
            images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
            for box in _boxes_from_mask(root / "PedMasks" / f"{path.stem}_mask.png"):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        coco = {"info": {"description": f"Penn-Fudan pedestrians, {split} split"},
                "images": images, "annotations": annotations, "categories": CATEGORIES}
        atomic_write_json(out / split / "instances.json", coco)
        splits[split] = CocoSplit(out / split / "instances.json", image_dir)
    return splits
