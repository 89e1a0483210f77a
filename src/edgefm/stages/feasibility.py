"""The feasibility model A and what its foundation model is worth, measured with error bars.

The study is a set of fine-tuning runs (:func:`study_runs`): A (the profile's recipe from the MAE
encoder), its random-init twin (same recipe and budget), A with other seeds (the seed-to-seed
spread), A on shorter schedules (does a longer one still gain?), A without layer decay on the
shortest one (does the recipe's gentler LR for early blocks cost accuracy?), and both inits on
fractions of the labels, each for as many epochs over its subset as A over all of them (label
efficiency).

Most of these runs are too long for a two-hour build on a laptop. ``edgefm long-runs`` trains
them (in parallel, on a GPU if there is one) and ships them: A and its twin as weights
(``weights/a-<profile>``, ``weights/a-random-<profile>``), every run as a record of its config,
validation curve and eval mAP with its interval (``weights/feasibility-<profile>/runs.json``).
The build (:func:`ensure_feasibility`) uses a shipped run only if it was made with exactly the
config the profile asks for, re-evaluates the shipped A and twin, and re-traces the start of A's
schedule live with three seeds; anything missing is trained here. Every mAP carries a 95 %
bootstrap interval over the eval images, and every verdict compares a gap with its intervals.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from edgefm.artifacts import artifacts_root, atomic_write_json, plain, stage, stage_dir
from edgefm.config import FinetuneConfig, Profile, load_profile
from edgefm.data import CocoSplit, ensure_dataset
from edgefm.stages.finetune import (
    WEIGHTS,
    Finetuned,
    config_differences,
    ensure_finetuned,
    finetune_key,
    load_detector,
    shipped_folder,
    weights_root,
)
from edgefm.stages.pretrain import fingerprint
from edgefm.tools.bench import machine
from edgefm.tools.evaluate import BOOTSTRAP, evaluate_split, gap_interval, interval_gap, torch_runner
from edgefm.tools.training import resolve_device

EVAL_KEYS = ("map", "map_ci", "map50", "map75", "map_small", "map_medium", "map_large", "per_class")


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the study: ``init`` on ``fraction`` of the labels, with
    ``overrides`` of the profile's recipe (seed, steps, ...)."""

    name: str
    init: str
    fraction: float = 1.0
    overrides: tuple[tuple[str, object], ...] = ()

    def config(self, profile: Profile) -> FinetuneConfig:
        return replace(profile.finetune, init=self.init, label_fraction=self.fraction, **dict(self.overrides))


