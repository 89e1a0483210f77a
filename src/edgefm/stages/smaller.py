"""The smaller-model study: model B, found by pruning, distillation and search, measured against A.

Every candidate is a :class:`~edgefm.config.StudentConfig` built from A
(:func:`~edgefm.tools.students.build_student`) and trained with
:func:`~edgefm.tools.distill.train_student`:

1. **pruning curves**: A with ``ratio`` of its heads and MLP channels removed, scored before and
   after a fine-tune at the comparison budget;
2. **training modes**: one ViT student cut from A trained on the labels alone, distilled from A
   online, and on the labels plus A's pseudo-labels on the unlabelled pool
   (:mod:`edgefm.tools.pseudo`), with several seeds, beside the *control*: A itself trained as
   long the same way, so a student's gain over A is never extra training in disguise; the
   labels-only arm runs again for about a distilled run's compute (:func:`paired_gap` judges);
3. **other students**: a mobile CNN, and a ViT started from the MAE encoder, with and without
   distillation, with the same seeds;
4. **search**: :func:`~edgefm.tools.search.run_search` over ViT students and training modes,
   on val mAP and camera-rate latency as a fraction of A's;
5. **B**: the most accurate trial within the latency budget, trained again in its mode for the
   final budget with several seeds and a val curve (has B's schedule converged, by the
   feasibility study's rule? does the same schedule, longer, still gain?), beside A continued for
   as long.

Every trained model is kept (safetensors) under ``artifacts/<profile>/students/``, keyed by what
made it, so a killed build continues where it stopped and another study reuses it; its scores
and the re-traces of shipped runs are kept by the same key (:meth:`Candidates.scores`) and never
computed twice. A new :class:`~edgefm.config.BenchConfig` still starts a new search (its name
covers the timing, :func:`study_name`): its trials train the candidates no earlier run trained,
and new timings may choose another B. One
:func:`~edgefm.tools.bench.benchmark` run measures A and all of them on the eval scenes;
``metrics/smaller.json`` holds the records, the curves, the trials and the chosen B, and
gathers the ``controls`` and the ``distillation`` comparisons, each with its seeds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from safetensors.torch import load_file
from torch.utils.data import ConcatDataset, Dataset

from edgefm.artifacts import (
    artifacts_root,
    atomic_write_json,
    config_hash,
    ensure_dir,
    plain,
    project_root,
    stage,
    stage_dir,
    stage_versions,
)
from edgefm.config import MODES, DistillWeights, Profile, StudentConfig, StudentTraining, load_profile
from edgefm.data import ensure_dataset
from edgefm.data.coco import CocoDetection, CocoSplit
from edgefm.data.transforms import detection_transforms
from edgefm.models.detector import Detector
from edgefm.report import B_STUDY
from edgefm.stages.feasibility import converged, seed_spread
from edgefm.stages.finetune import ensure_finetuned, load_detector, weights_root
from edgefm.tools.bench import benchmark, camera_latencies, module_variant
from edgefm.tools.distill import train_student
from edgefm.tools.evaluate import BOOTSTRAP, evaluate_split, gap_interval, interval_verdict, torch_runner
from edgefm.tools.pseudo import label_pool
from edgefm.tools.search import choose, from_params, run_search, trial_records
from edgefm.tools.students import build_student
from edgefm.tools.training import TrainState, loss_gaps, save_weights

WEIGHTS = "model.safetensors"
SHIP_COMMAND = "edgefm --profile {profile} smaller --ship"
RETRACE_STEPS = 100  # steps a build trains again to check a shipped candidate's start
CONTROL = "control"  # the arm of A itself, trained as long as the students
EQUAL_COMPUTE = "labels, equal compute"  # the labels-only arm again, for about a distilled run's compute


def pruned(ratio: float) -> StudentConfig:
    """A with ``ratio`` of every block's heads and MLP channels removed, fine-tuned on the labels."""
    return StudentConfig(f"A pruned {ratio:g}", width=ratio, heads=ratio, scope="blocks", distill=None)


def continued(seed: int = 0) -> StudentConfig:
    """The control: A itself (nothing cut), trained on the labels like a student."""
    return StudentConfig("A continued", distill=None, seed=seed)


