"""The ViT backbone: masked-autoencoder encoder weights in an unshuffled, exportable timm ViT.

``transformers``' ``ViTMAEModel`` always shuffles and masks its tokens (even at mask ratio 0 it
permutes them), so it cannot serve as a detection backbone. The MAE encoder is a plain ViT,
though: this module copies its weights, whether from our own pretraining or from
``facebook/vit-mae-*`` on the hub, into a ``timm`` ``VisionTransformer`` and returns the patch
tokens as a feature map. Position embeddings are resampled to the detection resolution once, at
load time, so the exported graph holds no interpolation.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from edgefm.config import DOWNLOAD_ENV, BackboneConfig
from edgefm.tools.training import CheckpointError


def build_vit(cfg: BackboneConfig, layer_norm_eps: float = 1e-12) -> VisionTransformer:
    """A timm ViT encoder without classifier; layer norms match ``transformers``' MAE (eps 1e-12)."""
    return VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.hidden_size,
        depth=cfg.num_layers, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
        num_classes=0, global_pool="", norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps),
    )


class ViTBackbone(nn.Module):
    """A ViT whose output is the map of patch tokens, ``(B, D, H / patch, W / patch)``."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.patch_size = vit.patch_embed.patch_size[0]
        self.embed_dim = vit.embed_dim
        self.grid = vit.patch_embed.grid_size

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, ``(B, 1 + N, D)``, in image order."""
        return self.vit.forward_features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(images)[:, self.vit.num_prefix_tokens :]
        return tokens.transpose(1, 2).reshape(images.shape[0], self.embed_dim, *self.grid)


def mae_to_timm(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename ``transformers`` (5.x) ViT-MAE encoder weights to timm's ViT names (q, k, v fused).

    ``from_pretrained`` already converts older checkpoints (such as ``facebook/vit-mae-base``) to
    these 5.x names, so one mapping serves both.
    """
    state = {k.removeprefix("vit."): v for k, v in state.items()}
    out = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.position_embeddings"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    names = {"attention.o_proj": "attn.proj", "layernorm_before": "norm1",
             "layernorm_after": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(num_layers):
        hf, timm = f"layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{hf}attention.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            out[f"{timm}attn.qkv.{kind}"] = torch.cat(qkv)
            for hf_name, timm_name in names.items():
                out[f"{timm}{timm_name}.{kind}"] = state[f"{hf}{hf_name}.{kind}"]
    return out


def load_mae(source: str | Path, decoder: bool = False):
    """``transformers``' ViT-MAE from a ``save_pretrained`` folder or a hub id (offline unless
    ``EDGEFM_DOWNLOAD=1``): the encoder (``ViTMAEModel``), or with ``decoder`` the whole
    ``ViTMAEForPreTraining``. Errors name the source."""
    import transformers
    from transformers import ViTMAEForPreTraining, ViTMAEModel

    local = Path(source).expanduser()
    is_local = local.exists() or str(source).startswith((".", "/", "~"))
    if is_local and not (local / "config.json").is_file():
        raise CheckpointError(f"{local}: not a checkpoint folder (no config.json)")
    download = os.environ.get(DOWNLOAD_ENV) == "1"
    transformers.logging.set_verbosity_error()  # the decoder weights are expected to go unused
    try:
        return (ViTMAEForPreTraining if decoder else ViTMAEModel).from_pretrained(
            str(local if is_local else source), local_files_only=is_local or not download
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        hint = "" if is_local or download else (
            f" (no such folder, and not in the hub cache; set {DOWNLOAD_ENV}=1 to download it)")
        raise CheckpointError(f"{source}: cannot load MAE weights{hint}: {error}") from error


def mae_config(cfg: BackboneConfig, **extra):
    """``transformers``' ``ViTMAEConfig`` for an encoder of this shape (``extra``: decoder, masking)."""
    from transformers import ViTMAEConfig

    return ViTMAEConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.hidden_size * cfg.mlp_ratio), **extra,
    )


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table, ``(1, 1 + grid**2, dim)`` with a zero cls row, in
    the layout of the released MAE weights (``transformers`` swaps the h and w halves to match)."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    table = build_2d_sinusoidal_position_embedding(height=grid, width=grid, embed_dim=dim, cls_token=True)
    half = dim // 2
    return torch.cat([table[..., half:], table[..., :half]], dim=-1).reshape(1, -1, dim)


