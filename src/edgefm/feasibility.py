"""The feasibility model A and what its foundation model is worth, measured.

Model A is the detector fine-tuned from the MAE encoder on all labelled train scenes. The same
detector, recipe and number of steps from a random encoder is the baseline. Both again, shortened
to the profile's ``curve_steps``, on nested fractions of the labels give the label-efficiency
curve; A's shortened recipe with other seeds gives the seed-to-seed spread. Everything is
evaluated once, on the eval scenes, with COCOeval, and recorded in ``metrics/feasibility.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgefm.artifacts import write_metrics
from edgefm.config import Profile, load_profile
from edgefm.data import CocoSplit, ensure_dataset
from edgefm.evaluate import evaluate_split
from edgefm.finetune import Finetuned, ensure_finetuned, load_detector, torch_runner


def evaluate_finetuned(trained: Finetuned, split: CocoSplit) -> dict:
    """COCO metrics of a fine-tuned detector on a split."""
    model = load_detector(trained)
    return evaluate_split(torch_runner(model), split, trained.config.detector, model.stride)


def seed_spread(profile: Profile, score: Callable[[Finetuned], dict], progress: bool = True) -> dict:
    """mAP of A's recipe, shortened to ``curve_steps``, for seed 0 and each of ``spread_seeds``:
    how far apart two runs that differ only by chance land (init of the new layers, batch order).
    Seed 0's run is the label-efficiency curve's all-labels MAE run (same config, same cache);
    ``score`` evaluates a run (the caller's, so a run it already scored is not evaluated again)."""
    full = max(profile.label_fractions)
    seeds = (profile.finetune.seed, *profile.spread_seeds)
    runs = [ensure_finetuned(profile, "mae", full, progress, seed=seed, steps=profile.curve_steps)
            for seed in seeds]
    maps = [score(trained)["map"] for trained in runs]
    return {"steps": profile.curve_steps, "seeds": list(seeds), "maps": maps,
            "spread": max(maps) - min(maps)}


def ensure_feasibility(profile: Profile | str | None = None, progress: bool = True) -> dict:
    """Train (or load) A, its random-init twin and the label-efficiency runs; write the metrics."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    full = max(profile.label_fractions)
    model_a, scratch = (ensure_finetuned(profile, init, full, progress) for init in ("mae", "random"))
    curve = {(init, fraction): ensure_finetuned(profile, init, fraction, progress, steps=profile.curve_steps)
             for fraction in profile.label_fractions for init in ("mae", "random")}
    eval_split = ensure_dataset(profile).eval
    by_path: dict[Path, dict] = {}  # a run that serves two roles (e.g. curve and spread) is scored once

    def score(trained: Finetuned) -> dict:
        if trained.path not in by_path:
            by_path[trained.path] = evaluate_finetuned(trained, eval_split)
        return by_path[trained.path]

    score_a, score_scratch = score(model_a), score(scratch)
    scores = {key: score(trained) for key, trained in curve.items()}
    metrics = {
        **score_a,
        "map_scratch": score_scratch["map"],
        "map50_scratch": score_scratch["map50"],
        "per_class_scratch": score_scratch["per_class"],
        "params": sum(p.numel() for p in load_detector(model_a).parameters()),
        "train_seconds": round(model_a.state.seconds, 1),
        "train_seconds_scratch": round(scratch.state.seconds, 1),
        "steps": model_a.state.step,
        "losses": model_a.state.losses, "losses_scratch": scratch.state.losses,
        "val_curve": model_a.state.evals, "val_curve_scratch": scratch.state.evals,
        "curve_steps": profile.curve_steps,
        "label_efficiency": [
            {"fraction": f, "map_mae": scores[("mae", f)]["map"], "map_scratch": scores[("random", f)]["map"],
             "map50_mae": scores[("mae", f)]["map50"], "map50_scratch": scores[("random", f)]["map50"]}
            for f in sorted(profile.label_fractions)
        ],
        "checkpoint": str(model_a.path),
    }
    metrics["map_gain_mae"] = metrics["map"] - metrics["map_scratch"]
    metrics["seed_spread"] = seed_spread(profile, score, progress)
    write_metrics(profile.name, "feasibility", metrics)
    return metrics