def paired_gap(arm: list[float], reference: list[float]) -> dict:
    """``arm`` minus ``reference``, seed by seed (the same seeds, so the same data order): the
    mean gap, the range of the per-seed gaps, and the verdict the book may print: higher or lower
    only when every seed agrees, else within the seed spread."""
    gaps = np.asarray(arm, dtype=float) - np.asarray(reference, dtype=float)
    verdict = ("higher in every seed" if gaps.min() > 0 else "lower in every seed" if gaps.max() < 0
               else "within the seed spread")
    return {"gap": float(gaps.mean()), "range": [float(gaps.min()), float(gaps.max())], "seeds": len(gaps),
            "verdict": verdict if len(gaps) > 1 else "one seed: no verdict"}


class Candidates:
    """Builds, trains (once) and loads the candidates of a study, all from the same teacher."""

    def __init__(self, profile: Profile, progress: bool, check_shipped: bool = False):
        trained = ensure_finetuned(profile, progress=progress)
        self.teacher, self.detector, self.backbone = (load_detector(trained), trained.config.detector,
                                                      trained.backbone)
        self.dataset = ensure_dataset(profile)
        transforms = detection_transforms(self.detector.image_size, train=True)
        self.train = CocoDetection(self.dataset.train, transforms)
        self.mae_source = None
        if any(s.init == "mae" for s in (*profile.smaller.students, *profile.smaller.long_students)):
            from edgefm.stages.pretrain import ensure_pretrained

            self.mae_source = ensure_pretrained(profile, progress=progress).source
        self.profile, self.progress, self.model_a = profile, progress, trained.identity
        self._pool: tuple[Dataset, dict, str] | None = None
        self.retraces: dict[str, dict] = {}  # by folder: shipped runs' starts, trained again
        self.check_shipped = check_shipped  # the study checks what it reads; loading B alone does not

    @property
    def shipped(self) -> list[str]:
        """Names of the candidates read from weights/ and checked, in the order they were asked for
        (a candidate shipped with several seeds is named once)."""
        return list(dict.fromkeys(r["name"] for r in self.retraces.values()))

    def data(self, spec: StudentConfig) -> Dataset:
        """What a candidate trains on: the labelled scenes, plus the pseudo-labelled pool if it uses it."""
        return self.pool()[0] if spec.pool else self.train

    def pool(self) -> tuple[Dataset, dict, str]:
        """The train scenes plus the pool with A's pseudo-labels, what labelling decided, and the
        labels' folder name (their key); labelled once per A and kept under ``pseudo/``."""
        if self._pool is None:
            if self.dataset.pool is None:
                raise ValueError(f"{self.dataset.root}: this dataset has no unlabelled pool to pseudo-label; "
                                 "leave 'pool' out of the training modes")
            key = pseudo_labels_key(self.profile, self.model_a)
            target = ensure_dir(stage_dir(self.profile.name, "pseudo", key), self._label, config=key)
            pool = CocoDetection(CocoSplit(target / "pool.json", self.dataset.pool),
                                 detection_transforms(self.detector.image_size, train=True))
            record = json.loads((target / "labelling.json").read_text(encoding="utf-8"))
            self._pool = ConcatDataset([self.train, pool]), record, target.name
        return self._pool

    def _label(self, work: Path) -> None:
        start = time.perf_counter()
        record = label_pool(torch_runner(self.teacher), self.teacher.stride, self.detector, self.dataset.val,
                            self.dataset.pool, self.profile.smaller.pool_images, work)
        atomic_write_json(work / "labelling.json", {**record, "seconds": time.perf_counter() - start})

    def build(self, spec: StudentConfig) -> Detector:
        return build_student(spec, self.teacher, self.detector, self.backbone, self.mae_source)

    def folder(self, spec: StudentConfig, training: StudentTraining) -> Path:
        """Where a candidate's weights live: keyed by what makes it (not its name) and by the
        code that trains it, so every study, trial and rebuild that asks for it shares one run."""
        return student_folder(self.profile, spec, training, self.model_a,
                              self.pool()[2] if spec.pool else None)

    def trained(self, spec: StudentConfig, training: StudentTraining) -> tuple[Detector, TrainState]:
        """The candidate after ``training``, trained now unless an earlier run left it (or the
        book ships it: then, with ``check_shipped``, its start is re-traced once, :meth:`retrace`)."""

        def build(work: Path) -> None:
            model = self.build(spec)
            state = train_student(model, self.teacher, spec.distill, self.data(spec), training, work,
                                  spec.seed, self.progress, desc=spec.name,
                                  validate=self._val_curve_point if training.eval_every else None)
            save_weights(model, work / WEIGHTS)
            atomic_write_json(work / "train_state.json", asdict(state))
            (work / "checkpoint.pt").unlink(missing_ok=True)

        folder = self.folder(spec, training)
        shipped = shipped_students(self.profile) / folder.name  # same key, same name
        target = shipped if (shipped / WEIGHTS).is_file() else ensure_dir(
            folder, build, config={"student": spec, "training": training})
        model = self.build(spec)
        model.load_state_dict(load_file(str(target / WEIGHTS)))
        state = TrainState(**json.loads((target / "train_state.json").read_text(encoding="utf-8")))
        if target == shipped and self.check_shipped and folder.name not in self.retraces:
            retraced = self._kept({"retrace": self.key(spec, training)},
                                  lambda: self.retrace(spec, training, state))
            self.retraces[folder.name] = {"name": spec.name, **retraced}
        return model.eval(), state

    def retrace(self, spec: StudentConfig, training: StudentTraining, shipped: TrainState) -> dict:
        """Train the first :data:`RETRACE_STEPS` steps of a shipped candidate's schedule again,
        here, with the same seed and batches, and compare the losses with the shipped ones."""
        steps = min(RETRACE_STEPS, training.steps)
        with tempfile.TemporaryDirectory() as folder:
            live = train_student(self.build(spec), self.teacher, spec.distill, self.data(spec), training,
                                 Path(folder), spec.seed, progress=False, stop=steps)
        return loss_gaps(live.losses, shipped.losses)

    def key(self, spec: StudentConfig, training: StudentTraining) -> str:
        """What the candidate's scores are kept by: its folder's name, and for one read from
        weights/ its weights' hash too (shipped again under the same name, it is scored again)."""
        folder = self.folder(spec, training)
        shipped = shipped_students(self.profile) / folder.name
        if not (shipped / WEIGHTS).is_file():
            return folder.name
        from edgefm.stages.pretrain import fingerprint

        return f"{folder.name}-shipped-{fingerprint(str(shipped))[:12]}"

    def scores(self, model: Detector, key: str, split: str) -> dict:
        """``model``'s COCO metrics on the ``"val"`` or ``"eval"`` scenes, computed once per model
        ``key`` (:meth:`key`, or A's identity) and kept, so no rebuild of the study scores a model
        twice."""
        scenes = getattr(self.dataset, split)
        return self._kept({"model": key, "split": split},
                          lambda: evaluate_split(torch_runner(model), scenes, self.detector, model.stride))

    def eval_with_samples(self, model: Detector, key: str) -> dict:
        """``model``'s eval metrics with :data:`~edgefm.tools.evaluate.BOOTSTRAP` resamplings of the
        eval images (their mAPs in ``map_samples``, the input of a paired gap), kept like
        :meth:`scores`."""
        return self._kept({"model": key, "split": "eval", "bootstrap": BOOTSTRAP},
                          lambda: evaluate_split(torch_runner(model), self.dataset.eval, self.detector,
                                                 model.stride, bootstrap=BOOTSTRAP, samples=True))

    def _val_curve_point(self, model: Detector) -> dict:
        """A point of a run's val curve (the same figure :meth:`val_map` keeps for its end)."""
        scores = evaluate_split(torch_runner(model), self.dataset.val, self.detector, model.stride)
        return {"map": scores["map"]}

    def val_map(self, model: Detector, key: str) -> float:
        return self.scores(model, key, "val")["map"]

    def _kept(self, key: dict, compute: Callable[[], dict]) -> dict:
        """``compute()``, kept under ``artifacts/<profile>/scores/`` by ``key`` and the study's code
        version."""
        def keep(work: Path) -> None:
            atomic_write_json(work / "result.json", compute())

        folder = ensure_dir(stage_dir(self.profile.name, "scores", key, code="smaller"), keep, config=key)
        return json.loads((folder / "result.json").read_text(encoding="utf-8"))


