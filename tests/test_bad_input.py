"""Bad input gets one clear error naming the file and the record, before any expensive work, and
loses nothing: the classes a new user ran into, and a fuzz of corrupted COCO files and bundles."""

import copy
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from edgefm.cli import main
from edgefm.data.coco import validate_coco
from edgefm.data.scenes import coco_summary
from edgefm.errors import DatasetError, InputError
from edgefm.runtime.images import read_image
from edgefm.tools.evaluate import coco_evaluate

ROOT = Path(__file__).resolve().parents[1]


def small_coco(folder: Path) -> Path:
    """Two 40x30 images, three boxes, no ``area`` (as most hand-made COCO files)."""
    (folder / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "images" / name)
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                       {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8]},
                            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [20, 5, 15, 20]},
                            {"id": 3, "image_id": 2, "category_id": 9, "bbox": [1, 1, 5, 5]}],
            "categories": [{"id": 7, "name": "cup"}, {"id": 9, "name": "pen"}]}
    path = folder / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def rewrite(path: Path, change) -> Path:
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))
    return path


def test_a_coco_file_without_area_validates_summarises_and_evaluates(tmp_path):
    path = small_coco(tmp_path)
    data = validate_coco(path, tmp_path / "images", read_images=True)
    assert [a["area"] for a in data["annotations"]] == [80, 300, 25]
    assert coco_summary(path)["per_size"] == {"small": 3, "medium": 0, "large": 0}
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in data["annotations"]]
    assert coco_evaluate(path, perfect)["map"] == pytest.approx(1.0)


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["images"][0].update(width="40"), "image 1: width must be int, got '40'"),
    (lambda c: c["images"][1].update(height=0), "image 2 (b.png) has size 40x0"),
    (lambda c: c["annotations"].__setitem__(0, "box"), "annotation #0 is str, not an object"),
    (lambda c: c["annotations"][1].update(id=1), "duplicate annotation id 1"),
    (lambda c: c["annotations"][2].pop("id"), "annotation #2 has no 'id'"),
    (lambda c: c["annotations"][0].update(bbox=[2, 3, True, 8]), "bbox must be [x, y, width, height]"),
    (lambda c: c["annotations"][0].update(area=-1), "area must be a number >= 0"),
    (lambda c: c["annotations"][0].update(bbox=[35, 3, 10, 8]), "lies outside its image a.png (40x30)"),
    (lambda c: c["categories"].append({"id": 7, "name": "mug"}), "duplicate category ids"),
])
def test_malformed_records_are_named(tmp_path, change, message):
    path = rewrite(small_coco(tmp_path), change)
    with pytest.raises(DatasetError, match=rf"instances.json: .*{re.escape(message)}"):
        validate_coco(path)


def test_a_folder_given_as_the_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="is a folder; give the annotation file"):
        validate_coco(tmp_path)


def test_validate_reads_the_real_image_size_as_training_does(tmp_path, capsys):
    path = small_coco(tmp_path)
    Image.new("RGB", (30, 40), (0, 0, 0)).save(tmp_path / "images" / "b.png")  # not the 40x30 the file says
    args = ["validate", str(path), str(tmp_path / "images")]
    assert main(args) == 0  # without --read-images only existence is checked
    assert main([*args, "--read-images"]) == 2
    assert "b.png: image is 30x40 but" in capsys.readouterr().err


