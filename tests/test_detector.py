import contextlib
import io
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from edgefm.config import BackboneConfig
from edgefm.data import CocoDetection, CocoSplit, collate, detection_transforms
from edgefm.models import ViTBackbone, build_vit
from edgefm.models.centernet import EncodeTargets, cell_centres, centernet_loss, centernet_targets, focal_loss
from edgefm.models.detector import Detector
from edgefm.runtime.decode import decode
from edgefm.tools.evaluate import coco_evaluate, to_coco_results


def tiny_detector(num_classes=3, image_size=64, seed=0):
    torch.manual_seed(seed)
    vit = build_vit(BackboneConfig(image_size=image_size, patch_size=8, hidden_size=32, num_layers=2,
                                   num_heads=2))
    return Detector(ViTBackbone(vit), num_classes, channels=32, head_hidden=32)


def batched(target: dict) -> dict:
    """One image's targets as the training loop's collate stacks a batch's."""
    return {key: value[None] for key, value in target.items()}


def test_decoder_on_hand_made_outputs():
    heat = np.full((1, 3, 8, 8), -10.0, np.float32)
    heat[0, 1, 2, 3] = 3.0   # a confident class-1 peak at cell (x=3, y=2)
    heat[0, 1, 2, 4] = 2.0   # its weaker neighbour: suppressed by the 3x3 maximum
    heat[0, 2, 6, 1] = 0.0   # a class-2 peak at probability 0.5
    distances = np.zeros((1, 4, 8, 8), np.float32)
    distances[0, :, 2, 3] = (4.0, 1.0, 2.0, 3.0)  # left, top, right, bottom from the cell centre
    distances[0, :, 6, 1] = (2.0, 2.0, 2.0, 2.0)
    (found,) = decode(heat, distances, stride=4.0)
    assert found["labels"].tolist() == [1, 2]
    np.testing.assert_allclose(found["scores"], [1 / (1 + np.exp(-3)), 0.5], rtol=1e-6)
    # cell (3, 2) has its centre at (14, 10) px; cell (1, 6) at (6, 26) px
    np.testing.assert_allclose(found["boxes"][0], [10, 9, 16, 13])
    np.testing.assert_allclose(found["boxes"][1], [4, 24, 8, 28])
    assert len(decode(heat, distances, 4.0, score_threshold=0.6)[0]["boxes"]) == 1
    many = decode(np.zeros((2, 3, 16, 16), np.float32), np.ones((2, 4, 16, 16), np.float32), 4.0,
                  max_detections=100)
    assert len(many[1]["boxes"]) == 100


def test_targets_on_a_hand_made_box():
    boxes = torch.tensor([[8.0, 4.0, 24.0, 12.0]])  # centre (16, 8) px -> cell (4, 2) at stride 4
    target = centernet_targets(boxes, torch.tensor([2]), num_classes=3, out_size=(8, 8), stride=4.0)
    assert target["heatmap"].shape == (3, 8, 8) and target["box"].shape == (4, 8, 8)
    assert target["heatmap"][2, 2, 4] == 1 and target["heatmap"][2].max() == 1
    assert target["heatmap"][:2].sum() == 0
    sampled = target["box_weight"] > 0
    assert sampled[2, 4] and sampled.sum() < 64  # the centre cell, not the whole map
    assert torch.isclose(target["box_weight"].sum(), torch.log(torch.tensor(16.0 * 8.0)))
    assert (boxes == target["box"][:, sampled].T).all()


def test_smaller_objects_own_the_cells_they_share():
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [12.0, 12.0, 20.0, 20.0]])
    target = centernet_targets(boxes, torch.tensor([0, 1]), 2, (8, 8), 4.0)
    assert target["box"][:, 4, 4].tolist() == boxes[1].tolist()
    assert target["heatmap"][0, 4, 4] == 1 and target["heatmap"][1, 4, 4] == 1


def perfect_outputs(target, num_classes=3, size=8, stride=4.0):
    heat = torch.full((1, num_classes, size, size), -12.0)
    heat[0][target["heatmap"] == 1] = 12.0
    xs, ys = cell_centres((size, size), stride)
    x0, y0, x1, y1 = target["box"]
    distances = torch.stack([xs - x0, ys - y0, x1 - xs, y1 - ys]) * (target["box_weight"] > 0)
    return heat, distances[None]


def test_loss_is_near_zero_for_the_perfect_prediction_and_decode_inverts_targets():
    boxes = torch.tensor([[3.0, 5.0, 17.0, 13.0], [20.0, 18.0, 30.0, 31.0]])
    target = centernet_targets(boxes, torch.tensor([0, 2]), 3, (8, 8), 4.0)
    outputs = perfect_outputs(target)
    losses = centernet_loss(outputs, batched(target), stride=4.0)
    assert losses["box"] < 1e-6
    blank = centernet_loss((torch.zeros_like(outputs[0]), torch.zeros_like(outputs[1])), batched(target), 4.0)
    assert losses["heatmap"] < 0.01 * blank["heatmap"] and blank["box"] > 0.5
    (found,) = decode(*(o.numpy() for o in outputs), stride=4.0)
    np.testing.assert_allclose(found["boxes"][np.argsort(found["labels"])], boxes.numpy(), atol=1e-5)