def pseudo_labels_key(profile: Profile, model_a: str) -> dict:
    """What A's pseudo-labels of the pool depend on: A (:attr:`Finetuned.identity`), the data and
    how many pool images are labelled; their folder's name keys the students trained on them."""
    return {"model_a": model_a, "data": profile.data, "images": profile.smaller.pool_images}


def student_folder(profile: Profile, spec: StudentConfig, training: StudentTraining, model_a: str,
                   pseudo_labels: str | None = None) -> Path:
    """A candidate's folder under ``artifacts/``, named by its key: the student (not its name), its
    training, the A it comes from (:attr:`Finetuned.identity`), the data and, for a student of the
    pool, the pseudo-labels' folder name. A shipped candidate has the same name under
    :func:`shipped_students`."""
    key = {"student": replace(spec, name=""), "training": training, "model_a": model_a, "data": profile.data}
    if pseudo_labels is not None:
        key["pseudo_labels"] = pseudo_labels
    return stage_dir(profile.name, "students", key)


def shipped_students(profile: Profile) -> Path:
    """Where the book ships the candidates too long to train in the build (B, its control and the
    long students), each in a folder named by its key, as under ``artifacts/<profile>/students/``."""
    return weights_root() / f"students-{profile.name}"


def ship_final(profile: Profile | str | None = None) -> list[Path]:
    """Copy the study's long runs (B and its control at the ``final`` budget, B's seeds at the
    :func:`longer_training` one, the ``long_students``) to :func:`shipped_students`, with the
    command that made them, so a build reads them (and re-traces their start) instead of training
    them."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    results = ensure_smaller(profile)
    found = Candidates(profile, progress=False)
    settings = profile.smaller
    b_spec = student_config(results["b_config"])
    b_budgets = [t for t in (settings.final, longer_training(profile)) if t]
    long_runs = [(replace(b_spec, seed=seed), t) for t in b_budgets for seed in settings.final_seeds]
    long_runs += [(continued(seed), control_training(profile)) for seed in settings.control_seeds]
    long_runs += [(replace(spec, seed=seed), settings.long) for spec in settings.long_students
                  for seed in settings.seeds]
    copied = []
    for spec, training in long_runs:
        source = found.folder(spec, training)
        target = shipped_students(profile) / source.name
        if not source.is_dir():  # read from weights/ already
            continue
        shutil.copytree(source, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("checkpoint.pt", "*.partial"))
        atomic_write_json(target / "made_by.json", {"command": SHIP_COMMAND.format(profile=profile.name),
                                                    "name": spec.name})
        copied.append(target)
    return copied


def control_training(profile: Profile) -> StudentTraining:
    """B's control trains for B's ``final`` budget without a val curve: its end point is what
    B is compared with, and each point of A's curve costs A's evaluation."""
    return replace(profile.smaller.final, eval_every=0)


def longer_training(profile: Profile) -> StudentTraining | None:
    """B's schedule ``longer_factor`` times as long (the same warm-up and val curve), or None."""
    settings = profile.smaller
    if not settings.longer_factor:
        return None
    return replace(settings.final, steps=round(settings.final.steps * settings.longer_factor))


