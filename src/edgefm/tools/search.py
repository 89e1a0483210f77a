"""The search for model B with ``optuna``: two objectives, val mAP up and measured latency down.

Each trial picks a ViT student's depth, width, head pruning, input resolution and how it learns
(labels, distillation with its weights, or pseudo-labels; :class:`~edgefm.config.SearchConfig`
lists the choices), trains it for the comparison budget, and is scored on the val scenes and on
its 2-thread latency with frames arriving at camera rate *as a fraction of A's*, timed beside A in
the same run, so the objective does not drift with the machine. The sampler is
optuna's multi-objective TPE, seeded; the first trial is the hand-picked starting point, so the
search can only improve on it. The study lives in an optuna storage (an SQLite file by default, or
any database URL, which lets several machines share one study); a killed search keeps its
finished trials and runs only the missing ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import optuna

from edgefm.config import DistillWeights, SearchConfig, StudentConfig

Objective = Callable[[StudentConfig, int], tuple[float, float]]  # spec, trial number -> (mAP, latency)


def suggest(trial: optuna.Trial, settings: SearchConfig, start: StudentConfig) -> StudentConfig:
    """The student a trial asks for: ``start`` with the searched knobs replaced (the distillation
    weights are knobs only of trials that distill)."""
    params = {
        "depth": trial.suggest_categorical("depth", list(settings.depths)),
        "width": trial.suggest_categorical("width", list(settings.widths)),
        "heads": trial.suggest_categorical("heads", list(settings.heads)),
        "image_size": trial.suggest_categorical("image_size", list(settings.image_sizes)),
        "mode": trial.suggest_categorical("mode", list(settings.modes)),
    }
    if params["mode"] == "distill":
        params["heatmap_weight"] = trial.suggest_categorical("heatmap_weight", list(settings.heatmap_weights))
        params["feature_weight"] = trial.suggest_categorical("feature_weight", list(settings.feature_weights))
    return from_params(start, params, f"trial {trial.number}")


def from_params(start: StudentConfig, params: dict, name: str) -> StudentConfig:
    """``start`` with a trial's knobs."""
    weights = None
    if params["mode"] == "distill":
        weights = replace(start.distill or DistillWeights(), heatmap=params["heatmap_weight"],
                          features=params["feature_weight"])
    shape = replace(start, name=name, depth=params["depth"], width=params["width"], heads=params["heads"],
                    image_size=params["image_size"])
    return shape.with_mode(params["mode"], weights)


def start_params(start: StudentConfig, image_size: int) -> dict:
    """``start`` as trial parameters (for ``enqueue_trial``); ``image_size`` is A's."""
    params = {"depth": start.depth, "width": start.width, "heads": start.heads,
              "image_size": start.image_size or image_size, "mode": start.mode}
    if start.distill:
        params.update(heatmap_weight=start.distill.heatmap, feature_weight=start.distill.features)
    return params


def run_search(objective: Objective, settings: SearchConfig, start: StudentConfig, image_size: int,
               storage: str, name: str = "model-b") -> optuna.Study:
    """Run (or finish) the study: ``settings.trials`` complete trials in all."""
    sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=max(2, settings.trials // 2))
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, sampler=sampler,
                                directions=["maximize", "minimize"])
    if not study.trials:
        study.enqueue_trial(start_params(start, image_size))

    def score(trial: optuna.Trial) -> tuple[float, float]:
        spec = suggest(trial, settings, start)
        return objective(spec, trial.number)

    complete = (optuna.trial.TrialState.COMPLETE,)
    if len(study.get_trials(states=complete)) < settings.trials:
        # the callback counts every worker's trials: processes sharing a database stop together
        study.optimize(score, callbacks=[optuna.study.MaxTrialsCallback(settings.trials, states=complete)])
    return study


def trial_records(study: optuna.Study) -> list[dict]:
    """Every finished trial: its number, knobs, val mAP, latency fraction and Pareto membership."""
    front = {t.number for t in study.best_trials}
    return [{"number": t.number, **t.params, "map": t.values[0], "latency_fraction": t.values[1],
             "pareto": t.number in front}
            for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def choose(records: list[dict], budget: float) -> dict:
    """The most accurate trial within the latency budget (a fraction of A's latency); if none fits,
    the fastest one, so the book can show how far the search fell short."""
    fitting = [r for r in records if r["latency_fraction"] <= budget]
    if fitting:
        return max(fitting, key=lambda r: (r["map"], -r["latency_fraction"]))
    return min(records, key=lambda r: r["latency_fraction"])
