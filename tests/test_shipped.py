"""The results shipped in ``weights/`` are the ones the default build asks for.

A build reads a shipped result only when it was made with exactly the config (and the code
version) that the profile asks for today; otherwise it trains the result itself, for hours. These
tests catch a change that would silently turn the shipped results away: they read the keys the
default build computes, and nothing here trains, builds the dataset or downloads anything."""
import json
from pathlib import Path

import pytest

from edgefm.artifacts import plain
from edgefm.config import load_profile
from edgefm.stages import finetune, peer, smaller
from edgefm.stages.feasibility import shipped_records, study_runs
from edgefm.stages.finetune import config_differences, ensure_finetuned, finetune_key

DEFAULT = load_profile("default")


@pytest.fixture(autouse=True)
def repository_weights(monkeypatch):
    """The repository's own weights/ (conftest hides them from every other test)."""
    monkeypatch.setenv("EDGEFM_WEIGHTS", str(Path(__file__).resolve().parents[1] / "weights"))


@pytest.fixture
def nothing_trains(monkeypatch):
    """An empty artifacts folder (conftest's), and a dataset that cannot be built: only weights/
    can answer."""
    def no_dataset(profile):
        raise AssertionError(f"profile {profile.name!r} would build its dataset and train here")

    monkeypatch.setattr(finetune, "ensure_dataset", no_dataset)


@pytest.mark.parametrize("init", ["mae", "random"])
def test_the_shipped_a_and_its_twin_are_the_default_recipe(init, nothing_trains, capsys):
    trained = ensure_finetuned(DEFAULT, init, progress=False)
    assert trained.shipped and trained.path.parent.name == "weights", trained.path
    assert "note:" not in capsys.readouterr().out


def test_every_shipped_study_run_is_a_run_of_the_study_made_with_its_config():
    wanted = {run.name: run for run in study_runs(DEFAULT)}
    shipped = shipped_records(DEFAULT)
    assert {"a", "random"} <= set(shipped) <= set(wanted)
    for name, record in shipped.items():
        key, _ = finetune_key(DEFAULT, wanted[name].config(DEFAULT), progress=False)
        assert not config_differences(record["config"], json.loads(json.dumps(plain(key), default=str))), name


def test_the_shipped_students_are_the_candidates_the_study_asks_for(nothing_trains):
    model_a = ensure_finetuned(DEFAULT, progress=False).identity
    settings = DEFAULT.smaller
    folder = smaller.shipped_students(DEFAULT)
    for path in folder.iterdir():
        made = json.loads((path / "config.json").read_text())
        spec = smaller.student_config(made["student"])
        training = type(settings.final)(**made["training"])
        assert smaller.student_folder(DEFAULT, spec, training, model_a).name == path.name, (
            f"{path}: the build no longer asks for it; ship again with "
            f"{smaller.SHIP_COMMAND.format(profile=DEFAULT.name)}")
    asked = [(smaller.continued(), settings.final), *((s, settings.long) for s in settings.long_students)]
    for spec, training in asked:
        assert (folder / smaller.student_folder(DEFAULT, spec, training, model_a).name).is_dir(), spec.name


def test_the_shipped_peer_is_the_default_peer(tmp_path, capsys):
    assert peer._shipped_state(DEFAULT, peer.peer_key(DEFAULT), tmp_path) is not None
    assert "note:" not in capsys.readouterr().out


def test_the_shipped_search_is_the_search_the_build_asks_for(nothing_trains):
    import optuna

    name = smaller.study_name(DEFAULT, ensure_finetuned(DEFAULT, progress=False).identity)
    storage = f"sqlite:///{smaller.shipped_study(DEFAULT)}"
    assert name in optuna.study.get_all_study_names(storage), f"{storage} lacks {name}: ship the search again"
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= DEFAULT.smaller.search.trials