def test_images_are_read_in_their_displayed_orientation(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as a phone held upright writes
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert Image.open(tmp_path / "phone.jpg").size == (60, 20)
    assert read_image(tmp_path / "phone.jpg").size == (20, 60)


def test_arguments_are_checked_before_anything_is_trained(fashion_dir, tmp_path, isolated_artifacts, capsys):
    for args, message in (
        (["predict", str(tmp_path / "typo.jpg")], "no such image file"),
        (["predict", str(tmp_path / "typo.jpg"), "--onnx", "x.onnx"], "no such image file"),
        (["bench", str(tmp_path / "missing.onnx")], "missing.onnx: no such ONNX model"),
    ):
        assert main(["--profile", "smoke", *args]) == 2
        assert message in capsys.readouterr().err
    Image.new("RGB", (30, 30)).save(tmp_path / "ok.jpg")
    assert main(["--profile", "smoke", "predict", str(tmp_path / "ok.jpg"), "--onnx", "x.onnx"]) == 2
    assert "x.onnx: no such ONNX model" in capsys.readouterr().err
    assert main(["--profile", "smoke", "predict", str(tmp_path / "ok.jpg"), "--json",
                 str(tmp_path / "no" / "such" / "found.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (isolated_artifacts / "smoke" / "finetune").exists()  # no training was started


@pytest.mark.parametrize("args", [
    ["predict", "a.jpg", "--batch-size", "0"], ["predict", "a.jpg", "--batch-size", "-1"],
    ["predict", "a.jpg", "--threshold", "1.5"], ["train", "--fraction", "0"],
    ["pennfudan", "x", "--out", "y", "--eval-count", "0"], ["bench", "--runs", "-3"],
])
def test_numbers_out_of_range_are_refused(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "error: argument" in capsys.readouterr().err


def corruptions(coco: dict, rng: random.Random, count: int):
    """Copies of ``coco`` with one random record field replaced by a random value or removed."""
    values = [None, -1, 0, 1.5, "x", [], {}, [1, 2], True, 10**9, float("nan")]
    for _ in range(count):
        broken = copy.deepcopy(coco)
        section = rng.choice(["images", "annotations", "categories"])
        if not broken[section]:
            continue
        record = rng.choice(broken[section])
        key = rng.choice(sorted(record))
        if rng.random() < 0.3:
            del record[key]
        else:
            record[key] = rng.choice(values)
        yield broken


def test_fuzzed_coco_files_give_a_clean_error_or_pass(tmp_path):
    path = small_coco(tmp_path)
    coco = json.loads(path.read_text())
    outcomes = {"error": 0, "valid": 0}
    for i, broken in enumerate(corruptions(coco, random.Random(0), 300)):
        target = tmp_path / f"broken{i}.json"
        target.write_text(json.dumps(broken))
        try:
            validate_coco(target, tmp_path / "images", read_images=True)
            outcomes["valid"] += 1
        except DatasetError:
            outcomes["error"] += 1
    assert outcomes["error"] > 200  # most corruptions are caught, none crashes


def test_fuzzed_bundles_give_a_clean_error_or_load(tmp_path):
    from edgefm.runtime import EdgeDetector
    from test_deploy import tiny_bundle

    folder = tiny_bundle(tmp_path / "bundle")
    record = json.loads((folder / "bundle.json").read_text())
    rng = random.Random(1)
    values = [None, -1, 0, "x", [], {}, 3.5, "missing.onnx", ["a"]]
    for _ in range(60):
        broken = copy.deepcopy(record)
        key = rng.choice(sorted(broken))
        broken[key] = rng.choice(values)
        (folder / "bundle.json").write_text(json.dumps(broken))
        try:
            detector = EdgeDetector(folder)
            detector.detect([Image.new("RGB", (50, 40))])
        except InputError:
            pass
    (folder / "bundle.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        EdgeDetector(folder)


def test_a_bundle_whose_model_is_not_a_detector_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgefm.errors import BundleError
    from edgefm.runtime import EdgeDetector
    from test_deploy import tiny_bundle

    folder = tiny_bundle(tmp_path / "bundle")
    spec = json.loads((folder / "bundle.json").read_text())
    size = spec["image_size"]
    shape = [1, 3, size, size]
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / spec["model"])
    with pytest.raises(BundleError, match="1 inputs and 1 outputs; a detector has"):
        EdgeDetector(folder)


def run_example(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / "predict.py"), *map(str, args)],
                          capture_output=True, text=True, check=False)


def test_the_example_script_answers_bad_input_in_one_line(tmp_path):
    from test_deploy import tiny_bundle

    missing = run_example(tmp_path / "nowhere", "a.jpg")
    assert missing.returncode == 2 and "cannot read the bundle" in missing.stderr
    assert "Traceback" not in missing.stderr
    folder = tiny_bundle(tmp_path / "bundle")
    (folder / "bad.jpg").write_bytes(b"junk")
    Image.new("RGB", (50, 40), (9, 9, 9)).save(folder / "good.png")
    record = json.loads((folder / "bundle.json").read_text())
    for optional in ("pad_value", "max_detections", "ort_model"):
        record.pop(optional, None)
    (folder / "bundle.json").write_text(json.dumps(record))
    done = run_example(folder, folder / "bad.jpg", folder / "good.png", "--threshold", "0")
    assert done.returncode == 1 and "skipped" in done.stderr and "Traceback" not in done.stderr
    assert all(line.startswith(str(folder / "good.png")) for line in done.stdout.splitlines())
    (folder / record["model"]).write_bytes(b"garbage")
    garbage = run_example(folder, folder / "good.png")
    assert garbage.returncode == 2 and "cannot load it" in garbage.stderr
    assert "Traceback" not in garbage.stderr
