"""Your own COCO data as a profile's dataset: split, validated, keyed by its labels, used by the CLI."""

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgefm.artifacts import config_hash, plain
from edgefm.cli import main
from edgefm.config import DATA_ENV, DataConfig, load_profile
from edgefm.data import DatasetError, ensure_dataset
from edgefm.data.own import held_out_counts


def write_coco(folder: Path, count: int = 40, size: tuple[int, int] = (64, 48), seed: int = 0) -> dict:
    """``folder/instances.json`` and ``folder/images/``: ``count`` images with a bright box or two."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        pixels = np.full((size[1], size[0], 3), 40, np.uint8)
        for _ in range(1 + image_id % 2):
            w, h = (int(v) for v in rng.integers(8, 20, 2))
            x, y = int(rng.integers(0, size[0] - w)), int(rng.integers(0, size[1] - h))
            category = 1 + image_id % 2
            pixels[y:y + h, x:x + w] = (220, 60, 60) if category == 1 else (60, 60, 220)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        name = f"sub/img{image_id:03d}.png"
        (folder / "images" / "sub").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}
    (folder / "instances.json").write_text(json.dumps(coco))
    return coco


def split_ids(split) -> set[int]:
    return {image["id"] for image in json.loads(split.annotations.read_text())["images"]}


def test_one_annotation_file_is_split_by_a_seeded_draw_and_train_images_are_the_pool(tmp_path, monkeypatch):
    coco = write_coco(tmp_path / "mine")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "mine"))
    profile = load_profile("smoke")
    assert profile.data.source == str((tmp_path / "mine").resolve())
    dataset = ensure_dataset(profile)
    ids = {name: split_ids(getattr(dataset, name)) for name in ("train", "val", "eval")}
    # smoke holds out 24 eval and 8 val scenes; of 40 images that is capped at 15 % and 10 %
    assert (len(ids["eval"]), len(ids["val"]), len(ids["train"])) == (6, 4, 30)
    assert set.union(*ids.values()) == {image["id"] for image in coco["images"]}
    assert not (ids["eval"] & ids["val"] or ids["eval"] & ids["train"] or ids["val"] & ids["train"])
    train = json.loads(dataset.train.annotations.read_text())
    assert {a["image_id"] for a in train["annotations"]} <= ids["train"]
    assert dataset.train.images == (tmp_path / "mine" / "images").resolve()
    assert sorted(p.name for p in dataset.pool.iterdir()) == sorted(f"{i}.png" for i in ids["train"])
    assert ensure_dataset(profile).root == dataset.root  # cached: the same draw


def test_new_labels_make_new_keys_for_every_stage_and_a_given_split_is_used_as_is(tmp_path, monkeypatch):
    assert "labels" not in plain(load_profile("smoke").data)  # the book's own data: keys as they were
    write_coco(tmp_path / "mine")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "mine"))
    first, first_data = ensure_dataset("smoke").root, load_profile("smoke").data
    write_coco(tmp_path / "mine", seed=1)  # relabelled
    assert ensure_dataset("smoke").root != first
    # every stage's key holds the data config, so A, the MAE run and the students are trained again
    assert plain(load_profile("smoke").data)["labels"] != plain(first_data)["labels"]
    assert config_hash(load_profile("smoke").data) != config_hash(first_data)

    for split, count in (("train", 12), ("val", 3), ("eval", 5)):
        write_coco(tmp_path / "presplit" / split, count=count)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "presplit"))
    dataset = ensure_dataset("smoke")
    assert dataset.eval.annotations == (tmp_path / "presplit" / "eval" / "instances.json").resolve()
    assert [len(split_ids(s)) for s in (dataset.train, dataset.val, dataset.eval)] == [12, 3, 5]

    coco = json.loads((tmp_path / "presplit" / "eval" / "instances.json").read_text())
    coco["categories"].reverse()
    for category, name in zip(coco["categories"], ("red", "blue"), strict=True):
        category["name"] = name  # ids swapped: eval's "red" is train's "blue"
    (tmp_path / "presplit" / "eval" / "instances.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=r"eval/instances\.json: its categories .* differ from train's"):
        ensure_dataset("smoke")


def test_held_out_counts_keep_most_labels_for_training():
    assert held_out_counts(10_000, 500, 200) == (500, 200)  # the profile's counts
    assert held_out_counts(100, 500, 200) == (15, 10)
    with pytest.raises(DatasetError, match="too few"):
        held_out_counts(2, 500, 200)


def test_bad_folders_fail_naming_the_file_and_the_problem(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="nowhere: no such folder for your COCO data"):
        load_profile("smoke")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match=r"missing .*instances\.json"):
        load_profile("smoke")
    monkeypatch.setenv(DATA_ENV, "")
    typo = replace(load_profile("smoke"), data=DataConfig(source=str(tmp_path / "nowhere")))  # in Python
    with pytest.raises(DatasetError, match="nowhere.*nor a folder of COCO data"):
        ensure_dataset(typo)
    coco = write_coco(tmp_path / "outside")
    coco["annotations"][3]["bbox"] = [60, 40, 20, 20]  # beyond the 64 x 48 image
    (tmp_path / "outside" / "instances.json").write_text(json.dumps(coco))
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "outside"))
    with pytest.raises(DatasetError, match="outside.*instances.json"):
        ensure_dataset("smoke")


def test_the_command_line_trains_on_your_folder(tmp_path, capsys):
    write_coco(tmp_path / "mine")
    assert main(["--profile", "smoke", "--data", str(tmp_path / "mine"), "data"]) == 0
    assert re.search(r"train +30 images", capsys.readouterr().out)
    assert main(["--profile", "smoke", "--data", str(tmp_path / "mine"), "train"]) == 0
    assert main(["--profile", "smoke", "--data", str(tmp_path / "nowhere"), "data"]) == 2
    assert "nowhere" in capsys.readouterr().err
