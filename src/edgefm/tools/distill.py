"""Knowledge distillation of the detector: a small student learns from model A's outputs and features.

Hinton et al. (2015) train a student on the teacher's *softened* outputs. The detector's heatmap
is a per-class sigmoid, so the soft target of each cell and class is ``sigmoid(teacher_logit / T)``
and the loss is the binary cross-entropy of the student's ``logit / T`` against it, scaled by
``T**2`` so its gradients keep their size as ``T`` changes. The box distances are imitated where
the teacher sees an object (an L1 loss weighted by the teacher's highest class probability), and
the neck's feature map is imitated through a learned 1x1 projection when the widths differ, near
objects only, as in fine-grained feature imitation for detectors (Wang et al., 2019). Wang et al.
pick the imitated cells with the anchors' overlap with the ground truth; this detector has no
anchors, so each cell is weighted by the teacher's highest class probability there, the weight
the box term uses: the background, most of every map, would otherwise dominate the imitation.
All three are added to the ordinary detection loss on the labels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from edgefm.config import DistillWeights, StudentTraining
from edgefm.models.centernet import EncodeTargets, centernet_loss
from edgefm.models.detector import Detector
from edgefm.tools.training import Schedule, StepData, TrainState, fit


def heatmap_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target binary cross-entropy between heatmap logits (B, C, h, w), times ``T**2``."""
    target = torch.sigmoid(teacher / temperature)
    loss = F.binary_cross_entropy_with_logits(student / temperature, target)
    return loss * temperature**2


def box_distillation(student: torch.Tensor, teacher: torch.Tensor,
                     teacher_heat: torch.Tensor) -> torch.Tensor:
    """L1 between box distances (B, 4, h, w), weighted by the teacher's confidence at each cell."""
    weight = torch.sigmoid(teacher_heat).amax(dim=1, keepdim=True)
    return (weight * (student - teacher).abs()).sum() / (4 * weight.sum()).clamp(min=1e-6)


def feature_imitation(student: torch.Tensor, teacher: torch.Tensor,
                      teacher_heat: torch.Tensor) -> torch.Tensor:
    """Mean squared error between feature maps (B, C, h, w), weighted by the teacher's confidence."""
    weight = torch.sigmoid(teacher_heat).amax(dim=1, keepdim=True)
    return (weight * (student - teacher).pow(2)).sum() / (student.shape[1] * weight.sum()).clamp(min=1e-6)


def neck_channels(model: Detector) -> int:
    """Channels of the fused pyramid map the head reads."""
    return model.head.heatmap[0].in_channels


class Distiller(nn.Module):
    """A student, a frozen teacher, and the projection from the student's neck to the teacher's.

    Only the student and the projection train; the teacher stays in eval mode without gradients.
    A student on a coarser grid (one that runs at a lower resolution) imitates the teacher's maps
    resized to its grid; box distances are in input pixels for both, so they need no rescaling.
    """

    def __init__(self, student: Detector, teacher: Detector, weights: DistillWeights | None = None):
        super().__init__()
        if student.num_classes != teacher.num_classes:
            raise ValueError(f"student ({student.num_classes} classes) and teacher "
                             f"({teacher.num_classes} classes) must predict the same classes")
        self.student, self.teacher, self.weights = student, teacher.eval(), weights or DistillWeights()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        s_channels, t_channels = neck_channels(student), neck_channels(teacher)
        self.project = nn.Identity() if s_channels == t_channels else nn.Conv2d(s_channels, t_channels, 1)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode
        return self

    def forward(self, images: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                      dict[str, torch.Tensor]]:
        """The student's raw outputs (for the detection loss) and the weighted imitation losses."""
        features = self.student.forward_features(images)
        heat, boxes = self.student.head(features)
        with torch.no_grad():
            teacher_features = self.teacher.forward_features(images)
            teacher_heat, teacher_boxes = self.teacher.head(teacher_features)
            if teacher_heat.shape[-2:] != heat.shape[-2:]:
                teacher_features, teacher_heat, teacher_boxes = (
                    F.interpolate(t, size=heat.shape[-2:], mode="bilinear", align_corners=False)
                    for t in (teacher_features, teacher_heat, teacher_boxes))
        w = self.weights
        losses = {
            "heatmap": w.heatmap * heatmap_distillation(heat, teacher_heat, w.temperature),
            "boxes": w.boxes * box_distillation(boxes, teacher_boxes, teacher_heat),
            "features": w.features * feature_imitation(self.project(features), teacher_features,
                                                       teacher_heat),
        }
        return (heat, boxes), losses


def student_loss(model: Detector | Distiller, batch: tuple[torch.Tensor, dict]) -> dict[str, torch.Tensor]:
    """The detection loss on the labels, plus the imitation terms when ``model`` is a Distiller."""
    images, targets = batch
    student = model.student if isinstance(model, Distiller) else model
    if isinstance(model, Distiller):
        outputs, imitation = model(images)
    else:
        outputs, imitation = model(images), {}
    losses = centernet_loss(outputs, targets, student.stride)
    losses.update({f"kd_{name}": value.float() for name, value in imitation.items()})
    losses["total"] = losses["total"] + sum(losses[f"kd_{name}"] for name in imitation)
    return losses


def train_student(student: Detector, teacher: Detector | None, weights: DistillWeights | None,
                  train: Dataset, cfg: StudentTraining, work: Path, seed: int = 0,
                  progress: bool = True, desc: str = "student", device: str = "auto",
                  stop: int = 0, validate: Callable[[Detector], dict] | None = None) -> TrainState:
    """Train ``student`` on ``train`` (distilled from ``teacher`` when ``weights`` is given) for
    ``cfg.steps`` (``stop`` > 0: only that many steps of the schedule, to re-trace a run's start);
    checkpoints in ``work`` let a killed run continue exactly. ``validate(student)`` is recorded
    every ``cfg.eval_every`` steps and at the end. Returns the history; the student is left on
    the CPU, in eval mode."""
    torch.manual_seed(seed)
    model: Detector | Distiller = (Distiller(student, teacher, weights) if weights is not None else student)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = StepData(train, cfg.batch_size, seed, EncodeTargets(student.num_classes, student.stride))
    schedule = Schedule(cfg.steps, cfg.warmup_steps, cfg.grad_clip, cfg.checkpoint_every, cfg.eval_every,
                        stop=stop)
    state = fit(model, optimizer, student_loss, data, schedule, work / "checkpoint.pt", device=device,
                validate=validate and (lambda _: validate(student)), progress=progress, desc=desc)
    model.cpu().eval()
    return state
