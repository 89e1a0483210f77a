"""Structured pruning of the detector's ViT with ``torch-pruning``: whole heads and MLP channels.

Only the transformer blocks shrink: each block's attention loses whole heads (its ``qkv``
outputs and the matching ``proj`` inputs) and its MLP loses hidden channels (``fc1`` outputs,
``fc2`` inputs). The residual width, the patch embedding, the pyramid and the head keep their
shapes, so the pruned model still loads into the same neck and decoder, and its matrix products
stay dense: a CPU runs them faster, unlike scattered zeros. ``torch-pruning`` finds the coupled
layers from a traced forward pass (DepGraph); what it cannot know, timm's bookkeeping of the head
count and the attention width, is updated here afterwards.

Importance is the L2 norm of each group's weights (``GroupMagnitudeImportance``): it needs no data
or gradients, and for a fine-tuned model whose pruned version is fine-tuned again it is the usual
baseline (Taylor importance, which needs the loss, is the natural next comparison).
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from timm.models.vision_transformer import Attention

from edgefm.models.detector import Detector


def prune_detector(model: Detector, ratio: float, image_size: int, round_to: int = 8,
                   head_ratio: float | None = None) -> Detector:
    """Remove ``ratio`` of every block's MLP channels (counts rounded to ``round_to`` so GEMMs
    stay SIMD-friendly) and ``head_ratio`` (default ``ratio``) of its heads, in place.

    At least one head and ``round_to`` channels always remain.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), not {ratio}")
    vit = model.backbone.vit
    blocks = list(vit.blocks)
    ignored = [vit.patch_embed, model.pyramid, model.head]
    ignored += [layer for block in blocks for layer in (block.attn.proj, block.mlp.fc2)]
    num_heads = {block.attn.qkv: block.attn.num_heads for block in blocks}
    head_ratio = ratio if head_ratio is None else head_ratio
    # never remove every head: at most (heads - 1) / heads of them
    head_ratio = min(head_ratio, min((h - 1) / h for h in num_heads.values()))
    pruner = tp.pruner.MetaPruner(
        model, torch.rand(1, 3, image_size, image_size),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio,
        output_transform=lambda outputs: sum(o.sum() for o in outputs),
        # the token tables' last dimension is the residual width, which is never pruned here
        unwrapped_parameters=[(p, p.ndim - 1) for p in (vit.pos_embed, vit.cls_token) if p is not None],
    )
    pruner.step()
    for block in blocks:
        update_attention(block.attn)
    return model


def update_attention(attn: Attention) -> None:
    """Make timm's attention agree with its pruned ``qkv``: head count and attention width."""
    attn.num_heads = attn.qkv.out_features // (3 * attn.head_dim)
    attn.attn_dim = attn.num_heads * attn.head_dim


def widths(model: Detector) -> list[dict[str, int]]:
    """Heads and MLP hidden width of each ViT block (what pruning changed)."""
    return [{"heads": block.attn.num_heads, "mlp": block.mlp.fc1.out_features}
            for block in model.backbone.vit.blocks]