def fraction_overrides(cfg: FinetuneConfig, fraction: float) -> tuple[tuple[str, object], ...]:
    """A run on ``fraction`` of the labels for as many epochs over its subset as the full recipe
    over all: its steps, warm-up and validation spacing scale with the fraction."""
    steps = max(1, round(cfg.steps * fraction))
    return (("steps", steps), ("warmup_steps", max(1, min(cfg.warmup_steps, steps // 10))),
            ("eval_every", max(1, min(cfg.eval_every, steps // 6))))


NO_LAYER_DECAY = "no-layer-decay"  # the suffix of the run that checks A's layer-wise LR decay


def study_runs(profile: Profile) -> list[Run]:
    """Every run of the study, A first."""
    cfg = profile.finetune
    runs = [Run("a", "mae"), Run("random", "random")]
    runs += [Run(f"a-seed{seed}", "mae", overrides=(("seed", seed),)) for seed in profile.spread_seeds]
    runs += [Run(f"a-{factor:g}x", "mae", overrides=(("steps", max(1, round(cfg.steps * factor))),))
             for factor in profile.schedule_factors]
    if profile.schedule_factors:  # the recipe's layer decay checked on its shortest schedule
        shortest = next(r for r in runs if r.name == f"a-{min(profile.schedule_factors):g}x")
        runs.append(Run(f"{shortest.name}-{NO_LAYER_DECAY}", "mae",
                        overrides=(*shortest.overrides, ("layer_decay", 1.0))))
    runs += [Run(f"{init}-{fraction:g}", init, fraction, fraction_overrides(cfg, fraction))
             for fraction in sorted(profile.label_fractions) if fraction < 1 for init in ("mae", "random")]
    return runs


def label_runs(profile: Profile) -> list[str]:
    """The names of the label-efficiency curve's runs (all labels: A and its twin)."""
    return ["a", "random"] + [f"{init}-{fraction:g}" for fraction in profile.label_fractions if fraction < 1
                              for init in ("mae", "random")]


def evaluate_finetuned(trained: Finetuned, split: CocoSplit, bootstrap: int = 0,
                       device: str = "auto", samples: bool = False) -> dict:
    """COCO metrics of a fine-tuned detector on a split (``map_ci`` with ``bootstrap`` > 0;
    ``map_samples``, the resampled mAPs for a paired gap, with ``samples``)."""
    model = load_detector(trained).to(resolve_device(device))
    return evaluate_split(torch_runner(model), split, trained.config.detector, model.stride,
                          bootstrap=bootstrap, samples=samples)


def paired_gap(first: list[float], second: list[float], gap: float) -> dict:
    """``gap`` (first's mAP minus second's) with its paired 95 % interval over the same bootstrap
    resamplings of the eval images (:func:`~edgefm.tools.evaluate.gap_interval`): significant when the
    interval leaves out zero. Narrower than the two intervals side by side, and the right test for
    two models scored on one split."""
    low, high = gap_interval(first, second)
    return {"gap": gap, "ci": [low, high], "significant": low > 0 or high < 0}


def _smoothed(values: list[float], window: int = 50) -> list[list[float]]:
    """[[step, mean of the window ending there], ...]: a loss curve a record can carry."""
    return [[end, float(np.mean(values[max(0, end - window):end]))]
            for end in range(window, len(values) + 1, window)] or [[len(values), float(np.mean(values))]]


def run_record(profile: Profile, trained: Finetuned, bootstrap: int = BOOTSTRAP,
               device: str = "auto") -> dict:
    """What the study keeps of a run: the config it was made with (its key), its validation
    curve and smoothed loss, its time and the machine it was recorded on (the one that trained
    it, unless a resumed run moved), and its eval metrics with their interval."""
    key, _ = finetune_key(profile, trained.config, progress=False)
    metrics = evaluate_finetuned(trained, ensure_dataset(profile).eval, bootstrap, device)
    state = trained.state
    return {
        "config": json.loads(json.dumps(plain(key), default=str)),
        "init": trained.config.init, "fraction": trained.config.label_fraction,
        "steps": state.step, "batch_size": trained.config.batch_size,
        "val_curve": [[e["step"], e["map"]] for e in state.evals],
        "loss_curve": _smoothed(state.losses), "seconds": round(state.seconds, 1),
        "machine": machine(), "eval": {k: metrics[k] for k in EVAL_KEYS},
    }


def shipped_records(profile: Profile) -> dict[str, dict]:
    """The study's records shipped in ``weights/feasibility-<profile>/runs.json`` (may be none)."""
    path = weights_root() / f"feasibility-{profile.name}" / "runs.json"
    return json.loads(path.read_text(encoding="utf-8"))["runs"] if path.is_file() else {}


def _run_images(profile: Profile, run: Run) -> int:
    cfg = run.config(profile)
    return (cfg.stop_after or cfg.steps) * cfg.batch_size


def live_runs(profile: Profile) -> list[Run]:
    """What the build always trains itself: the first ``retrace_steps`` of A's schedule with each
    of A's seeds (the start of its curve, re-traced, and an in-build seed spread), and of its
    random twin's (so MAE vs random is also measured live, at that budget)."""
    stop = (("stop_after", profile.retrace_steps),)
    return ([Run(f"retrace-seed{seed}", "mae", overrides=(("seed", seed), *stop))
             for seed in (profile.finetune.seed, *profile.spread_seeds)]
            + [Run("retrace-random", "random", overrides=stop)])


def _record(profile: Profile, run: Run, shipped: dict[str, dict], progress: bool) -> dict | None:
    """A run's record: shipped if one was made with exactly this config, else trained here if
    the profile ships nothing, or the run is A, or it costs no more than a re-trace run; else None
    (a long run not shipped yet: the book says so and how to make it)."""
    cfg = run.config(profile)
    key, _ = finetune_key(profile, cfg, progress)
    wanted = json.loads(json.dumps(plain(key), default=str))
    if run.name in shipped and not config_differences(shipped[run.name]["config"], wanted):
        return {**shipped[run.name], "name": run.name, "shipped": True}
    affordable = _run_images(profile, run) <= profile.retrace_steps * profile.finetune.batch_size
    if profile.shipped and run.name != "a" and not affordable:
        return None
    if run.name in shipped and profile.shipped:
        print(f"note: the shipped record of run {run.name!r} was made with another config; training it here")
    trained = ensure_finetuned(profile, cfg.init, cfg.label_fraction, progress, **dict(run.overrides))
    return {**run_record(profile, trained), "name": run.name, "shipped": trained.shipped}


def _final_val(record: dict) -> float:
    return record["val_curve"][-1][1]


def converged(curve: list[list[float]], spread: float | None, seeds: int) -> dict:
    """The study's rule: a schedule has converged when the val mAP it gained over its last
    quarter is smaller than the seed-to-seed spread of the final val mAP over three seeds.

    ``spread`` is max - min over the ``seeds`` runs there are (None: fewer than two). Another seed
    can only widen max - min, so a spread of two seeds that already exceeds the gain decides
    "converged"; one that does not leaves the rule undecided (None) until the third seed.
    """
    last_step = curve[-1][0]
    quarter = min(curve, key=lambda point: abs(point[0] - 0.75 * last_step))
    gain = curve[-1][1] - quarter[1]
    decided = spread is not None and (seeds >= 3 or gain < spread)
    return {"gain_last_quarter": gain, "from_step": quarter[0], "spread": spread, "seed_runs": seeds,
            "best_val": max(m for _, m in curve), "final_val": curve[-1][1],
            "converged": gain < spread if decided else None}


def convergence_verdict(rule: dict, model: str) -> str:
    """What :func:`converged` decided about ``model``'s schedule, as one sentence for the book."""
    if rule["spread"] is None:
        return ("The seed-to-seed spread of the schedule needs runs of it with other seeds, and none is "
                "available in this build, so the rule cannot decide yet")
    verdict = (f"The final validation mAP of the same schedule with {rule['seed_runs']} seeds spreads over "
               f"{100 * rule['spread']:.1f} points")
    if rule["seed_runs"] >= 3:
        return verdict + f", so by the rule {model} has {'' if rule['converged'] else 'not '}converged"
    if rule["converged"]:  # a third seed can only widen max - min
        return verdict + ("; the rule asks for three, but a third seed can only widen that spread, so by the "
                          f"rule {model} has converged already")
    return verdict + ("; the rule asks for three, and the gain is not below the spread of two, so it cannot "
                      "decide until the third is there")


def _summary(record: dict, *extra: str) -> dict:
    """A run's figures for the metrics file."""
    return {"name": record["name"], "init": record["init"], "fraction": record["fraction"],
            "steps": record["steps"], "shipped": record["shipped"], "val_curve": record["val_curve"],
            "loss_curve": record["loss_curve"], "seconds": record["seconds"],
            "machine": record.get("machine"),  # None in records made before it was kept
            **{k: record["eval"][k] for k in ("map", "map_ci", "map50", *extra)}}


def seed_spread(records: list[dict], value, least: int = 3) -> float | None:
    """max - min of ``value`` over the records, if at least ``least`` seeds are there."""
    values = [float(value(r)) for r in records]
    return max(values) - min(values) if len(values) >= least else None


def feasibility_key(profile: Profile, progress: bool = True) -> dict:
    """What the study's figures depend on: every run's fine-tuning result (its folder's name: recipe,
    data, MAE weights, fine-tuning code version), the dataset it is scored on, whether the profile
    takes runs from ``weights/``, and the content of what is shipped there (the records, A's and
    its twin's weights): new records or weights are a new study."""
    records = weights_root() / f"feasibility-{profile.name}" / "runs.json"
    folders = {init: shipped_folder(profile, init) for init in ("mae", "random")}
    runs = (*study_runs(profile), *live_runs(profile))
    return {"runs": {run.name: stage_dir(profile.name, "finetune", finetune_key(profile, run.config(profile),
                                                                                progress)[0]).name
                     for run in runs},
            "dataset": ensure_dataset(profile).root.name, "shipped": profile.shipped,
            "records": hashlib.sha256(records.read_bytes()).hexdigest() if records.is_file() else None,
            "weights": {init: fingerprint(str(folder)) if (folder / WEIGHTS).is_file() else None
                        for init, folder in folders.items()}}


def ensure_feasibility(profile: Profile | str | None = None, progress: bool = True) -> dict:
    """The study's figures (see the module docstring): computed once per :func:`feasibility_key`,
    written to ``metrics/feasibility.json``."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    return stage(profile.name, "feasibility", feasibility_key(profile, progress),
                 lambda work: _build(profile, progress))


def _build(profile: Profile, progress: bool) -> dict:
    shipped = shipped_records(profile)
    found = {run.name: _record(profile, run, shipped, progress) for run in study_runs(profile)}
    records = {name: r for name, r in found.items() if r is not None}
    eval_split = ensure_dataset(profile).eval
    samples = {}  # A's and the twin's resampled eval mAPs: their gap is judged paired
    for name, init in (("a", "mae"), ("random", "random")):  # shipped weights are checked, not trusted
        if name in records:
            trained = ensure_finetuned(profile, init, 1.0, progress)
            figures = evaluate_finetuned(trained, eval_split, BOOTSTRAP, samples=True)
            samples[name] = figures.pop("map_samples")
            records[name]["eval"] = {k: figures[k] for k in EVAL_KEYS}
    trains_here = replace(profile, shipped=False)
    live = {run.name: _record(trains_here, run, {}, progress) for run in live_runs(profile)}
    a = records["a"]
    seeds = [r for name, r in records.items() if name == "a" or name.startswith("a-seed")]
    seed_names = [name for name in live if name.startswith("retrace-seed")]
    eval_spread = seed_spread(seeds, lambda r: r["eval"]["map"])
    metrics = {
        "a": _summary(a, *EVAL_KEYS[3:]),
        "random": _summary(records["random"]) if "random" in records else None,
        "recipe": asdict(profile.finetune),
        "params": sum(p.numel() for p in load_detector(ensure_finetuned(profile, "mae", 1.0)).parameters()),
        "seeds": [_summary(r) for r in seeds],
        "seed_spread": None if eval_spread is None else 100 * eval_spread,
        "convergence": converged(a["val_curve"], seed_spread(seeds, _final_val, least=2), len(seeds)),
        "schedules": sorted((_summary(r) for name, r in records.items()
                             if name == "a" or name.endswith("x")), key=lambda r: r["steps"]),
        "label_efficiency": sorted((_summary(records[n]) for n in label_runs(profile) if n in records),
                                   key=lambda r: (r["fraction"], r["init"])),
        "retrace": {
            "steps": profile.retrace_steps, "seeds": [_summary(live[name]) for name in seed_names],
            "random": _summary(live["retrace-random"]),
            "seed_spread": 100 * seed_spread([live[n] for n in seed_names], lambda r: r["eval"]["map"]),
            "mae_vs_random": interval_gap(live[seed_names[0]]["eval"], live["retrace-random"]["eval"]),
            "shipped": a["shipped"],
            "a_val_curve": [p for p in a["val_curve"] if p[0] <= profile.retrace_steps],
            "a_loss_curve": [p for p in a["loss_curve"] if p[0] <= profile.retrace_steps],
        },
        "missing": [{"name": name, "command": f"edgefm --profile {profile.name} long-runs --only {name}"}
                    for name, r in found.items() if r is None],
    }
    metrics["converged"] = metrics["convergence"]["converged"]
    metrics["layer_decay"] = layer_decay_check(records, profile.finetune.layer_decay)
    metrics["mae_vs_random"] = mae_vs_random(metrics["label_efficiency"])
    metrics["mae_vs_random_paired"] = (paired_gap(samples["a"], samples["random"], a["eval"]["map"]
                                                  - records["random"]["eval"]["map"])
                                       if "random" in samples else None)
    return metrics


def layer_decay_check(records: dict[str, dict], decay: float) -> dict | None:
    """A's recipe (layer decay ``decay``) against the same schedule without layer decay, on the
    shortest schedule: does the lower learning rate of the early blocks, which protects what MAE
    pretraining learned, cost accuracy? One seed each, so the val gap is read against the seed
    spread and the eval gap against the intervals. None until both runs are there."""
    without = next((name for name in records if name.endswith(NO_LAYER_DECAY)), None)
    with_decay = without and without.removesuffix(f"-{NO_LAYER_DECAY}")
    if without is None or with_decay not in records:
        return None
    first, second = records[without], records[with_decay]
    return {"layer_decay": decay, "steps": first["steps"], "with": _summary(second),
            "without": _summary(first), "val_gap": _final_val(first) - _final_val(second),
            "eval_gap": interval_gap(first["eval"], second["eval"])}


def mae_vs_random(curve: list[dict]) -> list[dict]:
    """At each label fraction with both runs, MAE init's mAP minus random init's, judged against
    the intervals."""
    by = {(p["fraction"], p["init"]): p for p in curve}
    return [{"fraction": f, **interval_gap(by[(f, "mae")], by[(f, "random")])}
            for f in sorted({p["fraction"] for p in curve}) if (f, "mae") in by and (f, "random") in by]


def gap_verdict(gap: dict, first: str, second: str) -> str:
    """A verdict on ``first`` minus ``second`` (:func:`~edgefm.tools.evaluate.interval_gap`) in words."""
    if not gap["significant"]:
        return f"{first} and {second} are level: the gap is within the intervals"
    return f"{first} beats {second}" if gap["gap"] > 0 else f"{second} beats {first}"


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def pretraining_summary(metrics: dict) -> dict:
    """What MAE pretraining bought in this study, in the words every chapter uses: the verdict with
    all the labels at the end of A's schedule and over its re-traced start (a head start is not a
    better end point), and at each smaller fraction with how far the better detector got there, so
    that a gain where neither finds much is read as such. With all the labels, A and its twin were
    scored on the same eval images here, so their gap is judged by its paired interval; the
    intervals side by side (all a record allows at the other fractions) are shown too. ``paid``:
    the MAE encoder beat the random one with all the labels (None when the twin is missing)."""
    def judged(gap: dict) -> str:
        return (f"{gap_verdict(gap, 'the MAE encoder', 'a random encoder')} ({100 * gap['gap']:+.1f} points "
                f"of mAP, against a margin of {100 * gap['margin']:.1f})")

    gaps = {g["fraction"]: g for g in metrics["mae_vs_random"]}
    full, start = gaps.pop(1.0, None), metrics["retrace"]["mae_vs_random"]
    paired = metrics.get("mae_vs_random_paired")
    early = f"over the first {metrics['retrace']['steps']:,d} steps of A's schedule, {judged(start)}"
    if full is None:
        text = f"With all the labels, {early}; the twin's whole schedule is not in this build"
    else:
        end = full
        if paired is not None:
            end = paired
            low, high = (100 * v for v in paired["ci"])
            verdict = gap_verdict(paired, "the MAE encoder", "a random encoder").replace(
                "the gap is within the intervals", "the paired interval holds zero")
            margin = 100 * full["margin"]
            if full["significant"] == paired["significant"]:
                aside = f"side by side, the two intervals agree, with a margin of {margin:.1f}"
            elif paired["significant"]:
                aside = f"side by side, the gap is within the two intervals' margin of {margin:.1f}"
            else:
                aside = f"side by side, the gap exceeds their margin of {margin:.1f}"
            text = (f"With all the labels at the end of A's schedule, {verdict} ({100 * paired['gap']:+.1f} "
                    f"points of mAP, paired 95 % interval {low:+.1f} to {high:+.1f}; {aside}); {early}")
        else:
            text = f"With all the labels at the end of A's schedule, {judged(full)}; {early}"
        if start["significant"] and start["gap"] > 0 and not (end["significant"] and end["gap"] > 0):
            text += (": pretraining gave a head start and a worse end point" if end["significant"]
                     else ": pretraining gave a head start, not a better end point")
    if gaps:
        outcomes = {"mae": [], "level": [], "random": []}
        for fraction, g in sorted(gaps.items()):
            side = "level" if not g["significant"] else "mae" if g["gap"] > 0 else "random"
            outcomes[side].append(f"{100 * fraction:g} % ({100 * g['gap']:+.1f})")
        said = {"mae": "the MAE encoder beats a random encoder at", "level": "the two are level at",
                "random": "a random encoder beats the MAE one at"}
        best = max(p["map"] for p in metrics["label_efficiency"] if p["fraction"] in gaps)
        text += (". With fewer labels, judged by the intervals side by side, "
                 + "; ".join(f"{said[side]} {_listed(at)}" for side, at in outcomes.items() if at)
                 + f", where the better detector reaches at most {best:.3f} mAP")
    paid = None if full is None else bool(end["significant"] and end["gap"] > 0)
    return {"paid": paid, "text": text + "."}


def run_long_runs(profile: Profile, out: Path | None = None, device: str = "auto", parallel: int = 1,
                  workers: int | None = None, only: list[str] | None = None) -> Iterator[str]:
    """Train the study's runs with ``edgefm train`` in ``parallel`` processes (longest first) and
    ship them under ``out`` (default: ``weights/``): A and its twin as weights, every run's record
    in ``feasibility-<profile>/runs.json`` (merged with the records already there). Yields one
    line per event, for the command line."""
    out = out or weights_root()
    runs = [r for r in study_runs(profile) if only is None or r.name in only]
    unknown = set(only or ()) - {r.name for r in study_runs(profile)}
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)}; the study's runs: "
                         f"{', '.join(r.name for r in study_runs(profile))}")
    work = artifacts_root() / profile.name / "long-runs"
    work.mkdir(parents=True, exist_ok=True)
    ensure_dataset(profile)  # what every run needs, made once here rather than raced for by each
    finetune_key(profile, runs[0].config(profile), progress=False)
    queue = sorted(runs, key=lambda r: -r.config(profile).steps * r.config(profile).batch_size)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed = []
    while queue or running:
        while queue and len(running) < parallel:
            run = queue.pop(0)
            command = _train_command(profile, run, work, out, device, workers)
            log = open(work / f"{run.name}.log", "w")  # noqa: SIM115 (closed with the process)
            running[run.name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), time.time())
            yield f"started {run.name}: {' '.join(command[2:])}"
        time.sleep(2)
        for name, (process, started) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                failed += [name] if process.returncode else []
                yield f"{status} {name} in {time.time() - started:.0f} s (log: {work / (name + '.log')})"
    records_path = out / f"feasibility-{profile.name}" / "runs.json"
    records = json.loads(records_path.read_text(encoding="utf-8"))["runs"] if records_path.is_file() else {}
    for run in runs:
        if (work / f"{run.name}.json").is_file():
            records[run.name] = json.loads((work / f"{run.name}.json").read_text(encoding="utf-8"))
    command = f"edgefm --profile {profile.name} long-runs"  # each run: long-runs --only NAME
    atomic_write_json(records_path, {"command": command, "runs": records})
    yield f"records: {records_path}" + (f"; failed: {', '.join(failed)}" if failed else "")


def _train_command(profile: Profile, run: Run, work: Path, out: Path, device: str,
                   workers: int | None) -> list[str]:
    command = [sys.executable, "-m", "edgefm.cli", "--profile", profile.name, "train", "--init", run.init,
               "--fraction", str(run.fraction), "--device", device,
               "--record", str(work / f"{run.name}.json")]
    command += [arg for key, value in run.overrides for arg in ("--set", f"{key}={value}")]
    if workers is not None:
        command += ["--workers", str(workers)]
    if run.name in ("a", "random"):
        command += ["--export", str(out / shipped_folder(profile, run.init).name)]
    return command
