"""Models: the ViT backbone adapted from MAE weights, the feature pyramid, the CenterNet-style head
and the detector built from them (``edgefm.models.detector``)."""

from edgefm.models.vit import CheckpointError, ViTBackbone, build_vit, load_mae_backbone, random_mae_backbone

__all__ = ["CheckpointError", "ViTBackbone", "build_vit", "load_mae_backbone", "random_mae_backbone"]