def test_box_loss_gradient_moves_distances_towards_the_box():
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0]])
    target = centernet_targets(boxes, torch.tensor([0]), 1, (8, 8), 4.0)
    heat = torch.zeros(1, 1, 8, 8)
    distances = torch.full((1, 4, 8, 8), 2.0, requires_grad=True)  # boxes far too small
    centernet_loss((heat, distances), batched(target), stride=4.0)["box"].backward()
    assert (distances.grad[0, :, 4, 4] < 0).all()  # every side should grow


def test_focal_loss_rewards_the_right_peak():
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 1, 1] = 1
    right, wrong = torch.full_like(target, -5.0), torch.full_like(target, -5.0)
    right[0, 0, 1, 1], wrong[0, 0, 2, 2] = 5.0, 5.0
    assert focal_loss(right, target) < focal_loss(wrong, target) / 10


def test_detector_outputs_and_onnx_parity(tmp_path):
    model = tiny_detector().eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        outputs = model(images)
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 32, 32), (1, 4, 32, 32)]
    assert model.stride == 2.0
    path = tmp_path / "detector.onnx"
    torch.onnx.export(model, (images,), str(path), input_names=["images"],
                      output_names=["heatmap", "boxes"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_outputs = session.run(None, {"images": images.numpy()})
    for ours, theirs in zip(outputs, onnx_outputs, strict=True):
        np.testing.assert_allclose(theirs, ours.numpy(), rtol=1e-4, atol=1e-4)
    a = decode(*(o.numpy() for o in outputs), stride=model.stride)[0]
    b = decode(*onnx_outputs, stride=model.stride)[0]
    assert a["labels"].tolist() == b["labels"].tolist()
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)


def two_scenes(root):
    """Two 64x64 images with coloured squares of three classes, as a COCO split."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = [(230, 40, 40), (40, 200, 40), (40, 40, 230)]
    images, annotations = [], []
    for image_id in (1, 2):
        canvas = np.full((64, 64, 3), 20, np.uint8)
        for label in range(3):
            x, y = (int(v) for v in rng.integers(2, 40, size=2))
            size = int(rng.integers(10, 20))
            x, y = min(x, 63 - size), min(y, 63 - size)
            canvas[y : y + size, x : x + size] = colours[label]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x, y, size, size], "area": size * size, "iscrowd": 0})
        Image.fromarray(canvas).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 64})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(("red", "green", "blue"))]}
    (root / "instances.json").write_text(json.dumps(coco))
    return CocoSplit(root / "instances.json", root / "images")


def test_tiny_detector_overfits_two_scenes(tmp_path):
    split = two_scenes(tmp_path)
    dataset = CocoDetection(split, detection_transforms(64, train=False))
    images, targets = collate([dataset[0], dataset[1]])
    model = tiny_detector()
    _, encoded = EncodeTargets(3, model.stride)([dataset[0], dataset[1]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(120):
        loss = centernet_loss(model(images), encoded, model.stride)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        found = decode(*(o.numpy() for o in model(images)), stride=model.stride)
    results = to_coco_results(found, [t["image_id"] for t in targets], [t["scale"] for t in targets],
                              dataset.category_ids)
    assert coco_evaluate(split.annotations, results)["map50"] > 0.9


def test_eval_equals_a_direct_pycocotools_call(tmp_path):
    split = two_scenes(tmp_path)
    truth = json.loads(split.annotations.read_text())["annotations"]
    rng = np.random.default_rng(1)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                "bbox": [v + float(rng.normal(0, 1.5)) for v in a["bbox"]]} for a in truth]
    results.append({"image_id": 1, "category_id": 2, "bbox": [40.0, 40.0, 10.0, 10.0], "score": 0.9})
    ours = coco_evaluate(split.annotations, results)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(split.annotations))
        direct = COCOeval(gt, gt.loadRes(results), "bbox")
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    assert ours["map"] == pytest.approx(direct.stats[0], abs=0)
    assert ours["map50"] == pytest.approx(direct.stats[1], abs=0)
    assert ours["map_small"] == pytest.approx(direct.stats[3], abs=0)
    assert set(ours["per_class"]) == {"red", "green", "blue"}
    assert coco_evaluate(split.annotations, [])["map"] == 0.0


def test_results_map_back_through_the_letterbox_scale():
    found = [{"boxes": np.array([[10.0, 20.0, 30.0, 60.0]]), "scores": np.array([0.8]),
              "labels": np.array([1])}]
    (record,) = to_coco_results(found, [7], [2.0], category_ids=[3, 9])
    assert record == {"image_id": 7, "category_id": 9, "bbox": [5.0, 10.0, 10.0, 20.0], "score": 0.8}