def _b_run(found: Candidates, spec: StudentConfig, training: StudentTraining) -> tuple[dict, Detector, str]:
    """One run of B's schedule: its val curve, final val mAP and training time; the model; its key."""
    model, state = found.trained(spec, training)
    key = found.key(spec, training)
    return ({"seed": spec.seed, "val_curve": [[e["step"], e["map"]] for e in state.evals],
             "val_map": found.val_map(model, key), "train_seconds": state.seconds}, model, key)


def _b_seeds(found: Candidates, b_spec: StudentConfig, models: dict) -> dict:
    """B (the first of ``final_seeds``) and its other seeds at the ``final`` budget: each run's val
    curve, its val and eval mAP, and two checks of B's schedule: the feasibility study's rule (the
    last quarter's gain against the spread of the seeds' final val mAPs), and the same seeds
    trained :func:`longer_training`, each against its own seed at the ``final`` budget."""
    settings = found.profile.smaller
    runs = []
    for seed in settings.final_seeds:
        run, model, key = _b_run(found, replace(b_spec, seed=seed), settings.final)
        if seed == b_spec.seed:
            models[B_STUDY] = model, key
        runs.append({**run, "eval_map": found.scores(model, key, "eval")["map"]})
    b, spread = runs[0], seed_spread(runs, lambda r: r["val_map"], least=2)
    rule = converged(b["val_curve"], spread, len(runs)) if b["val_curve"] else None  # no curve: no verdict
    longer, training = None, longer_training(found.profile)
    if training is not None:  # chosen on val: the longer runs are never scored on eval
        longer_runs = [_b_run(found, replace(b_spec, seed=r["seed"]), training)[0] for r in runs]
        val = [r["val_map"] for r in longer_runs], [r["val_map"] for r in runs]
        longer = {"steps": training.steps, "seeds": longer_runs, "against_final": paired_gap(*val)}
    return {"steps": settings.final.steps, "train_seconds": b["train_seconds"], "val_map": b["val_map"],
            "seeds": runs, "convergence": rule, "longer": longer}


