"""Masked-autoencoder pretraining on a folder of unlabeled images, with ``transformers``' ViT-MAE.

The objective is MAE's: hide 75 % of the patches, encode the visible ones, and regress the hidden
patches' pixels (normalised per patch). The loop is plain PyTorch: AdamW with warm-up and cosine
decay, a progress bar, and a checkpoint every ``checkpoint_every`` steps from which a killed run
continues exactly (:mod:`edgefm.tools.training`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from edgefm.artifacts import (
    atomic_write_bytes,
    atomic_write_json,
    ensure_dir,
    plain,
    project_root,
    stage_dir,
    write_metrics,
)
from edgefm.config import PretrainConfig, Profile, load_profile
from edgefm.data import ensure_dataset
from edgefm.data.coco import DatasetError, read_image
from edgefm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from edgefm.models.vit import init_mae_embeddings, load_mae, mae_config
from edgefm.tools.training import Schedule, StepData, TrainState, fit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class ImageFolder(Dataset):
    """Every image in a folder (no labels), as augmented, normalised float tensors."""

    def __init__(self, folder: Path, transform: v2.Transform):
        self.files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DatasetError(f"{folder}: no images to pretrain on")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(F.pil_to_tensor(read_image(self.files[index])))


def pretrain_transform(image_size: int, min_crop_scale: float) -> v2.Compose:
    """MAE's augmentation: a random resized crop and a flip, then ImageNet normalisation."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_mae(cfg: PretrainConfig):
    """A randomly initialised ``ViTMAEForPreTraining`` of the configured shape."""
    from transformers import ViTMAEForPreTraining

    config = mae_config(
        cfg.backbone, decoder_hidden_size=cfg.decoder_hidden_size,
        decoder_num_hidden_layers=cfg.decoder_layers, decoder_num_attention_heads=cfg.decoder_heads,
        decoder_intermediate_size=cfg.decoder_hidden_size * 4, mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
    )
    return init_mae_embeddings(ViTMAEForPreTraining(config))


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "token" in name else decay).append(param)
    lr = cfg.base_lr * cfg.batch_size / 256
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def _mae_loss(model, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"total": model(pixel_values=batch).loss}


def pretrain(cfg: PretrainConfig, pool: Path, work: Path, progress: bool = True,
             device: str = "auto") -> TrainState:
    """Pretrain an MAE on the images in ``pool``; checkpoints and results go to ``work``.

    If ``work/checkpoint.pt`` exists the run continues from it. At the end the model is saved
    with ``save_pretrained`` in ``work/mae`` (safetensors), loadable like a hub id.
    """
    torch.manual_seed(cfg.seed)
    images = ImageFolder(pool, pretrain_transform(cfg.backbone.image_size, cfg.min_crop_scale))
    if len(images) < cfg.batch_size:
        raise DatasetError(f"{pool}: {len(images)} images, fewer than one batch of {cfg.batch_size}")
    model = build_mae(cfg)
    schedule = Schedule(cfg.steps, cfg.warmup_steps, cfg.grad_clip, cfg.checkpoint_every)
    data = StepData(images, cfg.batch_size, cfg.seed, torch.stack)
    state = fit(model, _optimizer(model, cfg), _mae_loss, data, schedule, work / "checkpoint.pt",
                device=device, progress=progress, desc="MAE pretraining")
    model.cpu().save_pretrained(work / "mae")
    params = sum(p.numel() for p in model.vit.parameters())
    atomic_write_json(work / "train_state.json", {"step": state.step, "seconds": state.seconds,
                                                  "losses": state.losses, "params": params})
    return state


@dataclass(frozen=True)
class Pretrained:
    """The MAE weights detectors start from, and the profile's own pretraining run.

    ``source`` is a folder or a hub id, as :func:`~edgefm.models.vit.load_mae` takes it; ``run``
    is the in-build run's ``save_pretrained`` folder (None if the profile trains none);
    ``fingerprint`` identifies the weights' content, for the cache keys of what is built on them.
    """

    source: str
    run: Path | None
    fingerprint: str
    metrics: dict


