import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgefm.data import CocoDetection, CocoSplit, DatasetError, collate, detection_transforms, validate_coco


def make_split(root: Path, boxes=((2, 4, 10, 6),), size=(40, 30), category_id=1) -> CocoSplit:
    """A one-image COCO split: a ``size`` (width, height) image and the given boxes."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(root / "images" / "a.png")
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "width": size[0], "height": size[1]}],
        "annotations": [{"id": i + 1, "image_id": 7, "category_id": category_id, "bbox": list(b),
                         "area": b[2] * b[3], "iscrowd": 0} for i, b in enumerate(boxes)],
        "categories": [{"id": 1, "name": "thing"}, {"id": 5, "name": "other"}],
    }
    (root / "instances.json").write_text(json.dumps(coco))
    return CocoSplit(root / "instances.json", root / "images")


def test_sample_has_xyxy_boxes_and_contiguous_labels(tmp_path):
    dataset = CocoDetection(make_split(tmp_path, category_id=5))
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
    assert target["boxes"].tolist() == [[2, 4, 12, 10]]
    assert target["labels"].tolist() == [1]  # category id 5 is the second category
    assert dataset.class_names == ["thing", "other"] and target["image_id"] == 7


def test_a_split_given_as_strings_reads_as_one_given_as_paths(tmp_path):
    split = make_split(tmp_path)
    as_text = CocoSplit(str(split.annotations), str(split.images))  # as the README's example writes it
    assert as_text == split
    assert CocoDetection(as_text)[0][1]["boxes"].tolist() == CocoDetection(split)[0][1]["boxes"].tolist()


def test_letterbox_maps_boxes_and_records_scale(tmp_path):
    dataset = CocoDetection(make_split(tmp_path), detection_transforms(80, train=False))
    image, target = dataset[0]
    assert image.shape == (3, 80, 80) and image.dtype == torch.float32
    assert target["scale"] == pytest.approx(2.0)
    assert target["boxes"].tolist() == [[4, 8, 24, 20]]
    # padding is right/bottom only: dividing by the scale maps back to the original pixels
    assert (target["boxes"] / target["scale"]).tolist() == [[2, 4, 12, 10]]
    assert image[:, 70:, :].allclose(torch.tensor(114 / 255))


def test_flip_moves_boxes_with_pixels(tmp_path):
    split = make_split(tmp_path, boxes=((0, 0, 10, 30),), size=(40, 30))
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, :10] = 255
    Image.fromarray(image).save(split.images / "a.png")
    torch.manual_seed(0)
    dataset = CocoDetection(split, detection_transforms(40, train=True))
    for _ in range(10):
        image, target = dataset[0]
        x0, _, x1, _ = target["boxes"][0].round().int().tolist()
        assert image[0, 15, x0:x1].mean() > 0.6 and image[0, 15, :].mean() < 0.5


def test_collate_stacks_images(tmp_path):
    dataset = CocoDetection(make_split(tmp_path), detection_transforms(32, train=False))
    images, targets = collate([dataset[0], dataset[0]])
    assert images.shape == (2, 3, 32, 32) and len(targets) == 2


@pytest.mark.parametrize("boxes, message", [
    (((30, 4, 20, 6),), "outside its image"),
    (((-5, 4, 10, 6),), "outside its image"),
    (((2, 4, 0, 6),), "non-positive size"),
    (((2, 4, 10, -1),), "non-positive size"),
])
def test_bad_boxes_are_rejected(tmp_path, boxes, message):
    split = make_split(tmp_path, boxes=boxes)
    with pytest.raises(DatasetError, match=f"instances.json: annotation 1.*{message}"):
        CocoDetection(split)


def test_unknown_category_is_rejected(tmp_path):
    with pytest.raises(DatasetError, match="annotation 1 has unknown category id 3"):
        CocoDetection(make_split(tmp_path, category_id=3))


def test_malformed_json_is_rejected(tmp_path):
    split = make_split(tmp_path)
    split.annotations.write_text('{"images": [')
    with pytest.raises(DatasetError, match="instances.json: not valid JSON"):
        validate_coco(split.annotations)
    split.annotations.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="missing or non-list 'annotations'"):
        validate_coco(split.annotations)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match="nope.json: annotation file not found"):
        validate_coco(tmp_path / "nope.json")


def test_missing_image_file_is_named(tmp_path):
    split = make_split(tmp_path)
    (split.images / "a.png").unlink()
    with pytest.raises(DatasetError, match="a.png is missing"):
        CocoDetection(split)


def test_corrupt_image_is_named_and_size_mismatch_caught(tmp_path):
    split = make_split(tmp_path)
    dataset = CocoDetection(split)
    (split.images / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="a.png: cannot read image"):
        dataset[0]
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(split.images / "a.png")
    with pytest.raises(DatasetError, match="a.png: image is 10x10 but .*says 40x30"):
        dataset[0]
