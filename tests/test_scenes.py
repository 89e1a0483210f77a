import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from edgefm.artifacts import read_metrics
from edgefm.config import load_profile
from edgefm.data import ensure_dataset
from edgefm.data.fashion_mnist import FashionMNISTNotFound, load_items, read_idx
from edgefm.data.scenes import build_scenes, item_ids


@pytest.fixture
def cfg():
    return replace(load_profile("smoke").data, train_scenes=12, val_scenes=4, eval_scenes=8,
                   pool_images=6)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "build.json"}


def test_same_seed_gives_identical_files(fashion_dir, cfg, tmp_path):
    build_scenes(tmp_path / "a", cfg)
    build_scenes(tmp_path / "b", cfg)
    first = tree_digest(tmp_path / "a")
    assert first and first == tree_digest(tmp_path / "b")
    build_scenes(tmp_path / "c", replace(cfg, seed=1))
    assert tree_digest(tmp_path / "c") != first


def test_coco_files_are_valid_and_boxes_inside(fashion_dir, cfg, tmp_path):
    build_scenes(tmp_path, cfg)
    for split, count in (("train", 12), ("val", 4), ("eval", 8)):
        coco = COCO(str(tmp_path / split / "instances.json"))
        assert len(coco.getImgIds()) == count
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            image = coco.loadImgs(ann["image_id"])[0]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= image["width"] and y + h <= image["height"]
            assert ann["area"] == w * h and ann["iscrowd"] == 0
        per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
        assert max(per_image) <= cfg.items_per_scene[1]
    assert len(list((tmp_path / "pool" / "images").iterdir())) == 6
    assert not (tmp_path / "pool" / "instances.json").exists()


def test_no_item_leaks_between_splits(fashion_dir, cfg, tmp_path):
    build_scenes(tmp_path, cfg)

    def sources(split):
        anns = json.loads((tmp_path / split / "instances.json").read_text())["annotations"]
        return {a["source_item"] for a in anns}

    train, val, evaluation = sources("train"), sources("val"), sources("eval")
    assert all(s.startswith("train/") for s in train | val)
    assert all(s.startswith("test/") for s in evaluation)
    assert not train & val
    val_items = set(item_ids("val", 60).tolist())
    assert all(int(s.split("/")[1]) in val_items for s in val)


def test_labels_match_source_items(fashion_dir, cfg, tmp_path):
    build_scenes(tmp_path, cfg)
    items = load_items("test")
    for ann in json.loads((tmp_path / "eval" / "instances.json").read_text())["annotations"]:
        index = int(ann["source_item"].split("/")[1])
        assert ann["category_id"] == items.labels[index] + 1


def test_scenes_have_items_of_several_sizes(fashion_dir, cfg, tmp_path):
    build_scenes(tmp_path, replace(cfg, train_scenes=40))
    anns = json.loads((tmp_path / "train" / "instances.json").read_text())["annotations"]
    longer = np.array([max(a["bbox"][2:]) for a in anns])
    lo, hi = cfg.item_size
    assert longer.min() >= lo - 1 and longer.max() <= hi + 1
    assert longer.max() - longer.min() > (hi - lo) / 2


def test_ensure_dataset_caches_and_writes_metrics(fashion_dir):
    dataset = ensure_dataset("smoke")
    metrics = read_metrics("smoke", "data")
    smoke = load_profile("smoke").data
    assert metrics["train_images"] == smoke.train_scenes
    assert metrics["eval_images"] == smoke.eval_scenes
    assert metrics["pool_images"] == smoke.pool_images
    assert metrics["num_classes"] == 10 and metrics["train_objects"] > smoke.train_scenes - 1
    stamp = dataset.train.annotations.stat().st_mtime_ns
    assert ensure_dataset("smoke").root == dataset.root
    assert dataset.train.annotations.stat().st_mtime_ns == stamp


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFM_FASHION_MNIST", str(tmp_path / "nowhere"))
    monkeypatch.setattr("edgefm.data.fashion_mnist.DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr("edgefm.data.fashion_mnist.CACHE_DIR", tmp_path / "no-cache")
    with pytest.raises(FashionMNISTNotFound, match="apt-get install dataset-fashion-mnist"):
        load_items("train")


def test_corrupt_idx_file_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") * 3 + b"\x01")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*holds 1 values"):
        read_idx(path)
