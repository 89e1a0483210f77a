"""The Fashion-MNIST scenes: multi-object detection scenes written as a COCO-format dataset.

Each scene is a procedurally textured background with 1..N Fashion-MNIST items pasted on it,
tinted, flipped and scaled over a wide range so that COCO's size buckets mean something, and
allowed to overlap up to ``max_occlusion`` of any earlier item's visible pixels. Items of the
Fashion-MNIST *train* split make the train/val scenes and the unlabeled pool; items of the *test*
split make the eval scenes, so no item seen in training is ever evaluated on.

Each scene draws from its own random generator seeded by ``(seed, split, index)``: the dataset is
byte-for-byte reproducible and any scene can be regenerated alone.

Boxes are the full extent of the pasted item (amodal: an occluded part still counts) and the
annotation ``area`` is that box's area in pixels; there are no masks.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgefm.artifacts import atomic_write_json
from edgefm.config import DataConfig
from edgefm.data.fashion_mnist import CLASSES, Items, load_items

# The last twelfth of the train items (55,000.. of Fashion-MNIST's 60,000) feeds only the val
# scenes; the rest feeds the train scenes and the pool.
VAL_ITEMS_FRACTION = 1 / 12
SPLIT_IDS = {"train": 1, "val": 2, "eval": 3, "pool": 4}


@dataclass(frozen=True)
class PlacedItem:
    """An item pasted into a scene: its box ``(x, y, w, h)`` in pixels, class and source."""

    box: tuple[int, int, int, int]
    label: int
    source: str


def _smooth_noise(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    coarse = Image.fromarray(rng.random((grid, grid), dtype=np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured RGB background in [0, 1]: two colours blended by smooth noise, maybe striped."""
    low, high = rng.random((2, 3), dtype=np.float32)
    noise = 0.6 * _smooth_noise(rng, 4, size) + 0.4 * _smooth_noise(rng, 16, size)
    background = low + (high - low) * np.clip(noise, 0, 1)[..., None]
    if rng.random() < 0.5:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        phase = (x * np.cos(angle) + y * np.sin(angle)) * (2 * np.pi / period)
        background *= (0.85 + 0.15 * np.sin(phase))[..., None]
    return np.clip(background, 0, 1)


