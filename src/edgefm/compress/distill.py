"""Knowledge distillation of the detector: a small student learns from model A's outputs and features.

Hinton et al. (2015) train a student on the teacher's *softened* outputs. The detector's heatmap
is a per-class sigmoid, so the soft target of each cell and class is ``sigmoid(teacher_logit / T)``
and the loss is the binary cross-entropy of the student's ``logit / T`` against it, scaled by
``T**2`` so its gradients keep their size as ``T`` changes. The box distances are imitated where
the teacher sees an object (an L1 loss weighted by the teacher's highest class probability), and
the neck's feature map is imitated through a learned 1x1 projection when the widths differ, in the
manner of fine-grained feature imitation for detectors (Wang et al., 2019). All three are added to
the ordinary detection loss on the labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgefm.models.detector import Detector


@dataclass(frozen=True)
class DistillWeights:
    """How much each imitation term counts next to the detection loss (weight 1)."""

    heatmap: float = 1.0
    boxes: float = 0.1
    features: float = 1.0
    temperature: float = 2.0


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


def neck_channels(model: Detector) -> int:
    """Channels of the fused pyramid map the head reads."""
    return model.head.heatmap[0].in_channels


class Distiller(nn.Module):
    """A student, a frozen teacher, and the projection from the student's neck to the teacher's.

    Only the student and the projection train; the teacher stays in eval mode without gradients.
    """

    def __init__(self, student: Detector, teacher: Detector, weights: DistillWeights = DistillWeights()):
        super().__init__()
        if student.stride != teacher.stride or student.num_classes != teacher.num_classes:
            raise ValueError(f"student (stride {student.stride}, {student.num_classes} classes) and "
                             f"teacher (stride {teacher.stride}, {teacher.num_classes} classes) must "
                             "share the head's grid")
        self.student, self.teacher, self.weights = student, teacher.eval(), weights
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
        w = self.weights
        losses = {
            "heatmap": w.heatmap * heatmap_distillation(heat, teacher_heat, w.temperature),
            "boxes": w.boxes * box_distillation(boxes, teacher_boxes, teacher_heat),
            "features": w.features * F.mse_loss(self.project(features), teacher_features),
        }
        return (heat, boxes), losses