@torch.no_grad()
def init_mae_embeddings(model):
    """Give a freshly built ``ViTMAEModel`` / ``ViTMAEForPreTraining`` its fixed sin-cos position
    embeddings (encoder and decoder) and MAE's mask-token init; returns the model.

    ``transformers`` 5.x builds these models from a config with all-zero position embeddings
    (they are frozen, so training never fixes them): the encoder then cannot tell where a patch
    is and the decoder cannot tell which patch it paints, and reconstructions collapse to the
    average patch. Checkpoints (ours, the hub's) store the tables, so loading is unaffected.
    """
    encoder = getattr(model, "vit", model)
    table = encoder.embeddings.position_embeddings
    grid = round(encoder.embeddings.patch_embeddings.num_patches**0.5)
    table.copy_(sincos_position_embedding(grid, table.shape[-1]))
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        decoder.decoder_pos_embed.copy_(sincos_position_embedding(grid, decoder.decoder_pos_embed.shape[-1]))
        nn.init.normal_(decoder.mask_token, std=model.config.initializer_range)
    return model


def backbone_from_encoder(
    encoder, image_size: int | None = None, expect: BackboneConfig | None = None, source: str = "encoder"
) -> ViTBackbone:
    """A :class:`ViTBackbone` holding the weights of a ``transformers`` ``ViTMAEModel``.

    ``image_size`` is the detection resolution (default: the pretraining one); ``expect``, if
    given, is the shape the caller needs, and an encoder of another shape is refused.
    """
    mae = encoder.config
    cfg = BackboneConfig(
        image_size=image_size or mae.image_size, patch_size=mae.patch_size,
        hidden_size=mae.hidden_size, num_layers=mae.num_hidden_layers,
        num_heads=mae.num_attention_heads, mlp_ratio=mae.intermediate_size / mae.hidden_size,
    )
    if expect is not None:
        fields = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_ratio")
        wrong = [f"{f} {getattr(cfg, f)} != {getattr(expect, f)}" for f in fields
                 if getattr(cfg, f) != getattr(expect, f)]
        if wrong:
            raise CheckpointError(f"{source}: checkpoint shape does not match: {', '.join(wrong)}")
    vit = build_vit(cfg, layer_norm_eps=mae.layer_norm_eps)
    state = mae_to_timm(encoder.state_dict(), cfg.num_layers)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(vit.patch_embed.grid_size))
    vit.load_state_dict(state, strict=True)
    return ViTBackbone(vit)


def load_mae_backbone(
    source: str | Path, image_size: int | None = None, expect: BackboneConfig | None = None
) -> ViTBackbone:
    """A :class:`ViTBackbone` with the encoder weights of the MAE checkpoint at ``source``.

    ``source`` is a folder written by ``save_pretrained`` or a hub id (loaded from the local
    cache unless ``EDGEFM_DOWNLOAD=1``): both take the same path through ``from_pretrained``.
    """
    return backbone_from_encoder(load_mae(source), image_size, expect, source=str(source))


def random_mae_backbone(cfg: BackboneConfig, image_size: int | None = None) -> ViTBackbone:
    """The MAE encoder *before* pretraining, as a :class:`ViTBackbone`: the baseline of Part 1.

    It is ``ViTMAEModel``'s own initialisation, fixed 2-D sin-cos position embedding included,
    through the same adapter, so "random init" and "MAE init" differ by the pretraining alone.
    A ViT with a learned, randomly initialised position embedding is a weaker baseline: it must
    learn where its patches are from the labelled scenes.
    """
    from transformers import ViTMAEModel

    return backbone_from_encoder(init_mae_embeddings(ViTMAEModel(mae_config(cfg))), image_size)
