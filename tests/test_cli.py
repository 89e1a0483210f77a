import json
import subprocess
import sys

import pytest
from PIL import Image

from edgefm.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "validate", "pennfudan"):
        assert command in out


def test_python_dash_m_edgefm_is_the_command_line():
    done = subprocess.run([sys.executable, "-m", "edgefm", "--profile", "huge", "data"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("edgefm: error: unknown profile 'huge'")


def test_data_builds_the_smoke_dataset(fashion_dir, isolated_artifacts, capsys):
    assert main(["--profile", "smoke", "data"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "pool" in out
    metrics = json.loads((isolated_artifacts / "smoke" / "metrics" / "data.json").read_text())
    assert metrics["eval_images"] > 0


def test_wrong_profile_fails_with_one_clear_line(capsys):
    assert main(["--profile", "huge", "data"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgefm: error: unknown profile 'huge'") and "smoke, default, full" in err


def test_validate_reports_a_bad_dataset(tmp_path, capsys):
    (tmp_path / "instances.json").write_text("[]")
    assert main(["validate", str(tmp_path / "instances.json"), str(tmp_path)]) == 2
    assert "top level must be a JSON object" in capsys.readouterr().err


def test_validate_accepts_the_scenes(fashion_dir, capsys):
    assert main(["--profile", "smoke", "data"]) == 0
    root = capsys.readouterr().out.split()[1]
    assert main(["validate", f"{root}/eval/instances.json", f"{root}/eval/images", "--read-images"]) == 0
    assert "valid" in capsys.readouterr().out


def test_train_eval_predict_in_smoke(fashion_dir, tmp_path, capsys):
    assert main(["--profile", "smoke", "train", "--init", "random"]) == 0
    assert "val mAP" in capsys.readouterr().out
    assert main(["--profile", "smoke", "eval", "--init", "random"]) == 0
    assert '"map50"' in capsys.readouterr().out
    Image.new("RGB", (90, 60), (40, 90, 160)).save(tmp_path / "scene.jpg")
    assert main(["--profile", "smoke", "predict", str(tmp_path / "scene.jpg"), "--init", "random",
                 "--out", str(tmp_path / "out"), "--threshold", "0"]) == 0
    assert (tmp_path / "out" / "scene.png").stat().st_size > 1000


def test_predict_names_a_corrupt_image_and_keeps_going(fashion_dir, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    for folder in ("a", "b"):  # two good images with the same name
        (tmp_path / folder).mkdir()
        Image.new("RGB", (90, 60), (40, 90, 160)).save(tmp_path / folder / "scene.jpg")
    images = [str(tmp_path / "a" / "scene.jpg"), str(tmp_path / "bad.jpg"), str(tmp_path / "b" / "scene.jpg")]
    assert main(["--profile", "smoke", "predict", *images, "--init", "random", "--batch-size", "2",
                 "--out", str(tmp_path / "out"), "--json", str(tmp_path / "found.json")]) == 1
    assert "bad.jpg: cannot read image" in capsys.readouterr().err
    found = json.loads((tmp_path / "found.json").read_text())
    assert [r["image"] for r in found["images"]] == [images[0], images[2]]
    assert [f["image"] for f in found["failed"]] == [images[1]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scene-2.png", "scene.png"]
    assert main(["--profile", "smoke", "predict", str(tmp_path / "bad.jpg"), "--init", "random",
                 "--out", str(tmp_path / "none")]) == 1
    assert not (tmp_path / "none").exists()  # nothing drawn, no folder left behind


def test_pretrain_exports_weights_that_load_like_a_hub_id(fashion_dir, isolated_artifacts, tmp_path, capsys):
    from edgefm.models import load_mae_backbone

    out = tmp_path / "shipped"
    assert main(["--profile", "smoke", "pretrain", "--steps", "3", "--export", str(out)]) == 0
    record = json.loads((out / "pretrain.json").read_text())
    assert record["steps"] == 3 and record["pretrain"]["steps"] == 3 and len(record["losses"]) == 3
    assert record["command"] == f"edgefm --profile smoke pretrain --steps 3 --export {out}"
    assert load_mae_backbone(out).vit.pos_embed.abs().max() > 0


def test_a_profile_can_start_from_shipped_weights(fashion_dir, isolated_artifacts, tmp_path):
    from dataclasses import replace

    from edgefm.config import load_profile
    from edgefm.stages.pretrain import ensure_pretrained

    out = tmp_path / "shipped"
    assert main(["--profile", "smoke", "pretrain", "--steps", "3", "--export", str(out)]) == 0
    smoke = load_profile("smoke")
    shipped = replace(smoke, pretrain=replace(smoke.pretrain, weights=str(out)))
    own, used = ensure_pretrained(smoke, progress=False), ensure_pretrained(shipped, progress=False)
    assert used.source == str(out) and used.run == own.run  # the in-build run is still made, once
    assert used.metrics["weights"]["steps"] == 3 and used.metrics["steps"] == smoke.pretrain.steps
    assert used.fingerprint != own.fingerprint
