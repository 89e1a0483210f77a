"""What a profile will compute, before it computes anything: ``edgefm plan``.

A reader about to run the ``full`` profile (ViT-B at 512 px) wants to know what each stage trains
and roughly what it costs, without downloading the hub weights or building any data. The plan
lists every stage with the settings that size it and the images it trains on; the cost is bounded
by model A's: the detector is built with random weights (no download), its FLOPs per image are
counted, steps of the training loop are timed on this machine's device (its GPU when it has one,
with the training's bf16 autocast; else its CPU), and every trained image is priced at A's cost.
Students, the peer and MAE pretraining (a quarter of the tokens) cost less per image than A, so
the estimate bounds the training (QAT, which runs in FP32 with fake quantization, excepted on a
GPU); evaluation, ONNX Runtime benchmarks and emulated checks run on the CPU and are not in it.
Run the plan where the book will be built: its hours hold there.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgefm.config import Profile
from edgefm.models.centernet import EncodeTargets, centernet_loss
from edgefm.stages.finetune import build_detector
from edgefm.stages.peer import longer_peer, retraced_start
from edgefm.tools.bench import count_flops
from edgefm.tools.training import Schedule, StepData, fit, resolve_device


@dataclass(frozen=True)
class PlannedStage:
    """One stage: what it does, the settings that size it, and the images its training sees."""

    name: str
    what: str
    settings: str
    train_images: int


def _feasibility_images(profile: Profile) -> int:
    """The study's runs (shipped ones included: the bound assumes nothing is shipped) and the
    live re-traces every build trains."""
    from edgefm.stages.feasibility import live_runs, study_runs

    runs = study_runs(profile)
    retraces = len(live_runs(profile)) * profile.retrace_steps * profile.finetune.batch_size
    return sum(r.config(profile).steps * r.config(profile).batch_size for r in runs) + retraces


def _peer_images(profile: Profile) -> int:
    """The peer, its longer schedule and the live re-traces of their starts if shipped (one where
    both stay within their warm-up)."""
    runs = [profile.peer] + ([longer_peer(profile)] if profile.peer_longer_factor else [])
    starts = {retraced_start(cfg) for cfg in runs}
    retraces = sum(steps * cfg.batch_size for cfg, steps in starts)
    return sum(cfg.steps * cfg.batch_size for cfg in runs) + retraces


def _smaller_images(profile: Profile) -> int:
    """Every candidate :mod:`edgefm.stages.smaller` trains, and the re-traces of its shipped long runs."""
    from edgefm.stages.smaller import RETRACE_STEPS, longer_training

    cfg = profile.smaller
    seeds = len(cfg.seeds)
    compare = cfg.compare.steps * cfg.compare.batch_size
    pruning = len(cfg.pruning_ratios) * compare
    arms = 3 * seeds * compare  # labels, distillation, pool distillation
    arms += seeds * compare  # the control: A trained as long
    arms += seeds * cfg.compare_compute.steps * cfg.compare_compute.batch_size
    long = cfg.long.steps * cfg.long.batch_size
    others = seeds * (len(cfg.students) * compare + len(cfg.long_students) * long)
    search = cfg.search.trials * compare
    b_budgets = [t.steps for t in (cfg.final, longer_training(profile)) if t]  # B's schedule, the longer one
    final = (len(cfg.final_seeds) * sum(b_budgets) + cfg.final.steps) * cfg.final.batch_size  # + control
    long_runs = len(cfg.final_seeds) * len(b_budgets) + 1 + seeds * len(cfg.long_students)
    retraces = long_runs * RETRACE_STEPS * max(cfg.final.batch_size, cfg.long.batch_size)
    return pruning + arms + others + search + final + retraces


def _qat_images(profile: Profile) -> int:
    return profile.quantize.qat.steps * profile.quantize.qat.batch_size


def _steps(steps: int, batch: int) -> str:
    return f"{steps:,d} steps x {batch}"


def _data_settings(profile: Profile) -> str:
    data = profile.data
    if data.source == "fashion-scenes":
        return (f"{data.train_scenes:,d} train / {data.val_scenes:,d} val / {data.eval_scenes:,d} eval "
                f"scenes, {data.pool_images:,d} unlabelled")
    return (f"{data.source}: its own splits, or {data.val_scenes:,d} val and {data.eval_scenes:,d} eval "
            "images held out")


def _pretrain_settings(profile: Profile) -> str:
    pre = profile.pretrain
    text = _steps(pre.steps, pre.batch_size) if pre.steps else "no pretraining"
    if pre.weights:
        local = pre.weights.startswith(("weights/", "/", "."))
        text += f"; detectors start from {pre.weights}" + ("" if local else " (downloaded once from the hub)")
    return text


def stages(profile: Profile) -> list[PlannedStage]:
    """Every stage of the profile, in the order the book runs them."""
    pre, fine, q = profile.pretrain, profile.finetune, profile.quantize
    sm, peer = profile.smaller, profile.peer
    vit = f"ViT {pre.backbone.num_layers} x {pre.backbone.hidden_size} at {fine.detector.image_size} px"
    shipped = "; long runs shipped in weights/ are used instead" if profile.shipped else ""
    return [
        PlannedStage("data", "the labelled splits and the unlabelled pool", _data_settings(profile), 0),
        PlannedStage("pretrain", "masked-autoencoder pretraining on the pool", _pretrain_settings(profile),
                     pre.steps * pre.batch_size),
        PlannedStage("feasibility", "model A, its random-init twin, seeds, schedules, label fractions",
                     f"{vit}; A: {_steps(fine.steps, fine.batch_size)}{shipped}",
                     _feasibility_images(profile)),
        PlannedStage("quantization", "INT8 recipes of A, QAT among them",
                     f"QAT and its FP32 control, {_steps(q.qat.steps, q.qat.batch_size)} each",
                     2 * _qat_images(profile)),
        PlannedStage("smaller", "model B: pruning, students with and without distillation, the search",
                     f"{len(sm.seeds)} seeds, {sm.search.trials} search trials, "
                     f"B {_steps(sm.final.steps, sm.final.batch_size)}", _smaller_images(profile)),
        PlannedStage("peer", "SSDlite-MobileNetV3 from scratch, for comparison",
                     _steps(peer.steps, peer.batch_size) + (
                         f", and {_steps(longer_peer(profile).steps, peer.batch_size)}"
                         if profile.peer_longer_factor else ""),
                     _peer_images(profile)),
        PlannedStage("deployment", "C = B in INT8, the bundle and the final benchmark",
                     f"QAT of B if QAT is A's best recipe; {q.bench.runs} timed runs per variant and thread "
                     "count", _qat_images(profile)),
    ]


class _Timed(Exception):
    """Raised as the step after the timed ones begins: nothing more is needed."""


def a_cost(profile: Profile, device: str = "cpu", batch: int | None = None) -> dict:
    """Model A's FLOPs per image (forward) and the seconds one trained image takes on ``device``
    (``auto``: this machine's GPU if it has one): steps of ``batch`` images (default: 4 on a CPU,
    to keep the plan short; the recipe's batch on a GPU) of the training loop itself
    (:func:`~edgefm.tools.training.fit`, with the recipe's clipping and autocast), timed after
    untimed warm-up steps; the run stops before any checkpoint is written. A busy machine inflates
    the time: plan on an idle one."""
    cfg = profile.finetune
    where = resolve_device(device)
    warm, timed = (1, 1) if where.type == "cpu" else (3, 5)  # a GPU's first steps tune its kernels
    batch = min(batch or (4 if where.type == "cpu" else cfg.batch_size), cfg.batch_size)
    model = build_detector(cfg.detector, profile.pretrain.backbone, num_classes=1)
    flops = count_flops(model, cfg.detector.image_size)
    size = cfg.detector.image_size
    box = {"boxes": torch.tensor([[size / 4, size / 4, size / 2, size / 2]]), "labels": torch.tensor([0])}
    data = StepData([(torch.rand(3, size, size), box)] * batch, batch, seed=0,
                    collate=EncodeTargets(1, model.stride))
    starts: list[float] = []  # when each step began: those after the warm-up ones are timed

    def loss(model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        return centernet_loss(model(images), targets, model.stride)

    def before_step(step: int) -> None:
        if where.type == "cuda":
            torch.cuda.synchronize()
        elif where.type == "mps":
            torch.mps.synchronize()
        starts.append(time.perf_counter())
        if step == warm + timed:
            raise _Timed

    steps = warm + timed + 1
    with tempfile.TemporaryDirectory() as folder, contextlib.suppress(_Timed):
        fit(model, torch.optim.AdamW(model.parameters(), lr=1e-4), loss, data,
            Schedule(steps, 0, cfg.grad_clip, checkpoint_every=steps), Path(folder) / "checkpoint.pt",
            device=str(where), workers=0, before_step=before_step, progress=False)
    seconds = (starts[warm + timed] - starts[warm]) / (timed * batch)
    return {"flops_per_image": flops, "params": sum(p.numel() for p in model.parameters()),
            "device": where.type, "seconds_per_image": seconds}
