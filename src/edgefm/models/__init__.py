"""Models: the ViT backbone adapted from MAE weights (and, later, the detector built on it)."""

from edgefm.models.vit import CheckpointError, ViTBackbone, build_vit, load_mae_backbone, random_mae_backbone

__all__ = ["CheckpointError", "ViTBackbone", "build_vit", "load_mae_backbone", "random_mae_backbone"]
