"""The smaller-model study: model B, found by pruning, distillation and search, measured against A.

Every candidate is a :class:`~edgefm.config.StudentConfig` built from A
(:func:`~edgefm.compress.students.build_student`) and trained with
:func:`~edgefm.compress.distill.train_student`:

1. **pruning curves**: A with ``ratio`` of its heads and MLP channels removed, scored before and
   after a fine-tune at the comparison budget;
2. **students**: the configured ViT and mobile students, each with and without distillation, at
   the same budget (the comparison's, or a longer one for students that start from further away);
3. **search**: :func:`~edgefm.compress.search.run_search` over ViT students, on val mAP and
   latency as a fraction of A's;
4. **B**: the most accurate trial within the latency budget, trained again on the labels alone
   for the final budget (at equal compute the labels beat distillation: see the students).

Every trained model is kept (safetensors) under ``artifacts/<profile>/students/``, keyed by what
made it, so a killed build continues where it stopped and another study reuses it; one
:func:`~edgefm.bench.benchmark` run measures A and all of them on the eval scenes;
``metrics/smaller.json`` holds the records, the curves, the trials and the chosen B.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from safetensors.torch import load_file, save_file

from edgefm.artifacts import (
    artifacts_root,
    atomic_path,
    atomic_write_json,
    config_hash,
    ensure_dir,
    plain,
    project_root,
    stage_dir,
    write_metrics,
)
from edgefm.bench import benchmark, latencies, module_variant
from edgefm.compress.distill import train_student
from edgefm.compress.search import choose, from_params, run_search, trial_records
from edgefm.compress.students import build_student
from edgefm.config import DistillWeights, Profile, StudentConfig, StudentTraining, load_profile
from edgefm.data import ensure_dataset
from edgefm.data.coco import CocoDetection
from edgefm.data.transforms import detection_transforms
from edgefm.evaluate import evaluate_split
from edgefm.finetune import ensure_finetuned, load_detector, torch_runner
from edgefm.models.detector import Detector
from edgefm.training import TrainState

WEIGHTS = "model.safetensors"


def pruned(ratio: float) -> StudentConfig:
    """A with ``ratio`` of every block's heads and MLP channels removed, fine-tuned on the labels
    (a student cut from A gained nothing from distillation, see :mod:`edgefm.smaller`'s students)."""
    return StudentConfig(f"A pruned {ratio:g}", width=ratio, heads=ratio, scope="blocks", distill=None)


class Candidates:
    """Builds, trains (once) and loads the candidates of a study, all from the same teacher."""

    def __init__(self, profile: Profile, progress: bool):
        trained = ensure_finetuned(profile, progress=progress)
        self.teacher, self.detector, self.backbone = (load_detector(trained), trained.config.detector,
                                                      trained.backbone)
        self.dataset = ensure_dataset(profile)
        transforms = detection_transforms(self.detector.image_size, train=True)
        self.train = CocoDetection(self.dataset.train, transforms)
        self.mae_source = None
        if any(s.init == "mae" for s in (*profile.smaller.students, *profile.smaller.long_students)):
            from edgefm.pretrain import ensure_pretrained

            self.mae_source = ensure_pretrained(profile, progress=progress).source
        self.profile, self.progress, self.model_a = profile, progress, trained.identity

    def build(self, spec: StudentConfig) -> Detector:
        return build_student(spec, self.teacher, self.detector, self.backbone, self.mae_source)

    def folder(self, spec: StudentConfig, training: StudentTraining) -> Path:
        """Where a candidate's weights live: keyed by what makes it (not its name) and by the
        code that trains it, so every study, trial and rebuild that asks for it shares one run."""
        key = {"student": replace(spec, name=""), "training": training, "model_a": self.model_a,
               "data": self.profile.data}
        return stage_dir(self.profile.name, "students", key)

    def trained(self, spec: StudentConfig, training: StudentTraining) -> tuple[Detector, TrainState]:
        """The candidate after ``training``, trained now unless an earlier run left it."""

        def build(work: Path) -> None:
            model = self.build(spec)
            state = train_student(model, self.teacher, spec.distill, self.train, training, work, spec.seed,
                                  self.progress, desc=spec.name)
            with atomic_path(work / WEIGHTS) as tmp:
                save_file(model.state_dict(), str(tmp))
            atomic_write_json(work / "train_state.json", asdict(state))
            (work / "checkpoint.pt").unlink(missing_ok=True)

        target = ensure_dir(self.folder(spec, training), build,
                            config={"student": spec, "training": training})
        model = self.build(spec)
        model.load_state_dict(load_file(str(target / WEIGHTS)))
        state = TrainState(**json.loads((target / "train_state.json").read_text(encoding="utf-8")))
        return model.eval(), state

    def val_map(self, model: Detector) -> float:
        return evaluate_split(torch_runner(model), self.dataset.val, self.detector, model.stride)["map"]


def distillation_pairs(specs: tuple[StudentConfig, ...]) -> list[list[str]]:
    """``[distilled, labels only]`` names of the students in ``specs`` that differ only in
    whether they are distilled: the comparisons the chapter reports."""
    def without_distillation(spec: StudentConfig) -> StudentConfig:
        return replace(spec, name="", distill=None)

    return [[s.name, t.name] for s in specs if s.distill for t in specs
            if t.distill is None and without_distillation(t) == without_distillation(s)]


def study_name(profile: Profile, model_a: str) -> str:
    """The search's name in its storage: trials are shared only by searches of the same A, the
    same choices, the same comparison budget and the same way of timing them."""
    settings = profile.smaller
    key = config_hash({"search": settings.search, "start": settings.search_start, "compare": settings.compare,
                       "model_a": model_a, "data": profile.data, "timing": settings.bench,
                       "timed_runs": settings.search_runs})
    return f"model-b-{profile.name}-{key[:12]}"


def shipped_study(profile: Profile) -> Path:
    """Where the book keeps a finished search for a profile (an optuna SQLite file)."""
    return project_root() / "studies" / f"model-b-{profile.name}.db"


def search_storage(profile: Profile) -> str:
    """The profile's storage URL if it names one; else ``artifacts/<profile>/search/model-b.db``,
    started from the shipped study when there is one, so a build reuses its finished trials."""
    if profile.smaller.search.storage:
        return profile.smaller.search.storage
    local = artifacts_root() / profile.name / "search" / "model-b.db"
    local.parent.mkdir(parents=True, exist_ok=True)
    if not local.exists() and shipped_study(profile).is_file():
        shutil.copyfile(shipped_study(profile), local)
    return f"sqlite:///{local.resolve()}"


def _build(work: Path, profile: Profile, progress: bool) -> None:
    settings = profile.smaller
    found = Candidates(profile, progress)
    size = found.detector.image_size
    model_a = module_variant(found.teacher, size)
    results: dict = {"model_a": found.model_a, "a_val_map": found.val_map(found.teacher)}

    curve, models = [], {}
    for ratio in settings.pruning_ratios:
        spec = pruned(ratio)
        before = found.build(spec)
        after, state = found.trained(spec, settings.compare)
        models[spec.name] = after
        curve.append({"ratio": ratio, "name": spec.name, "val_map_before": found.val_map(before),
                      "val_map_after": found.val_map(after), "train_seconds": state.seconds})
    results["pruning"] = curve

    students = []

    def student(spec: StudentConfig, training: StudentTraining) -> None:
        model, state = found.trained(spec, training)
        models[spec.name] = model
        students.append({"name": spec.name, "config": plain(spec), "steps": training.steps,
                         "val_map": found.val_map(model), "train_seconds": state.seconds})

    for training, specs in ((settings.compare, settings.students), (settings.long, settings.long_students)):
        for spec in specs:
            student(spec, training)
    # each labels-only long student again, for about as long as its distilled twin took
    equal_compute = []
    for distilled, labels_only in distillation_pairs(settings.long_students):
        spec = next(s for s in settings.long_students if s.name == labels_only)
        spec = replace(spec, name=f"{labels_only}, {settings.long_compute.steps:,d} steps")
        student(spec, settings.long_compute)
        equal_compute.append([distilled, spec.name])
    results.update(students=students, equal_compute_pairs=equal_compute,
                   distillation_pairs=distillation_pairs(settings.students)
                   + distillation_pairs(settings.long_students))

    ran: list[int] = []

    def objective(spec: StudentConfig, number: int) -> tuple[float, float]:
        ran.append(number)
        model, _ = found.trained(spec, settings.compare)
        timing = latencies([model_a, module_variant(model, size, spec.name)], size, 2,
                           replace(settings.bench, runs=settings.search_runs))
        return found.val_map(model), timing[spec.name]["median_ms"] / timing[model_a.name]["median_ms"]

    search = settings.search
    study = run_search(objective, search, settings.search_start, size, search_storage(profile),
                       name=study_name(profile, found.model_a))
    trials = trial_records(study)
    chosen = choose(trials, search.latency_budget)
    b_spec = replace(from_params(settings.search_start, chosen, "B"), distill=None)
    model, state = found.trained(b_spec, settings.final)
    models["B"] = model
    results.update(trials=trials, chosen_trial=chosen["number"], b_config=plain(b_spec),
                   b_training={"steps": settings.final.steps, "train_seconds": state.seconds,
                               "val_map": found.val_map(model)},
                   latency_budget=search.latency_budget,  # a given URL may hold a password: not kept
                   storage="a given URL" if search.storage else f"artifacts/{profile.name}/search/model-b.db",
                   trials_run=len(ran))

    variants = [model_a] + [module_variant(m, size, name) for name, m in models.items()]
    split = found.dataset.eval
    results["bench"] = benchmark(
        variants, size, settings.bench,
        lambda v: evaluate_split(v.runner(2), split, found.detector, v.module.stride))
    atomic_write_json(work / "results.json", results)


def ensure_smaller(profile: Profile | str | None = None, progress: bool = True) -> dict:
    """Build (or load) the study and model B; write ``metrics/smaller.json``."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    trained = ensure_finetuned(profile, progress=progress)
    key = {"smaller": profile.smaller, "model_a": trained.identity, "data": profile.data}
    target = stage_dir(profile.name, "smaller", key)
    ensure_dir(target, lambda work: _build(work, profile, progress), config=key)
    results = json.loads((target / "results.json").read_text(encoding="utf-8"))
    records = results["bench"]["variants"]
    metrics = {**results, "variants": records, "b": "B",
               "b_record": next(r for r in records if r["name"] == "B"), "folder": str(target)}
    write_metrics(profile.name, "smaller", metrics)
    return metrics


def load_b(profile: Profile | str | None = None) -> Detector:
    """Model B (its study is built first if needed)."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    results = ensure_smaller(profile, progress=False)
    found = Candidates(profile, progress=False)
    config = results["b_config"]
    spec = StudentConfig(**{**config, "distill": config["distill"] and DistillWeights(**config["distill"])})
    model, _ = found.trained(spec, profile.smaller.final)
    return model
