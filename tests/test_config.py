from dataclasses import replace

import pytest

from edgefm.config import PROFILES, DataConfig, UnknownProfileError, load_profile, profile_name


def test_unset_profile_is_default():
    assert profile_name() == "default"
    assert load_profile().data == DataConfig()


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_builds(name):
    profile = load_profile(name)
    assert profile.name == name
    lo, hi = profile.data.item_size
    assert 0 < lo <= hi <= profile.data.image_size


def test_environment_picks_profile(monkeypatch):
    monkeypatch.setenv("EDGEFM_PROFILE", "smoke")
    assert load_profile().name == "smoke"


def test_unknown_profile_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("EDGEFM_PROFILE", "tiny")
    with pytest.raises(UnknownProfileError, match="'tiny'.*EDGEFM_PROFILE.*smoke, default, full"):
        load_profile()


def test_default_profile_meets_dataset_brief():
    data = load_profile("default").data
    assert data.image_size == 128 and data.items_per_scene == (1, 6)
    assert data.eval_scenes >= 500 and data.pool_images >= 20000 and data.train_scenes >= 1000


def test_shipped_weights_match_the_default_backbone_and_say_how_they_were_made():
    import json
    from pathlib import Path

    from edgefm.artifacts import plain
    from edgefm.models import load_mae_backbone

    profile = load_profile("default")
    folder = Path(__file__).resolve().parents[1] / profile.pretrain.weights
    assert (folder / "model.safetensors").stat().st_size <= 15 * 2**20  # issue 3's limit
    record = json.loads((folder / "pretrain.json").read_text())
    assert record["command"].startswith("edgefm --profile default pretrain --steps ")
    assert record["pretrain"]["backbone"] == plain(profile.pretrain.backbone)
    assert record["data"]["seed"] == profile.data.seed and record["loss_last"] < record["loss_first"]
    backbone = load_mae_backbone(folder, expect=profile.pretrain.backbone)
    assert backbone.vit.pos_embed.abs().max() > 0


def test_pyproject_declares_every_third_party_import_of_the_library():
    import ast
    import sys
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    declared = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("-", "_")
                for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]}
    names = {"PIL": "pillow"}  # import name -> distribution name
    imported = set()
    for path in (root / "src" / "edgefm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {names.get(m, m).lower() for m in imported
                   if m not in sys.stdlib_module_names and m not in ("edgefm", "__future__")}
    assert third_party <= declared, f"not declared in pyproject.toml: {sorted(third_party - declared)}"


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_searches_students_of_its_own_model(name):
    """The search space, the arm and the MAE students are sized from the profile's A, not the
    default's: at most A's depth and input size, and not below half of its input."""
    profile = load_profile(name)
    depth, size = profile.pretrain.backbone.num_layers, profile.finetune.detector.image_size
    smaller = profile.smaller
    assert all(size / 2 <= s <= size for s in smaller.search.image_sizes), smaller.search.image_sizes
    assert all(1 <= d <= depth for d in smaller.search.depths), smaller.search.depths
    for student in (smaller.arm, smaller.search_start, *smaller.long_students):
        assert student.depth <= depth and student.image_size <= size, student


def test_the_peer_check_schedule_is_longer_than_the_peer_or_off():
    profile = load_profile("smoke")
    assert replace(profile, peer_longer_factor=0).peer_longer_factor == 0
    for factor in (0.5, 1, -2):
        with pytest.raises(ValueError, match="peer_longer_factor"):
            replace(profile, peer_longer_factor=factor)


def test_b_control_seeds_are_some_of_b_seeds():
    smaller = load_profile("smoke").smaller
    for seeds in ((), (0, 7), (1,), (1, 0)):
        with pytest.raises(ValueError, match=r"control_seeds .*starts with B's seed \(0\)"):
            replace(smaller, control_seeds=seeds)
