"""Structured pruning of the detector with ``torch-pruning``: heads, channels, and whole blocks.

``scope="blocks"`` shrinks only the transformer blocks: each attention loses whole heads (its
``qkv`` outputs and the matching ``proj`` inputs) and each MLP loses hidden channels (``fc1``
outputs, ``fc2`` inputs); the residual width, patch embedding, pyramid and head keep their shapes.
``scope="all"`` also narrows the residual stream (patch embedding, every norm, the position
table), the pyramid and the head's hidden layers: only the head's outputs (classes, box sides)
keep their size. Either way the matrix products stay dense, so a CPU runs them faster, unlike
scattered zeros. ``torch-pruning`` finds the coupled layers from a traced forward pass (DepGraph);
what it cannot know, timm's bookkeeping of head count and widths, is updated here afterwards.
:func:`keep_blocks` removes whole blocks (depth), the cheapest way to a shallower student.

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
                   head_ratio: float | None = None, scope: str = "blocks") -> Detector:
    """Remove ``ratio`` of the channels in ``scope`` (counts rounded to ``round_to`` so GEMMs stay
    SIMD-friendly) and ``head_ratio`` (default ``ratio``) of every block's heads, in place.

    At least one head and ``round_to`` channels always remain.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), not {ratio}")
    if scope not in ("blocks", "all"):
        raise ValueError(f"unknown pruning scope {scope!r}; use 'blocks' or 'all'")
    vit = model.backbone.vit
    blocks = list(vit.blocks)
    ignored = [model.head.heatmap[-1], model.head.box[-1]]
    if scope == "blocks":
        ignored += [vit.patch_embed, model.pyramid, model.head]
        ignored += [layer for block in blocks for layer in (block.attn.proj, block.mlp.fc2)]
    num_heads = {block.attn.qkv: block.attn.num_heads for block in blocks}
    head_ratio = ratio if head_ratio is None else head_ratio
    # never remove every head: at most (heads - 1) / heads of them
    head_ratio = min(head_ratio, min((h - 1) / h for h in num_heads.values()))
    pruner = tp.pruner.MetaPruner(
        model, torch.rand(1, 3, image_size, image_size),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
        num_heads=num_heads, prune_num_heads=head_ratio > 0, prune_head_dims=False,
        head_pruning_ratio=head_ratio, output_transform=lambda outputs: sum(o.sum() for o in outputs),
        # the token tables' last dimension is the residual width
        unwrapped_parameters=[(p, p.ndim - 1) for p in (vit.pos_embed, vit.cls_token) if p is not None],
    )
    pruner.step()
    for block in blocks:
        update_attention(block.attn)
    vit.embed_dim = vit.num_features = model.backbone.embed_dim = vit.patch_embed.proj.out_channels
    return model


def keep_blocks(model: Detector, keep: list[int]) -> Detector:
    """Keep only the ViT blocks at indices ``keep`` (in their order), in place."""
    blocks = model.backbone.vit.blocks
    if not keep or any(not 0 <= i < len(blocks) for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"blocks to keep {keep} must be distinct indices of the {len(blocks)} blocks")
    model.backbone.vit.blocks = torch.nn.Sequential(*(blocks[i] for i in sorted(keep)))
    return model


def spread_blocks(depth: int, total: int) -> list[int]:
    """``depth`` block indices spread evenly over ``total``, always keeping the last one (the
    features the pyramid was trained on): 3 of 6 -> [1, 3, 5]."""
    if not 1 <= depth <= total:
        raise ValueError(f"depth must be in 1..{total}, not {depth}")
    return sorted({total - 1 - round(i * total / depth) for i in range(depth)})


def update_attention(attn: Attention) -> None:
    """Make timm's attention agree with its pruned ``qkv``: head count and attention width."""
    attn.num_heads = attn.qkv.out_features // (3 * attn.head_dim)
    attn.attn_dim = attn.num_heads * attn.head_dim


def widths(model: Detector) -> list[dict[str, int]]:
    """Heads and MLP hidden width of each ViT block (what pruning changed)."""
    return [{"heads": block.attn.num_heads, "mlp": block.mlp.fc1.out_features}
            for block in model.backbone.vit.blocks]
