"""Model B's study: the search on its own, then the whole stage in the smoke profile."""

from dataclasses import replace

import torch

from edgefm import smaller
from edgefm.artifacts import artifacts_root
from edgefm.compress.search import choose, run_search, trial_records
from edgefm.config import SearchConfig, StudentConfig, load_profile
from edgefm.smaller import ensure_smaller, load_b, search_storage, shipped_study, study_name

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


def test_smaller_study_in_smoke_makes_b_and_measures_every_candidate(fashion_dir):
    results = ensure_smaller("smoke", progress=False)
    settings = load_profile("smoke").smaller
    names = [r["name"] for r in results["variants"]]
    students = (*settings.students, *settings.long_students)
    again_longer = [f"{s.name}, {settings.long_compute.steps:,d} steps" for s in settings.long_students
                    if s.distill is None]
    expected = ["A (PyTorch FP32)", "A pruned 0.5", *(s.name for s in students), *again_longer, "B"]
    assert names == expected
    assert results["distillation_pairs"] == [[s.name, s.name.replace("distilled", "labels only")]
                                             for s in students if s.distill]
    assert [pair[1] for pair in results["equal_compute_pairs"]] == again_longer
    steps = {s["name"]: s["steps"] for s in results["students"]}
    assert {steps[s.name] for s in settings.long_students} == {settings.long.steps}
    assert {steps[name] for name in again_longer} == {settings.long_compute.steps}
    assert results["b_training"]["steps"] == settings.final.steps
    assert results["b_config"]["distill"] is None  # B learns from the labels alone
    for record in results["variants"]:
        assert all(record[f] is not None for f in FIELDS), record["name"]
    assert len(results["trials"]) == 2 and results["b_record"]["name"] == "B"
    assert results["chosen_trial"] in {t["number"] for t in results["trials"]}
    assert results["pruning"][0]["ratio"] == 0.5 and "val_map_before" in results["pruning"][0]
    assert results["b_record"]["params"] < results["variants"][0]["params"]
    again = ensure_smaller("smoke", progress=False)  # built: the second call loads it
    assert again["folder"] == results["folder"] and again["chosen_trial"] == results["chosen_trial"]
    b = load_b("smoke")
    heat, boxes = b(torch.rand(1, 3, 64, 64))
    assert heat.shape[1] == 10 and boxes.shape[1] == 4


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
