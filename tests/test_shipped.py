"""The results shipped in ``weights/`` and ``studies/`` are the ones the default build asks for.

A build reads a shipped result only when it was made with exactly the config (and the code
version) that the profile asks for today; otherwise it trains the result itself, for hours. These
tests catch a change that would silently turn the shipped results away: they compute the keys the
default build computes, and nothing here trains, builds a dataset or downloads anything."""
import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from edgefm import data
from edgefm.artifacts import plain, stage_dir
from edgefm.config import load_profile
from edgefm.report import B_STUDY
from edgefm.stages import peer, smaller
from edgefm.stages.feasibility import shipped_records, study_runs
from edgefm.stages.finetune import WEIGHTS, config_differences, ensure_finetuned, finetune_key
from edgefm.tools.search import choose, from_params, trial_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def default(monkeypatch):
    """The default profile as the build in the repository sees it: its own weights/ (conftest hides
    them from every other test) and folder, and no dataset: a test that would train fails."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("EDGEFM_WEIGHTS", str(ROOT / "weights"))
    profile = load_profile("default")

    def no_dataset(profile):
        raise AssertionError(f"profile {profile.name!r} would build its dataset and train here")

    monkeypatch.setitem(data._BUILDERS, profile.data.source, no_dataset)
    return profile


@pytest.fixture
def model_a(default):
    return ensure_finetuned(default, progress=False).identity


def shipped_student(default, spec, training, model_a) -> Path:
    """Where the build looks for a candidate in weights/ (a student of the pool is keyed by A's
    pseudo-labels too)."""
    pseudo = stage_dir(default.name, "pseudo", smaller.pseudo_labels_key(default, model_a))
    folder = smaller.student_folder(default, spec, training, model_a, pseudo.name if spec.pool else None)
    return smaller.shipped_students(default) / folder.name


@pytest.mark.parametrize("init", ["mae", "random"])
def test_the_shipped_a_and_its_twin_are_the_default_recipe(init, default, capsys):
    trained = ensure_finetuned(default, init, progress=False)
    assert trained.shipped and trained.path.parent == ROOT / "weights", trained.path
    assert "note:" not in capsys.readouterr().out


def test_every_shipped_study_run_is_a_run_of_the_study_made_with_its_config(default):
    wanted = {run.name: run for run in study_runs(default)}
    shipped = shipped_records(default)
    assert {"a", "random"} <= set(shipped) <= set(wanted)
    for name, record in shipped.items():
        key, _ = finetune_key(default, wanted[name].config(default), progress=False)
        assert not config_differences(record["config"], json.loads(json.dumps(plain(key), default=str))), name


def test_the_shipped_students_are_the_candidates_the_study_asks_for(default, model_a):
    settings = default.smaller
    for path in (p for p in smaller.shipped_students(default).iterdir() if p.is_dir()):
        made = json.loads((path / "config.json").read_text())
        spec = smaller.student_config(made["student"])
        training = type(settings.final)(**made["training"])
        assert shipped_student(default, spec, training, model_a) == path, (
            f"{path}: the build no longer asks for it; ship again with "
            f"{smaller.SHIP_COMMAND.format(profile=default.name)}")
    control = smaller.control_training(default)
    asked = [*((smaller.continued(seed), control) for seed in settings.control_seeds),
             *((s, settings.long) for s in settings.long_students)]
    for spec, training in asked:
        folder = shipped_student(default, spec, training, model_a)
        assert (folder / WEIGHTS).is_file() and (folder / "train_state.json").is_file(), spec.name


def test_the_shipped_search_is_complete_and_chose_the_shipped_b(default, model_a):
    settings = default.smaller
    assert smaller.shipped_study(default).is_file()
    storage = smaller.search_storage(default)  # a copy in the (temporary) artifacts, as the build makes
    name = smaller.study_name(default, model_a)
    assert name in optuna.study.get_all_study_names(storage), f"the shipped study lacks {name}: ship it again"
    trials = trial_records(optuna.load_study(study_name=name, storage=storage))
    assert len(trials) >= settings.search.trials
    b = from_params(settings.search_start, choose(trials, settings.search.latency_budget), B_STUDY)
    for seed in settings.final_seeds:  # B and the seeds that judge whether its schedule converged
        spec = replace(b, seed=seed)
        for training in (settings.final, smaller.longer_training(default)):
            assert (shipped_student(default, spec, training, model_a) / WEIGHTS).is_file(), (
                f"B with seed {seed} at {training.steps} steps is not shipped")


def test_the_shipped_peer_is_the_default_peer(default, tmp_path, capsys):
    for run, cfg in (("base", default.peer), ("longer", peer.longer_peer(default))):
        assert peer._shipped_state(default, run, cfg, tmp_path) is not None, f"the peer's {run} run"
    # the longer run shares the peer's seed and first batches: its first step's loss is the peer's
    first = [json.loads((peer.shipped_peer(default, run) / "train_state.json").read_text())["losses"][0]
             for run in peer.RUNS]
    assert first[0] == pytest.approx(first[1], abs=1e-3)
    assert "note:" not in capsys.readouterr().out
