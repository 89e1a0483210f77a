import json
from dataclasses import dataclass

import pytest

from edgefm import artifacts
from edgefm.artifacts import (
    artifacts_root,
    atomic_path,
    atomic_write_json,
    code_hash,
    config_hash,
    ensure_dir,
    read_metrics,
    stage,
    stage_dir,
    write_metrics,
)


@dataclass(frozen=True)
class Cfg:
    lr: float = 0.1
    steps: int = 3


def test_root_from_environment(isolated_artifacts):
    assert artifacts_root() == isolated_artifacts


def test_root_beside_enclosing_book(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEFM_ARTIFACTS")
    (tmp_path / "_toc.yml").write_text("root: intro\n")
    (tmp_path / "_config.yml").write_text("title: x\n")
    chapter_dir = tmp_path / "book"
    chapter_dir.mkdir()
    monkeypatch.chdir(chapter_dir)
    assert artifacts_root() == tmp_path / "artifacts"


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(Cfg()) == config_hash(Cfg())
    assert config_hash(Cfg()) != config_hash(Cfg(lr=0.2))


def test_stage_dir_changes_with_config_and_version_not_with_code(monkeypatch):
    base = stage_dir("smoke", "data", Cfg())
    assert base.parent == artifacts_root() / "smoke" / "data"
    assert stage_dir("smoke", "data", Cfg(steps=4)) != base
    assert stage_dir("smoke", "data", Cfg(), code="pennfudan") != base
    monkeypatch.setattr(artifacts, "code_hash", lambda *m: "moved or reworded")
    assert stage_dir("smoke", "data", Cfg()) == base
    versions = artifacts.stage_versions()
    versions["data"]["version"] += 1
    monkeypatch.setattr(artifacts, "stage_versions", lambda: versions)
    assert stage_dir("smoke", "data", Cfg()) != base


def test_every_stage_records_the_code_it_runs():
    stale = artifacts.stale_stage_sources()
    assert not stale, (
        f"the code of stage(s) {', '.join(stale)} changed since their version was recorded. If the change "
        "alters what a stage computes, run `python -m edgefm.artifacts --bump STAGE`; if not (a move, a "
        "rename, a message), record the new code with `python -m edgefm.artifacts`.")


def test_recording_bumps_only_what_is_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "VERSIONS_FILE", tmp_path / "versions.json")
    first = artifacts.record_stage_sources()
    assert {e["version"] for e in first.values()} == {1}
    bumped = artifacts.record_stage_sources(bump=("finetune",))
    assert bumped["finetune"]["version"] == 2 and bumped["data"]["version"] == 1
    assert artifacts.stale_stage_sources() == []


def test_code_hash_follows_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "edgefm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "leaf.py").write_text("X = 1\n")
    (pkg / "config.py").write_text("C = 1\n")
    (pkg / "sub" / "stage.py").write_text(
        "from edgefm.leaf import X\nfrom . import helper\nfrom edgefm.config import C\n"
    )
    (pkg / "sub" / "helper.py").write_text("Y = 2\n")
    (pkg / "other.py").write_text("Z = 3\n")
    monkeypatch.setattr(artifacts, "PACKAGE_DIR", pkg)
    code_hash.cache_clear()
    before = code_hash("edgefm.sub.stage")
    (pkg / "other.py").write_text("Z = 4\n")  # not imported by the stage: no change
    (pkg / "config.py").write_text("C = 2\n")  # configs are keyed by value, not by code
    code_hash.cache_clear()
    assert code_hash("edgefm.sub.stage") == before
    # rewording a docstring or a comment keeps the result; changing code does not
    (pkg / "leaf.py").write_text('"""The leaf."""\nX = 1  # one\n')
    code_hash.cache_clear()
    assert code_hash("edgefm.sub.stage") == before
    for imported in (pkg / "leaf.py", pkg / "sub" / "helper.py"):
        imported.write_text(imported.read_text() + "W = 0\n")
        code_hash.cache_clear()
        assert code_hash("edgefm.sub.stage") != before
        before = code_hash("edgefm.sub.stage")
    code_hash.cache_clear()


def test_ensure_dir_builds_once_and_records_config(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "result.txt").write_text("done")

    target = tmp_path / "stage" / "key"
    assert ensure_dir(target, build, config=Cfg()) == target
    ensure_dir(target, build, config=Cfg())
    assert len(calls) == 1
    assert (target / "result.txt").read_text() == "done"
    assert json.loads((target / "config.json").read_text()) == {"lr": 0.1, "steps": 3}
    ensure_dir(tmp_path / "nested", build, config={"a": Cfg(), "b": Cfg(steps=4)})
    assert json.loads((tmp_path / "nested" / "config.json").read_text())["b"] == {"lr": 0.1, "steps": 4}


def test_interrupted_build_resumes_in_the_same_folder(tmp_path):
    seen = []

    def build(work):
        seen.append(sorted(p.name for p in work.iterdir()))
        (work / f"part{len(seen)}.txt").write_text("x")
        if len(seen) == 1:
            raise KeyboardInterrupt

    target = tmp_path / "stage" / "key"
    with pytest.raises(KeyboardInterrupt):
        ensure_dir(target, build)
    assert not target.exists()
    ensure_dir(target, build)
    assert seen == [[], ["part1.txt"]]  # the second run found the first run's work
    assert sorted(p.name for p in target.iterdir()) == ["part1.txt", "part2.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["key"]


def test_stage_computes_once_and_always_hands_back_its_json():
    calls = []

    def build(work):
        calls.append(work)
        (work / "model.onnx").write_bytes(b"onnx")  # a file the stage makes beside its results
        return {"map": 0.5, "shape": (2, 3)}

    first = stage("smoke", "measuring", {"model_a": "x"}, build)
    assert first["shape"] == [2, 3]  # the JSON that a cached call reads back, on the first call too
    assert stage("smoke", "measuring", {"model_a": "x"}, build) == first and len(calls) == 1
    folder = stage_dir("smoke", "measuring", {"model_a": "x"})
    assert first["folder"] == str(folder) and (folder / "model.onnx").read_bytes() == b"onnx"
    assert json.loads((folder / "config.json").read_text()) == {"model_a": "x"}
    assert read_metrics("smoke", "measuring") == first
    other = stage("smoke", "measuring", {"model_a": "y"}, build)
    assert len(calls) == 2 and other["folder"] != first["folder"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_metrics_round_trip_and_missing_stage():
    path = write_metrics("smoke", "data", {"train_images": 3})
    assert path == artifacts_root() / "smoke" / "metrics" / "data.json"
    assert read_metrics("smoke", "data") == {"train_images": 3}
    with pytest.raises(FileNotFoundError, match="no metrics for stage 'pretrain'"):
        read_metrics("smoke", "pretrain")


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    import os

    from edgefm.artifacts import atomic_write_json

    mask = os.umask(0)
    os.umask(mask)
    path = atomic_write_json(tmp_path / "m.json", {"a": 1})
    (tmp_path / "plain.json").write_text("{}")
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o666 & ~mask