def pretrain_metrics(cfg: PretrainConfig, state: TrainState, params: int) -> dict:
    """The stage's figures; first/last losses average 10 steps to smooth batch noise."""
    window = max(1, min(10, len(state.losses) // 4))
    return {
        "loss_first": sum(state.losses[:window]) / window,
        "loss_last": sum(state.losses[-window:]) / window,
        "losses": state.losses, "steps": state.step, "images_seen": state.step * cfg.batch_size,
        "seconds": round(state.seconds, 1), "params": params,
        "images_per_second": round(state.step * cfg.batch_size / max(state.seconds, 1e-9), 1),
    }


def resolve_weights(name: str) -> str:
    """A folder relative to the book's root if one exists there (or an absolute one), else ``name``
    unchanged: a hub id."""
    local = project_root() / Path(name).expanduser()
    return str(local) if local.exists() else name


def fingerprint(source: str) -> str:
    """SHA-256 of a local checkpoint's weights; a hub id stands for itself."""
    path = Path(source) / "model.safetensors"
    if not path.is_file():
        return source
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


@cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """Hashed once per file version: every detector built on the weights asks for it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _own_run(profile: Profile, progress: bool) -> tuple[Path, dict]:
    cfg = profile.pretrain
    pool = ensure_dataset(profile).pool
    key = {"pretrain": replace(cfg, weights=None), "data": profile.data}  # other images, other weights
    target = stage_dir(profile.name, "pretrain", key)
    ensure_dir(target, lambda work: pretrain(cfg, pool, work, progress), config=key)
    saved = json.loads((target / "train_state.json").read_text(encoding="utf-8"))
    state = TrainState(saved["step"], saved["seconds"], saved["losses"])
    return target / "mae", pretrain_metrics(cfg, state, saved["params"])


def ensure_pretrained(profile: Profile | str | None = None, progress: bool = True) -> Pretrained:
    """The profile's MAE: its own run on the unlabeled pool (computed once, resumed if
    interrupted) unless ``steps`` is 0, and the weights detectors use, that run's or ``weights``.

    Writes ``metrics/pretrain.json``: the run's figures, and under ``weights`` the record shipped
    beside the named weights (their command, steps and losses), if there is one.
    """
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    cfg = profile.pretrain
    if cfg.steps <= 0 and not cfg.weights:
        raise ValueError(f"profile {profile.name!r} neither pretrains (steps=0) nor names MAE weights")
    run, metrics = (None, {"steps": 0, "images_seen": 0, "seconds": 0.0})
    if cfg.steps > 0:
        run, metrics = _own_run(profile, progress)
    source = str(run)
    if cfg.weights:
        source = resolve_weights(cfg.weights)
        record = Path(source) / "pretrain.json"
        metrics["weights"] = ({"source": cfg.weights, **json.loads(record.read_text(encoding="utf-8"))}
                              if record.is_file() else {"source": cfg.weights})
    if "params" not in metrics:
        metrics["params"] = sum(p.numel() for p in load_mae(source).parameters())
    metrics = {"source": source, **metrics}
    write_metrics(profile.name, "pretrain", metrics)
    return Pretrained(source, run, fingerprint(source), metrics)


def export_pretrained(pretrained: Pretrained, profile: Profile, out: Path, command: str) -> Path:
    """Copy the profile's own run (a ``save_pretrained`` folder, loadable like a hub id) to
    ``out``, with what made it beside: the configs, the command and the loss log (``pretrain.json``)."""
    if pretrained.run is None:
        raise ValueError(f"profile {profile.name!r} has no pretraining run to export (steps=0)")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        atomic_write_bytes(out / name, (pretrained.run / name).read_bytes())
    figures = {k: v for k, v in pretrained.metrics.items() if k not in ("source", "weights")}
    atomic_write_json(out / "pretrain.json", {
        "command": command, "profile": profile.name,
        "pretrain": plain(replace(profile.pretrain, weights=None)), "data": plain(profile.data), **figures,
    })
    return out


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: back to [0, 1] for display."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (images * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mask ``images`` (normalised, NCHW) at random and let the MAE paint the hidden patches.

    Returns ``original``, ``masked`` (hidden patches blanked) and ``reconstruction`` (visible
    patches kept, hidden ones predicted), all in [0, 1]. With the normalised-pixel loss the model
    predicts each patch up to its mean and variance; as in the MAE paper's figures, those are
    taken from the original patch.
    """
    model.eval()
    count = (images.shape[-1] // model.config.patch_size) ** 2
    noise = torch.rand(images.shape[0], count, generator=torch.Generator().manual_seed(seed))
    output = model(pixel_values=images, noise=noise)
    target = model.patchify(images)
    prediction = output.logits
    if model.config.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        prediction = prediction * (var + 1e-6) ** 0.5 + mean
    hidden = model.unpatchify(output.mask[..., None].expand_as(target))
    predicted = model.unpatchify(prediction)
    return {
        "original": denormalize(images),
        "masked": denormalize(images) * (1 - hidden) + 0.5 * hidden,
        "reconstruction": denormalize(images * (1 - hidden) + predicted * hidden),
    }