def student_config(record: dict) -> StudentConfig:
    """A :class:`StudentConfig` from its JSON record."""
    return StudentConfig(**{**record, "distill": record["distill"] and DistillWeights(**record["distill"])})


def distillation_pairs(specs: tuple[StudentConfig, ...]) -> list[list[str]]:
    """``[distilled, labels only]`` names of the students in ``specs`` that differ only in
    whether they are distilled: the comparisons the chapter reports."""
    def without_distillation(spec: StudentConfig) -> StudentConfig:
        return replace(spec, name="", distill=None)

    return [[s.name, t.name] for s in specs if s.distill for t in specs
            if t.distill is None and without_distillation(t) == without_distillation(s)]


def study_name(profile: Profile, model_a: str) -> str:
    """The search's name in its storage: trials are shared only by searches of the same A, the
    same choices, the same comparison budget, the same pseudo-labels, the same code training the
    students and the same way of timing them."""
    settings = profile.smaller
    key = config_hash({"search": settings.search, "start": settings.search_start, "compare": settings.compare,
                       "model_a": model_a, "data": profile.data, "timing": settings.bench,
                       "regime": "camera", "pool_images": settings.pool_images,
                       "code": {s: stage_versions()[s]["version"] for s in ("students", "pseudo")}})
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


def _arms(found: Candidates, models: dict, a_val: float) -> dict:
    """The arm student in every mode and the control, each with every seed, at the comparison
    budget; the labels-only arm again at about a distilled run's compute; and the verdicts."""
    settings = found.profile.smaller
    modes = [m for m in MODES if m != "pool" or found.dataset.pool is not None]
    arms: dict[str, list[dict]] = {}

    def run(arm: str, spec: StudentConfig, training: StudentTraining) -> None:
        model, state = found.trained(spec, training)
        key = found.key(spec, training)
        if spec.seed == settings.seeds[0]:
            models[spec.name] = model, key
        arms.setdefault(arm, []).append({"seed": spec.seed, "steps": training.steps, "val_map":
                                         found.val_map(model, key), "train_seconds": state.seconds})

    for seed in settings.seeds:
        for mode in modes:
            run(mode, replace(settings.arm.with_mode(mode), name=f"{settings.arm.name}, {mode}", seed=seed),
                settings.compare)
        steps = settings.compare_compute.steps
        run(EQUAL_COMPUTE,
            replace(settings.arm.with_mode("labels"), seed=seed,
                    name=f"{settings.arm.name}, labels, {steps} steps"),
            settings.compare_compute)
        run(CONTROL, continued(seed), settings.compare)
    val = {arm: [r["val_map"] for r in runs] for arm, runs in arms.items()}
    verdicts = {f"{arm} vs labels": paired_gap(val[arm], val["labels"]) for arm in arms if arm != "labels"}
    verdicts.update({f"{arm} vs {CONTROL}": paired_gap(val[arm], val[CONTROL])
                     for arm in arms if arm != CONTROL})
    verdicts[f"{CONTROL} vs A"] = paired_gap(val[CONTROL], [a_val] * len(val[CONTROL]))
    summary = {arm: {"mean": float(np.mean(v)), "range": [float(min(v)), float(max(v))],
                     "train_seconds": float(np.mean([r["train_seconds"] for r in arms[arm]]))}
               for arm, v in val.items()}
    return {"arms": arms, "arm_summary": summary, "arm_verdicts": verdicts, "modes": modes,
            "pool": found.pool()[1] if "pool" in modes else None}


