import json

import pytest

from edgefm.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "validate", "pennfudan"):
        assert command in out


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
