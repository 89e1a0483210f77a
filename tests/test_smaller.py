"""Model B's study: the search on its own, then the whole stage in the smoke profile."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import forbid_training_and_scoring
from edgefm.artifacts import artifacts_root
from edgefm.config import MODES, SearchConfig, StudentConfig, load_profile
from edgefm.stages import smaller
from edgefm.stages.finetune import WEIGHTS_ENV
from edgefm.stages.smaller import (
    ensure_smaller,
    load_b,
    paired_gap,
    search_storage,
    shipped_study,
    study_name,
)
from edgefm.tools.search import choose, from_params, run_search, trial_records

FIELDS = ("name", "format", "map", "map50", "latency_ms_1t", "latency_ms_2t", "latency_p90_ms_2t",
          "size_bytes", "params", "flops", "latency_speedup_2t", "size_reduction", "map_drop")


def test_the_search_starts_from_its_start_point_and_resumes_without_repeating(tmp_path):
    settings = SearchConfig(trials=3, depths=(1, 2, 3), widths=(0.25, 0.5), image_sizes=(48, 64))
    start = StudentConfig("start", depth=2, width=0.5)
    seen = []

    def objective(spec, number):
        seen.append(spec)
        return 0.1 * spec.depth - spec.width / 10, spec.depth / 3 * (spec.image_size / 64) ** 2

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = run_search(objective, settings, start, 64, storage)
    assert len(seen) == 3 and (seen[0].depth, seen[0].width, seen[0].image_size) == (2, 0.5, 64)
    records = trial_records(study)
    assert len(records) == 3 and any(r["pareto"] for r in records)
    run_search(objective, settings, start, 64, storage)  # finished: nothing runs again
    assert len(seen) == 3
    fastest = min(records, key=lambda r: r["latency_fraction"])
    assert choose(records, budget=0.0) == fastest  # nothing fits: the fastest, to show the gap
    fitting = [r for r in records if r["latency_fraction"] <= 0.7]
    if fitting:
        assert choose(records, 0.7)["map"] == max(r["map"] for r in fitting)


def test_smaller_study_in_smoke_makes_b_and_measures_every_candidate(fashion_dir, tmp_path, monkeypatch):
    results = ensure_smaller("smoke", progress=False)
    settings = load_profile("smoke").smaller
    records = results["bench"]["variants"]
    names = [r["name"] for r in records]
    students = (*settings.students, *settings.long_students)
    arms = [f"{settings.arm.name}, {mode}" for mode in MODES]
    steps = settings.compare_compute.steps
    expected = ["A (PyTorch FP32)", "A pruned 0.5", *arms, f"{settings.arm.name}, labels, {steps} steps",
                "A continued", *(s.name for s in students), "B", f"A continued, {settings.final.steps} steps"]
    assert names == expected
    assert results["distillation_pairs"] == [[s.name, s.name.replace("distilled", "labels only")]
                                             for s in students if s.distill]
    # every arm ran with every seed, at its budget
    assert set(results["arms"]) == {*MODES, "labels, equal compute", smaller.CONTROL}
    for arm, runs in results["arms"].items():
        assert [r["seed"] for r in runs] == list(settings.seeds), arm
        budget = steps if arm == "labels, equal compute" else settings.compare.steps
        assert {r["steps"] for r in runs} == {budget}
    verdicts = results["arm_verdicts"]
    assert {"distill vs labels", "pool vs labels", "labels vs control", "control vs A"} <= set(verdicts)
    assert all(v["seeds"] == len(settings.seeds) for v in verdicts.values())
    assert results["pool"]["images"] == settings.pool_images and 0.1 <= results["pool"]["threshold"] < 0.95
    assert results["b_training"]["steps"] == results["final_control"]["steps"] == settings.final.steps
    # B ran with every final seed, each with a val curve ending at its final val mAP; the rule judged
    b_runs = results["b_training"]["seeds"]
    assert [r["seed"] for r in b_runs] == list(settings.final_seeds)
    steps_scored = list(range(settings.final.eval_every, settings.final.steps + 1, settings.final.eval_every))
    for run in b_runs:
        assert [step for step, _ in run["val_curve"]] == steps_scored
        assert run["val_curve"][-1][1] == pytest.approx(run["val_map"])
    convergence = results["b_training"]["convergence"]
    finals = [r["val_map"] for r in b_runs]
    assert convergence["spread"] == pytest.approx(max(finals) - min(finals))
    assert convergence["seed_runs"] == len(settings.final_seeds)
    # the same seeds on a longer schedule, each against its own seed at B's budget
    longer = results["b_training"]["longer"]
    assert longer["steps"] == round(settings.final.steps * settings.longer_factor) > settings.final.steps
    assert [r["seed"] for r in longer["seeds"]] == list(settings.final_seeds)
    assert longer["seeds"][0]["val_curve"][-1][0] == longer["steps"]
    gaps = [r["val_map"] - s["val_map"] for r, s in zip(longer["seeds"], b_runs, strict=True)]
    assert longer["against_final"]["gap"] == pytest.approx(np.mean(gaps))
    assert longer["against_final"]["seeds"] == len(settings.final_seeds)
    # the other students ran with every seed too; each distilled one is judged against its twin
    assert all([r["seed"] for r in s["seeds"]] == list(settings.seeds) for s in results["students"])
    assert set(results["student_verdicts"]) == {f"{d} vs {t}" for d, t in results["distillation_pairs"]}
    assert all(v["seeds"] == len(settings.seeds) for v in results["student_verdicts"].values())
    # the two questions in one place: every control with its seeds, every distilled student vs its twin
    short, final = results["controls"]
    assert short["seeds"] == results["arms"][smaller.CONTROL] and len(short["seeds"]) == len(settings.seeds)
    assert short["name"] in names and final["name"] in names  # each a benchmarked model
    assert set(short["students"]) == {*MODES, "labels, equal compute", "A pruned 0.5"}
    assert short["students"]["distill"] == verdicts["distill vs control"]
    assert final["seeds"] == results["final_control"]["seeds"]
    assert [c["seed"] for c in final["seeds"]] == list(settings.control_seeds)  # B's seed first
    assert final["seeds"][0]["val_map"] == results["final_control"]["val_map"]
    # B against its control seed by seed: each B run paired with the control of its seed
    b_runs = {r["seed"]: r for r in b_runs}
    for split, gaps in (("val", final["students"]["B"]), ("eval", final["eval_students"]["B"])):
        assert gaps == results["final_control"]["b_vs_control"][split]
        assert gaps["seeds"] == len(settings.control_seeds) and gaps["gap"] == pytest.approx(np.mean(
            [b_runs[c["seed"]][f"{split}_map"] - c[f"{split}_map"] for c in final["seeds"]]))
    # the first seeds of B and its control are also judged by a paired interval over the eval images
    bench = {r["name"]: r for r in records}
    pairs = {"control vs A": (final["name"], "A (PyTorch FP32)"), "B vs control": ("B", final["name"])}
    assert final["eval_gaps"] == results["final_control"]["eval_gaps"]
    assert set(final["eval_gaps"]) == set(pairs)
    for label, (first, second) in pairs.items():
        gap = final["eval_gaps"][label]
        assert gap["gap"] == pytest.approx(bench[first]["map"] - bench[second]["map"])
        low, high = gap["gap_ci"]
        assert low <= high and gap["verdict"] == ("higher" if low > 0 else "lower" if high < 0
                                                  else "no difference shown")
    distillation = {d["student"]: d for d in results["distillation"]}
    assert set(distillation) == ({f"{settings.arm.name}, {m}" for m in MODES if m != "labels"}
                                 | {d for d, _ in results["distillation_pairs"]})
    assert all(len(d["seeds"]) == len(settings.seeds) for d in distillation.values())
    assert distillation[f"{settings.arm.name}, pool"]["paired_gap"] == verdicts["pool vs labels"]
    assert results["b_mode"] in MODES  # the search chose how B learns
    assert all("mode" in t for t in results["trials"])
    for record in records:
        assert all(record[f] is not None for f in FIELDS), record["name"]
    assert len(results["trials"]) == 2
    assert results["chosen_trial"] in {t["number"] for t in results["trials"]}
    assert results["pruning"][0]["ratio"] == 0.5 and "val_map_before" in results["pruning"][0]
    assert records[-2]["params"] < records[0]["params"]  # B, smaller than A
    again = ensure_smaller("smoke", progress=False)  # built: the second call loads it
    assert again["folder"] == results["folder"] and again["chosen_trial"] == results["chosen_trial"]
    _a_new_bench_config_re_times_and_does_nothing_else(results)
    b = load_b("smoke")
    heat, boxes = b(torch.rand(1, 3, 64, 64))
    assert heat.shape[1] == 10 and boxes.shape[1] == 4

    # B, its control and the long students, the runs too long for a build, ship; a build reads
    # them instead of training them, and trains their first steps again to check them
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))
    profile = load_profile("smoke")
    shipped = smaller.ship_final(profile)
    settings = profile.smaller
    b_runs = 2 * len(settings.final_seeds)  # B's budget and the longer one
    long_runs = len(settings.control_seeds) + len(settings.long_students) * len(settings.seeds)
    assert len(shipped) == b_runs + long_runs
    assert all((p / "model.safetensors").is_file() for p in shipped)
    assert not any((p / "checkpoint.pt").exists() for p in shipped)
    assert json.loads((shipped[0] / "made_by.json").read_text())["command"] == smaller.SHIP_COMMAND.format(
        profile="smoke")
    found = smaller.Candidates(profile, progress=False, check_shipped=True)
    b_spec, long_spec = smaller.student_config(results["b_config"]), profile.smaller.long_students[0]
    for spec, training in ((b_spec, profile.smaller.final), (long_spec, profile.smaller.long)):
        shutil.rmtree(found.folder(spec, training))  # only the shipped copy is left
    loader = smaller.Candidates(profile, progress=False)
    loader.trained(b_spec, profile.smaller.final)
    assert loader.retraces == {}  # loading B alone (load_b) checks nothing
    model, _ = found.trained(b_spec, profile.smaller.final)
    found.trained(b_spec, profile.smaller.final)  # asked again: checked once
    found.trained(long_spec, profile.smaller.long)
    assert found.shipped == [b_spec.name, long_spec.name]
    for retraced, training in zip(found.retraces.values(), (profile.smaller.final, profile.smaller.long),
                                  strict=True):  # same seed, same batches: the same losses
        assert retraced["steps"] == min(smaller.RETRACE_STEPS, training.steps)
        assert retraced["max_loss_gap"] < 1e-3
    assert torch.equal(model.state_dict()["head.box.0.weight"], b.state_dict()["head.box.0.weight"])


def test_a_gap_is_a_verdict_only_when_every_seed_agrees():
    assert paired_gap([0.3, 0.32, 0.31], [0.29, 0.30, 0.30])["verdict"] == "higher in every seed"
    assert paired_gap([0.28, 0.29, 0.29], [0.29, 0.30, 0.30])["verdict"] == "lower in every seed"
    mixed = paired_gap([0.31, 0.29, 0.30], [0.30, 0.30, 0.30])
    assert mixed["verdict"] == "within the seed spread" and mixed["range"] == pytest.approx([-0.01, 0.01])
    assert paired_gap([0.3], [0.2])["verdict"] == "one seed: no verdict"


def test_the_search_chooses_how_a_student_learns(tmp_path):
    settings = SearchConfig(trials=4, depths=(1,), widths=(0.5,), heads=(0.0,), image_sizes=(64,))
    start = StudentConfig("start", depth=1, width=0.5)  # distilled, with the default weights
    seen, score = [], {"labels": 0.1, "distill": 0.2, "pool": 0.3}

    def objective(spec, number):
        seen.append(spec)
        return score[spec.mode], 0.5

    study = run_search(objective, settings, start, 64, f"sqlite:///{tmp_path / 'study.db'}")
    assert seen[0].mode == "distill" and seen[0].distill == start.distill
    for spec in seen:
        assert (spec.distill is not None) == (spec.mode == "distill") and spec.pool == (spec.mode == "pool")
    records = trial_records(study)
    best = choose(records, 1.0)
    assert from_params(start, best, "B").mode == best["mode"] == max((s.mode for s in seen), key=score.get)


def test_a_shipped_study_seeds_the_stage_storage(tmp_path, monkeypatch):
    profile = load_profile("smoke")
    assert shipped_study(profile).name == "model-b-smoke.db"
    assert study_name(profile, "a1") != study_name(profile, "a2")  # another A: another search
    shipped = tmp_path / "shipped.db"
    monkeypatch.setattr(smaller, "shipped_study", lambda _: shipped)
    local = artifacts_root() / "smoke" / "search" / "model-b.db"
    assert search_storage(profile) == f"sqlite:///{local.resolve()}"
    assert not local.exists()  # nothing shipped: optuna starts an empty one
    shipped.write_bytes(b"a finished study")
    search_storage(profile)
    assert local.read_bytes() == b"a finished study"
    other = replace(profile, smaller=replace(profile.smaller, search=replace(profile.smaller.search,
                                                                             storage="postgresql://db/edgefm")))
    assert search_storage(other) == "postgresql://db/edgefm"


def _a_new_bench_config_re_times_and_does_nothing_else(results: dict) -> None:
    """Timing the candidates differently (another BenchConfig) starts a new search, whose trials
    find their students trained and scored: nothing is trained or scored again. The smoke search's
    trials are all startup trials, drawn whatever the timings, and B is held to the trial chosen
    before: new timings may choose another one (or, in a longer search, draw other trials), which
    then trains."""
    profile = load_profile("smoke")
    bench = replace(profile.smaller.bench, runs=profile.smaller.bench.runs + 1)
    with pytest.MonkeyPatch.context() as patch:
        forbid_training_and_scoring(patch)
        patch.setattr(smaller, "choose", lambda trials, budget: next(
            t for t in trials if t["number"] == results["chosen_trial"]))
        timed_again = replace(profile, smaller=replace(profile.smaller, bench=bench))
        again = ensure_smaller(timed_again, progress=False)
    assert again["folder"] != results["folder"] and again["bench"]["settings"]["runs"] == bench.runs
    assert again["trials_run"] == len(results["trials"]) and again["b_config"] == results["b_config"]
    assert [r["map"] for r in again["bench"]["variants"]] == [r["map"] for r in results["bench"]["variants"]]
    assert again["arms"] == results["arms"] and again["pruning"] == results["pruning"]