def _students(found: Candidates, models: dict) -> dict:
    """The other students (``students`` at the comparison budget, ``long_students`` at the long
    one), each with every seed, and each distilled one against its labels-only twin, seed by seed."""
    settings = found.profile.smaller
    students = []
    for training, specs in ((settings.compare, settings.students), (settings.long, settings.long_students)):
        for spec in specs:
            runs = []
            for seeded in (replace(spec, seed=seed) for seed in settings.seeds):
                model, state = found.trained(seeded, training)
                key = found.key(seeded, training)
                if seeded.seed == settings.seeds[0]:
                    models[spec.name] = model, key
                runs.append({"seed": seeded.seed, "val_map": found.val_map(model, key),
                             "train_seconds": state.seconds})
            val = [r["val_map"] for r in runs]
            students.append({"name": spec.name, "config": plain(spec), "steps": training.steps, "seeds": runs,
                             "val_map": float(np.mean(val)), "val_range": [min(val), max(val)],
                             "train_seconds": float(np.mean([r["train_seconds"] for r in runs]))})
    pairs = distillation_pairs(settings.students) + distillation_pairs(settings.long_students)
    val = {s["name"]: [r["val_map"] for r in s["seeds"]] for s in students}
    return {"students": students, "distillation_pairs": pairs,
            "student_verdicts": {f"{d} vs {t}": paired_gap(val[d], val[t]) for d, t in pairs}}


def _final_control(found: Candidates, b_training: dict, models: dict, name: str) -> dict:
    """B's control, A continued for B's ``final`` budget, with each of ``control_seeds``: each
    seed's val and eval mAP, B against it seed by seed (``b_vs_control``, on val and on eval: the
    spread over seeds), and, for B's own seed, the gaps with a paired interval over the eval
    images (:func:`_final_gaps`). The control of B's own seed is the one benchmarked, as ``name``."""
    budget, seeds = control_training(found.profile), []
    for seed in found.profile.smaller.control_seeds:  # B's own seed first
        model, state = found.trained(continued(seed), budget)
        key = found.key(continued(seed), budget)
        if not seeds:
            models[name] = model, key
        seeds.append({"seed": seed, "val_map": found.val_map(model, key),
                      "eval_map": found.scores(model, key, "eval")["map"], "train_seconds": state.seconds})
    b_runs = {r["seed"]: r for r in b_training["seeds"]}
    b_vs_control = {split: paired_gap([b_runs[c["seed"]][f"{split}_map"] for c in seeds],
                                      [c[f"{split}_map"] for c in seeds]) for split in ("val", "eval")}
    first = seeds[0]
    return {"steps": budget.steps, "train_seconds": first["train_seconds"], "val_map": first["val_map"],
            "seeds": seeds, "b_vs_control": b_vs_control, "eval_gaps": _final_gaps(found, models, name)}


def _final_gaps(found: Candidates, models: dict, control: str) -> dict:
    """B against its control and the control against A on the eval scenes (the first seed of
    each), each with the 95 % paired bootstrap interval over the eval images: the spread the gaps
    of two single runs can be judged by, beside the spread over seeds."""
    runs = {"A": (found.teacher, found.model_a), "control": models[control], "B": models[B_STUDY]}
    scores = {name: found.eval_with_samples(model, key) for name, (model, key) in runs.items()}

    def gap(first: str, second: str) -> dict:
        interval = gap_interval(scores[first]["map_samples"], scores[second]["map_samples"])
        return {"gap": scores[first]["map"] - scores[second]["map"], "gap_ci": interval,
                "verdict": interval_verdict(interval, "higher", "lower")}

    return {"control vs A": gap("control", "A"), "B vs control": gap("B", "control")}


def _controls_and_distillation(results: dict, profile: Profile) -> dict:
    """The study's two questions in one place, each answer with its seeds: ``controls`` (A
    continued as long as the students that start from its weights; under ``students``, each such
    student against it, seed by seed, the labels-only arm at ``compare_compute`` included though
    it trained longer) and ``distillation`` (every distilled student against its labels-only twin,
    seed by seed). A view of the records above: nothing is trained or scored again."""
    settings = profile.smaller
    arms, verdicts = results["arms"], results["arm_verdicts"]
    final = results["final_control"]
    control_val = {r["seed"]: r["val_map"] for r in arms[CONTROL]}
    pruned_gaps = {p["name"]: paired_gap([p["val_map_after"]], [control_val[p["seed"]]])
                   for p in results["pruning"] if p["seed"] in control_val}
    controls = [{"name": continued().name, "steps": settings.compare.steps, "seeds": arms[CONTROL],
                 "against_a": verdicts[f"{CONTROL} vs A"],
                 "students": {arm: verdicts[f"{arm} vs {CONTROL}"] for arm in arms if arm != CONTROL}
                 | pruned_gaps},
                {"name": f"{continued().name}, {settings.final.steps} steps", "steps": settings.final.steps,
                 "seeds": final["seeds"], "students": {B_STUDY: final["b_vs_control"]["val"]},
                 "eval_students": {B_STUDY: final["b_vs_control"]["eval"]}, "eval_gaps": final["eval_gaps"]}]
    distillation = [{"student": f"{settings.arm.name}, {mode}", "mode": mode,
                     "against": f"{settings.arm.name}, labels", "seeds": arms[mode],
                     "paired_gap": verdicts[f"{mode} vs labels"]}
                    for mode in results["modes"] if mode != "labels"]
    students = {s["name"]: s for s in results["students"]}
    distillation += [{"student": d, "mode": student_config(students[d]["config"]).mode, "against": t,
                      "seeds": students[d]["seeds"], "paired_gap": results["student_verdicts"][f"{d} vs {t}"]}
                     for d, t in results["distillation_pairs"]]
    return {"controls": controls, "distillation": distillation}


