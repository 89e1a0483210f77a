"""The bundle on an emulated 64-bit Arm board (edgefm.tools.arm64): the same detections as here."""

import json

import numpy as np
import pytest
from PIL import Image

from edgefm.config import DetectorConfig
from edgefm.data.coco import CocoSplit
from edgefm.tools import arm64
from edgefm.tools.bundle import write_bundle
from edgefm.tools.export import export_onnx
from edgefm.tools.quantize import CalibrationScenes, QuantRecipe, preprocess, quantize
from test_detector import tiny_detector

needs_board = pytest.mark.skipif(arm64.qemu_aarch64() is None,
                                 reason="no emulated Arm board here (make arm64-root, with qemu-user)")


def test_each_emulated_cpu_describes_itself_as_linux_does():
    for cpu in arm64.ARM_CPUS.values():
        text = cpu.cpuinfo(cores=2)
        assert text.count("processor\t:") == 2 and f"CPU part\t: {cpu.part:#05x}" in text
    # the Pi 4's core has no dot-product instructions: its cpuinfo must not claim them
    assert "asimddp" not in arm64.ARM_CPUS["cortex-a72"].features.split()
    assert "asimddp" in arm64.ARM_CPUS["cortex-a76"].features.split()


def test_without_a_prepared_board_the_error_says_how_to_make_one(tmp_path):
    with pytest.raises(RuntimeError, match="make arm64-root"):
        arm64.detect_on_arm(tmp_path / "bundle", [tmp_path / "a.png"], root=tmp_path / "no-root")


def test_the_command_without_a_board_fails_in_one_line_naming_the_root(tmp_path, capsys):
    from edgefm.cli import main

    (tmp_path / "a.png").write_bytes(b"")
    missing = tmp_path / "none"
    assert main(["arm64", str(tmp_path / "bundle"), str(tmp_path / "a.png"), "--root", str(missing)]) == 2
    assert f"no emulated Arm board in {tmp_path / 'none'}" in capsys.readouterr().err


def test_an_empty_image_list_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        arm64.detect_here(tmp_path, [])


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """A tiny random detector in static INT8 (QDQ, as C is) with weights in 7 bits (``reduce_range``: the
    format that sums exactly on every x86 CPU, :mod:`edgefm.tools.isa`), bundled, and image files."""
    root = tmp_path_factory.mktemp("arm")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    infos = []
    for i, (height, width) in enumerate([(64, 64), (48, 80), (90, 60), (64, 64)]):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        infos.append({"id": i + 1, "file_name": f"{i}.png", "width": width, "height": height})
    coco = {"images": infos, "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    model = tiny_detector(num_classes=3, image_size=64).eval()
    exported = export_onnx(model, root / "a.onnx", 64)
    calibration = CalibrationScenes(CocoSplit(root / "instances.json", root / "images"), 64, 4, batch_size=2)
    recipe = QuantRecipe("safe", op_types=("MatMul", "Conv", "ConvTranspose"), reduce_range=True)
    prepared = preprocess(exported, root / "a-pre.onnx")
    int8 = quantize(exported, prepared, root / "a-int8.onnx", recipe, calibration)
    write_bundle(root / "bundle", int8, ["cat", "dog", "bird"], DetectorConfig(image_size=64), model.stride)
    return root / "bundle", sorted((root / "images").glob("*.png")), exported


@needs_board
def test_an_int8_bundle_computes_on_emulated_arm_what_it_computes_here(int8_bundle):
    from edgefm.runtime import onnx_runner, open_session
    from edgefm.runtime.images import letterbox, read_image

    bundle, files, fp32 = int8_bundle
    images = np.stack([letterbox(read_image(path), 64)[0] for path in files])
    reference = onnx_runner(open_session(fp32, threads=1))(images)
    here = arm64.detect_here(bundle, files)
    records = {}
    for cpu in arm64.ARM_CPUS:
        there = arm64.detect_on_arm(bundle, files, cpu)
        # the random detector scores hundreds of cells near its prior (0.1), more than the decoder keeps
        # (100 an image), and which of equal scores it keeps depends on the sort: compare those above 0.25
        records[cpu] = arm64.compare(here, there, cpu, min_score=0.25)
        assert records[cpu]["machine"] == "aarch64" and records[cpu]["images"] == len(files)
        assert records[cpu]["detections"]["reference_detections"] > 0 and records[cpu]["same"]
        # Arm's kernels may round some elements differently from x86's, but INT8 on Arm must be as close
        # to FP32 as INT8 here: a saturated or misread integer kernel would be far off
        for ref, x86, arm in zip(reference, here["outputs"], there["outputs"], strict=True):
            assert np.abs(arm - ref).max() <= 1.1 * np.abs(x86 - ref).max() + 1e-6
    assert "Raspberry Pi 4" in arm64.describe(records) and "Raspberry Pi 5" in arm64.describe(records)


@needs_board
def test_the_command_compares_a_bundle_on_one_core_and_writes_the_record(int8_bundle, tmp_path, capsys):
    from edgefm.cli import main

    bundle, files, _ = int8_bundle
    assert main(["arm64", str(bundle), *map(str, files[:2]), "--cpu", "cortex-a72", "--json",
                 str(tmp_path / "arm.json")]) == 0
    record = json.loads((tmp_path / "arm.json").read_text())
    assert list(record) == ["cortex-a72"] and record["cortex-a72"]["images"] == 2
    assert "Raspberry Pi 4" in capsys.readouterr().out
