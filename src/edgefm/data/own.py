"""Your own COCO-format detection data as a profile's dataset (``--data FOLDER`` / ``$EDGEFM_DATA``).

Two layouts are accepted. A folder with one ``instances.json`` and an ``images/`` folder is split
by the library: a seeded draw of images is held out for eval and another for val (the profile's
``eval_scenes`` and ``val_scenes``, capped at 15 % and 10 % of the images so that small sets keep
most of their labels for training). A folder with ``train/``, ``val/`` and ``eval/``, each holding
an ``instances.json`` and an ``images/`` folder, is used as split. Every annotation file is
validated (:func:`~edgefm.data.coco.validate_coco`) before anything trains on it, so a malformed
file or a box outside its image fails here, naming the file. The train images, without their
labels, are also the unlabelled pool that pretraining and pool distillation read: there, pool
distillation adds A's pseudo-labels on images that already have labels (self-training), not new
images, unlike the book's 20,000-image pool.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edgefm.artifacts import atomic_write_json
from edgefm.data.coco import CocoSplit, DatasetError, validate_coco

SPLITS = ("train", "val", "eval")
MAX_EVAL_SHARE, MAX_VAL_SHARE = 0.15, 0.10


def is_presplit(folder: Path) -> bool:
    """Whether ``folder`` holds its own train/val/eval splits."""
    return (Path(folder) / "train" / "instances.json").is_file()


def check_layout(folder: Path) -> None:
    """Fail with a message that names what is missing, before any stage starts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder for your COCO data")
    if is_presplit(folder):
        missing = [str(folder / s / f) for s in SPLITS for f in ("instances.json", "images")
                   if not (folder / s / f).exists()]
    else:
        missing = [str(folder / f) for f in ("instances.json", "images") if not (folder / f).exists()]
    if missing:
        raise DatasetError(f"{folder}: not a COCO data folder, missing {', '.join(missing)}; give either "
                           "instances.json + images/, or train/, val/ and eval/ each with both")


def fingerprint(folder: Path) -> str:
    """The content of the folder's annotation files: what the data stage is keyed by, so that new
    labels make new splits (images are named by the annotations and not hashed)."""
    files = [Path(folder) / s / "instances.json" for s in SPLITS] if is_presplit(folder) else [
        Path(folder) / "instances.json"]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def held_out_counts(images: int, eval_count: int, val_count: int) -> tuple[int, int]:
    """How many images eval and val take of a set of ``images``: the profile's counts, capped."""
    eval_count = max(1, min(eval_count, int(MAX_EVAL_SHARE * images)))
    val_count = max(1, min(val_count, int(MAX_VAL_SHARE * images))) if val_count else 0
    if images - eval_count - val_count < 1:
        raise DatasetError(f"{images} images: too few for an eval, a val and a train split")
    return eval_count, val_count


def split_coco(folder: Path, out: Path, eval_count: int, val_count: int, seed: int) -> dict[str, CocoSplit]:
    """Write ``out/{train,val,eval}/instances.json`` for ``folder``'s one annotation file: a seeded
    draw of images for eval and val (:func:`held_out_counts`), the rest for training. Images stay
    where they are."""
    folder, out = Path(folder), Path(out)
    data = validate_coco(folder / "instances.json", folder / "images")
    eval_count, val_count = held_out_counts(len(data["images"]), eval_count, val_count)
    order = np.random.default_rng(seed).permutation(len(data["images"]))
    picks = {"eval": order[:eval_count], "val": order[eval_count:eval_count + val_count],
             "train": order[eval_count + val_count:]}
    splits = {}
    for split, positions in picks.items():
        if not len(positions):
            continue
        images = [data["images"][i] for i in sorted(positions)]
        ids = {image["id"] for image in images}
        coco = {**{k: v for k, v in data.items() if k not in ("images", "annotations")},
                "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
        atomic_write_json(out / split / "instances.json", coco)
        splits[split] = CocoSplit(out / split / "instances.json", folder / "images")
    return splits


def given_splits(folder: Path) -> dict[str, CocoSplit]:
    """A pre-split folder's splits, each validated, with the same categories in each: a class
    numbered differently in eval than in train would be scored as another class."""
    splits = {s: CocoSplit(Path(folder) / s / "instances.json", Path(folder) / s / "images") for s in SPLITS}
    categories = {name: sorted((c["id"], c["name"]) for c in validate_coco(split.annotations, split.images)[
        "categories"]) for name, split in splits.items()}
    for name in ("val", "eval"):
        if categories[name] != categories["train"]:
            raise DatasetError(f"{splits[name].annotations}: its categories (id, name) {categories[name]} "
                               f"differ from train's {categories['train']}")
    return splits


def link_pool(train: CocoSplit, out: Path) -> Path:
    """``out/pool/images``: the train images, linked (not copied) under unique names."""
    pool = Path(out) / "pool" / "images"
    pool.mkdir(parents=True, exist_ok=True)
    for image in validate_coco(train.annotations)["images"]:
        source = (train.images / image["file_name"]).resolve()
        link = pool / f"{image['id']}{source.suffix}"
        if not link.is_symlink():  # a build resumed in its .partial folder
            link.symlink_to(source)
    return pool