def _build(work: Path, profile: Profile, progress: bool) -> dict:
    settings = profile.smaller
    found = Candidates(profile, progress, check_shipped=True)
    size = found.detector.image_size
    model_a = module_variant(found.teacher, size)
    results: dict = {"model_a": found.model_a, "a_val_map": found.val_map(found.teacher, found.model_a)}

    curve, models = [], {}
    for ratio in settings.pruning_ratios:
        spec = pruned(ratio)
        after, state = found.trained(spec, settings.compare)
        key = found.key(spec, settings.compare)
        models[spec.name] = after, key
        curve.append({"ratio": ratio, "name": spec.name, "seed": spec.seed,
                      "val_map_before": found.val_map(found.build(spec), f"{key}, before training"),
                      "val_map_after": found.val_map(after, key), "train_seconds": state.seconds})
    results["pruning"] = curve
    results.update(_arms(found, models, results["a_val_map"]))

    results.update(_students(found, models))

    ran: list[int] = []

    def objective(spec: StudentConfig, number: int) -> tuple[float, float]:
        ran.append(number)
        model, _ = found.trained(spec, settings.compare)
        timing = camera_latencies([model_a, module_variant(model, size, spec.name)], size, 2, settings.bench)
        ratio = timing[spec.name] / timing[model_a.name]
        return found.val_map(model, found.key(spec, settings.compare)), ratio

    search = settings.search
    if found.dataset.pool is None:
        search = replace(search, modes=tuple(m for m in search.modes if m != "pool"))
    study = run_search(objective, search, settings.search_start, size, search_storage(profile),
                       name=study_name(profile, found.model_a))
    trials = trial_records(study)
    chosen = choose(trials, search.latency_budget)
    b_spec = replace(from_params(settings.search_start, chosen, B_STUDY), seed=settings.final_seeds[0])
    b_training = _b_seeds(found, b_spec, models)
    control_name = f"A continued, {settings.final.steps} steps"
    final_control = _final_control(found, b_training, models, control_name)
    results.update(trials=trials, chosen_trial=chosen["number"], b_config=plain(b_spec), b_mode=b_spec.mode,
                   shipped=found.shipped, retrace=found.retraces,
                   ship_command=SHIP_COMMAND.format(profile=profile.name), b_training=b_training,
                   final_control=final_control,
                   latency_budget=search.latency_budget,  # a given URL may hold a password: not kept
                   storage="a given URL" if search.storage else f"artifacts/{profile.name}/search/model-b.db",
                   trials_run=len(ran))
    results.update(_controls_and_distillation(results, profile))

    variants = [model_a] + [module_variant(m, size, name) for name, (m, _) in models.items()]
    keys = {model_a.name: found.model_a} | {name: key for name, (_, key) in models.items()}
    results["bench"] = benchmark(variants, size, settings.bench,
                                 lambda v: found.scores(v.module, keys[v.name], "eval"))
    return results


def ensure_smaller(profile: Profile | str | None = None, progress: bool = True) -> dict:
    """Build (or load) the study and model B; write ``metrics/smaller.json``."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    trained = ensure_finetuned(profile, progress=progress)
    key = {"smaller": profile.smaller, "model_a": trained.identity, "data": profile.data}
    return stage(profile.name, "smaller", key, lambda work: _build(work, profile, progress))


def load_b(profile: Profile | str | None = None) -> Detector:
    """Model B (its study is built first if needed)."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    results = ensure_smaller(profile, progress=False)
    found = Candidates(profile, progress=False)
    model, _ = found.trained(student_config(results["b_config"]), profile.smaller.final)
    return model
