import json

import numpy as np
import pytest
from PIL import Image

from edgefm.data import CocoDetection, DatasetError
from edgefm.data.pennfudan import convert


def fake_pennfudan(root, count=4):
    """A Penn-Fudan-shaped folder: PNG images and instance masks with two pedestrians each."""
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    for i in range(count):
        image = np.full((60, 80, 3), 30 * i % 256, np.uint8)
        Image.fromarray(image).save(root / "PNGImages" / f"Ped{i:05d}.png")
        mask = np.zeros((60, 80), np.uint8)
        mask[5:25, 10:20] = 1
        mask[30:58, 50:61] = 2
        Image.fromarray(mask).save(root / "PedMasks" / f"Ped{i:05d}_mask.png")
    return root


def test_convert_writes_coco_with_mask_boxes(tmp_path):
    root = fake_pennfudan(tmp_path / "PennFudanPed", count=5)
    splits = convert(root, tmp_path / "out", eval_count=1, val_count=1)
    train, val, evaluation = (CocoDetection(splits[name]) for name in ("train", "val", "eval"))
    assert len(train) == 3 and len(val) == 1 and len(evaluation) == 1
    names = [[r["file_name"] for r in json.loads(splits[n].annotations.read_text())["images"]]
             for n in ("train", "val", "eval")]
    assert names == [["Ped00000.png", "Ped00001.png", "Ped00002.png"], ["Ped00003.png"], ["Ped00004.png"]]
    _, target = evaluation[0]
    assert target["boxes"].tolist() == [[10, 5, 20, 25], [50, 30, 61, 58]]
    assert train.class_names == ["person"]


def test_convert_rejects_a_folder_without_images(tmp_path):
    with pytest.raises(DatasetError, match="no PNG images"):
        convert(tmp_path, tmp_path / "out")


def test_convert_names_a_missing_mask(tmp_path):
    root = fake_pennfudan(tmp_path / "PennFudanPed")
    (root / "PedMasks" / "Ped00001_mask.png").unlink()
    with pytest.raises(DatasetError, match="Ped00001_mask.png: cannot read instance mask"):
        convert(root, tmp_path / "out", eval_count=1, val_count=0)


def test_convert_without_val_and_with_too_few_images(tmp_path):
    root = fake_pennfudan(tmp_path / "PennFudanPed")
    assert set(convert(root, tmp_path / "out", eval_count=1, val_count=0)) == {"train", "eval"}
    with pytest.raises(DatasetError, match="4 images, too few for 2 eval and 2 val"):
        convert(root, tmp_path / "again", eval_count=2, val_count=2)


def test_the_full_profile_holds_out_val_and_eval_and_pools_the_train_photos(tmp_path, monkeypatch):
    from edgefm.config import load_profile
    from edgefm.data import PENNFUDAN_ENV, ensure_dataset

    profile = load_profile("full")
    count = profile.data.val_scenes + profile.data.eval_scenes + 5
    monkeypatch.setenv(PENNFUDAN_ENV, str(fake_pennfudan(tmp_path / "PennFudanPed", count=count)))
    dataset = ensure_dataset(profile)
    sizes = [len(CocoDetection(split)) for split in (dataset.train, dataset.val, dataset.eval)]
    assert sizes == [5, profile.data.val_scenes, profile.data.eval_scenes]
    train_files = sorted(r["file_name"] for r in json.loads(dataset.train.annotations.read_text())["images"])
    pooled = sorted(p.resolve().name for p in dataset.pool.iterdir())
    assert pooled == train_files  # what pretraining and pool distillation read: no val or eval photo