def render_item(
    gray: np.ndarray, longer_side: int, tint: np.ndarray, flip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a 28x28 item to its extent, scale its longer side, tint it: ``(rgb, alpha)``."""
    rows, cols = np.nonzero(gray > 12)
    crop = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    if flip:
        crop = crop[:, ::-1]
    h, w = crop.shape
    scale = longer_side / max(h, w)
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.Resampling.BILINEAR)
    level = np.asarray(resized, dtype=np.float32) / 255.0
    alpha = np.clip(level / 0.2, 0, 1)
    rgb = tint * (0.35 + 0.65 * level)[..., None]
    return rgb, alpha


def _contrasting_tint(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    for _ in range(8):
        tint = rng.uniform(0.05, 1.0, 3).astype(np.float32)
        if np.linalg.norm(tint - background_mean) > 0.35:
            break
    return tint


def compose_scene(
    rng: np.random.Generator, items: Items, allowed: np.ndarray, split: str, cfg: DataConfig
) -> tuple[np.ndarray, list[PlacedItem]]:
    """Compose one scene from items drawn out of ``allowed``; returns uint8 HxWx3 and its items."""
    size = cfg.image_size
    canvas = render_background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)  # which placed item each pixel shows
    full_area: list[int] = []
    placed: list[PlacedItem] = []
    wanted = rng.integers(cfg.items_per_scene[0], cfg.items_per_scene[1] + 1)
    log_lo, log_hi = np.log(cfg.item_size[0]), np.log(cfg.item_size[1])
    for _ in range(wanted):
        index = int(rng.choice(allowed))
        longer = int(round(np.exp(rng.uniform(log_lo, log_hi))))
        tint = _contrasting_tint(rng, canvas.mean(axis=(0, 1)))
        rgb, alpha = render_item(items.images[index], longer, tint, flip=bool(rng.random() < 0.5))
        h, w = alpha.shape
        for _attempt in range(20):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            covers = np.zeros_like(owner, dtype=bool)
            covers[y : y + h, x : x + w] = alpha > 0.5
            if _occlusion_ok(owner, covers, full_area, cfg.max_occlusion):
                break
        else:
            continue  # no place leaves every earlier item visible enough: skip this item
        region = canvas[y : y + h, x : x + w]
        region[:] = region * (1 - alpha[..., None]) + rgb * alpha[..., None]
        owner[covers] = len(placed)
        full_area.append(int(covers.sum()))
        source = f"{'test' if split == 'eval' else 'train'}/{index}"
        placed.append(PlacedItem((x, y, w, h), int(items.labels[index]), source))
    return (canvas * 255 + 0.5).astype(np.uint8), placed


def _occlusion_ok(owner: np.ndarray, covers: np.ndarray, full: list[int], limit: float) -> bool:
    hidden = np.bincount(owner[covers & (owner >= 0)], minlength=len(full))
    visible = np.bincount(owner[owner >= 0], minlength=len(full)) - hidden
    return all(v >= (1 - limit) * f for v, f in zip(visible, full, strict=True))


def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def item_ids(split: str, count: int) -> np.ndarray:
    """Indices of the items (of the split's Fashion-MNIST part, ``count`` items) a split may use."""
    val_start = count - round(count * VAL_ITEMS_FRACTION)
    if split in ("train", "pool"):
        return np.arange(val_start)
    if split == "val":
        return np.arange(val_start, count)
    return np.arange(count)


def categories() -> list[dict]:
    """COCO categories of the scenes: ids 1..10 in Fashion-MNIST's label order."""
    return [{"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(CLASSES)]


def write_split(out: Path, split: str, count: int, items: Items, cfg: DataConfig) -> None:
    """Write ``count`` scenes of ``split`` to ``out/images`` and (labelled splits) ``out/instances.json``."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    allowed = item_ids(split, len(items.labels))
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([cfg.seed, SPLIT_IDS[split], index])
        scene, placed = compose_scene(rng, items, allowed, split, cfg)
        file_name = f"{index:06d}.jpg"
        (out / "images" / file_name).write_bytes(_jpeg_bytes(scene, cfg.jpeg_quality))
        images.append({"id": index + 1, "file_name": file_name, "width": cfg.image_size,
                       "height": cfg.image_size})
        for item in placed:
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": item.label + 1,
                "bbox": list(item.box), "area": item.box[2] * item.box[3], "iscrowd": 0,
                "source_item": item.source,
            })
    if split != "pool":
        coco = {"info": {"description": f"Fashion-MNIST scenes, {split} split", "seed": cfg.seed},
                "images": images, "annotations": annotations, "categories": categories()}
        atomic_write_json(out / "instances.json", coco)


def build_scenes(out: Path, cfg: DataConfig) -> None:
    """Write every split of the scenes dataset under ``out``, and ``build.json`` (its cost)."""
    start = time.perf_counter()
    train_items, test_items = load_items("train"), load_items("test")
    counts = {"train": cfg.train_scenes, "val": cfg.val_scenes, "eval": cfg.eval_scenes,
              "pool": cfg.pool_images}
    for split, count in counts.items():
        write_split(out / split, split, count, test_items if split == "eval" else train_items, cfg)
    seconds = round(time.perf_counter() - start, 2)
    atomic_write_json(out / "build.json", {"build_seconds": seconds, "image_size": cfg.image_size})


def coco_summary(annotation_file: Path) -> dict:
    """Counts of a COCO file: images, objects, objects per class and per COCO size bucket (by
    ``area``, else the box's)."""
    coco = json.loads(Path(annotation_file).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = dict.fromkeys(names.values(), 0)
    buckets = {"small": 0, "medium": 0, "large": 0}
    for ann in coco["annotations"]:
        per_class[names[ann["category_id"]]] += 1
        area = ann.get("area", ann["bbox"][2] * ann["bbox"][3])
        buckets["small" if area < 32**2 else "medium" if area < 96**2 else "large"] += 1
    return {"images": len(coco["images"]), "objects": len(coco["annotations"]),
            "per_class": per_class, "per_size": buckets}
