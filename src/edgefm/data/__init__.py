"""Datasets: the Fashion-MNIST scenes, Penn-Fudan, your own COCO data, and a COCO loader.

:func:`ensure_dataset` is the data stage: it returns the profile's dataset, building it into the
artifacts folder the first time (and whenever its config or code changes), and records its figures
in ``metrics/data.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgefm.artifacts import ensure_dir, stage_dir, write_metrics
from edgefm.config import DOWNLOAD_ENV, Profile, load_profile
from edgefm.data import own, pennfudan, scenes
from edgefm.data.coco import CocoDetection, CocoSplit, DatasetError, collate, validate_coco
from edgefm.data.fashion_mnist import CACHE_DIR
from edgefm.data.transforms import Letterbox, detection_transforms

__all__ = [
    "CocoDetection", "CocoSplit", "DatasetError", "DetectionDataset", "Letterbox", "collate",
    "detection_transforms", "ensure_dataset", "validate_coco",
]

PENNFUDAN_ENV = "EDGEFM_PENNFUDAN"


@dataclass(frozen=True)
class DetectionDataset:
    """A dataset's splits: labelled train/val/eval (val may be absent) and an unlabeled pool."""

    root: Path
    train: CocoSplit
    eval: CocoSplit
    val: CocoSplit | None = None
    pool: Path | None = None  # a folder of unlabeled images, for self-supervised pretraining


def _scenes(profile: Profile) -> DetectionDataset:
    cfg = profile.data
    root = stage_dir(profile.name, "data", cfg)
    ensure_dir(root, lambda tmp: scenes.build_scenes(tmp, cfg), config=cfg)

    def split(name: str) -> CocoSplit:
        return CocoSplit(root / name / "instances.json", root / name / "images")

    return DetectionDataset(root, split("train"), split("eval"), split("val"), root / "pool" / "images")


def _pennfudan(profile: Profile) -> DetectionDataset:
    source = Path(os.environ.get(PENNFUDAN_ENV, CACHE_DIR / "PennFudanPed")).expanduser()
    if not (source / "PNGImages").is_dir():
        if os.environ.get(DOWNLOAD_ENV) != "1":
            raise DatasetError(
                f"{source}: no Penn-Fudan folder; set {PENNFUDAN_ENV} to an unpacked PennFudanPed "
                f"folder, or {DOWNLOAD_ENV}=1 to download it (needs a network)"
            )
        source = pennfudan.download(source.parent)
    held_out = {"eval_count": profile.data.eval_scenes, "val_count": profile.data.val_scenes}
    root = stage_dir(profile.name, "data", {"source": str(source), **held_out}, code="pennfudan")
    # the train photos, without their labels, are the pool (pretraining, pool distillation)
    ensure_dir(root, lambda tmp: own.link_pool(pennfudan.convert(source, tmp, **held_out)["train"], tmp))

    def split(name: str) -> CocoSplit:
        return CocoSplit(root / name / "instances.json", source / "PNGImages")

    val = split("val") if held_out["val_count"] else None
    return DetectionDataset(root, split("train"), split("eval"), val, root / "pool" / "images")


def _own(profile: Profile) -> DetectionDataset:
    folder = Path(profile.data.source)
    if not folder.is_dir():
        raise DatasetError(f"unknown data source {profile.data.source!r}: neither one of "
                           f"{', '.join(_BUILDERS)} nor a folder of COCO data")
    own.check_layout(folder)
    held_out = {"eval_count": profile.data.eval_scenes, "val_count": profile.data.val_scenes,
                "seed": profile.data.seed}
    presplit = own.is_presplit(folder)
    key = {"source": str(folder), "annotations": own.fingerprint(folder), **({} if presplit else held_out)}
    root = stage_dir(profile.name, "data", key, code="coco")

    def build(work: Path) -> None:
        splits = own.given_splits(folder) if presplit else own.split_coco(folder, work, **held_out)
        own.link_pool(splits["train"], work)

    ensure_dir(root, build, config=key)
    if presplit:
        splits = {s: CocoSplit(folder / s / "instances.json", folder / s / "images") for s in own.SPLITS}
    else:
        splits = {s: CocoSplit(root / s / "instances.json", folder / "images") for s in own.SPLITS
                  if (root / s / "instances.json").is_file()}
    pool = root / "pool" / "images"
    return DetectionDataset(root, splits["train"], splits["eval"], splits.get("val"), pool)


def dataset_metrics(dataset: DetectionDataset) -> dict:
    """The data stage's figures: counts of images, objects, classes and sizes per split."""
    train, evaluation = scenes.coco_summary(dataset.train.annotations), scenes.coco_summary(
        dataset.eval.annotations
    )
    return {
        "train_images": train["images"], "train_objects": train["objects"],
        "eval_images": evaluation["images"], "eval_objects": evaluation["objects"],
        "num_classes": len(train["per_class"]), "classes": list(train["per_class"]),
        "train_per_class": train["per_class"], "eval_per_class": evaluation["per_class"],
        "train_per_size": train["per_size"], "eval_per_size": evaluation["per_size"],
        "val_images": scenes.coco_summary(dataset.val.annotations)["images"] if dataset.val else 0,
        "pool_images": sum(1 for _ in dataset.pool.iterdir()) if dataset.pool else 0,
        "root": str(dataset.root),
    }


_BUILDERS = {"fashion-scenes": _scenes, "pennfudan": _pennfudan}


def ensure_dataset(profile: Profile | str | None = None) -> DetectionDataset:
    """The profile's dataset, built if needed; writes ``metrics/data.json``. A ``source`` that is
    not a named dataset is the folder of your own COCO data (:mod:`edgefm.data.own`)."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    dataset = _BUILDERS.get(profile.data.source, _own)(profile)
    if dataset.val is None:  # every choice the book makes (schedules, recipes, students) is made on val
        raise DatasetError(f"{dataset.root}: no val split; the stages choose on val, so hold some images "
                           f"out for it (profile {profile.name!r} has val_scenes={profile.data.val_scenes})")
    metrics = dataset_metrics(dataset)
    build_record = dataset.root / "build.json"
    if build_record.is_file():
        metrics.update(json.loads(build_record.read_text(encoding="utf-8")))
    write_metrics(profile.name, "data", metrics)
    return dataset
