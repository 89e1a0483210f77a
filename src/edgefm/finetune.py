"""Fine-tuning the detector on labelled scenes: the feasibility model A and its baselines.

The backbone starts from the MAE encoder (through the adapter) or from random weights; the
pyramid and head always start random. AdamW with warm-up and cosine decay, layer-wise
learning-rate decay for a pretrained encoder, flips and colour jitter, gradient clipping, a
validation mAP every ``eval_every`` steps, and checkpoints from which a killed run continues
exactly (:mod:`edgefm.training`). The final weights are saved with safetensors.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from edgefm.artifacts import atomic_path, atomic_write_json, ensure_dir, stage_dir
from edgefm.config import BackboneConfig, DetectorConfig, FinetuneConfig, Profile, load_profile
from edgefm.data import DetectionDataset, ensure_dataset
from edgefm.data.coco import CocoDetection, collate
from edgefm.data.transforms import detection_transforms
from edgefm.evaluate import evaluate_split
from edgefm.models.centernet import centernet_loss, centernet_targets
from edgefm.models.detector import Detector
from edgefm.models.vit import load_mae_backbone, random_mae_backbone
from edgefm.training import (
    CheckpointError,
    TrainState,
    batch_indices,
    cosine_with_warmup,
    load_checkpoint,
    save_checkpoint,
)

WEIGHTS = "model.safetensors"


def build_detector(cfg: DetectorConfig, backbone: BackboneConfig, num_classes: int,
                   mae_source: str | None = None) -> Detector:
    """A detector whose backbone is the MAE encoder at ``mae_source``, or the same encoder
    untrained (:func:`~edgefm.models.vit.random_mae_backbone`) if None."""
    if mae_source is not None:
        vit_backbone = load_mae_backbone(mae_source, image_size=cfg.image_size)
    else:
        vit_backbone = random_mae_backbone(backbone, image_size=cfg.image_size)
    return Detector(vit_backbone, num_classes, cfg.channels, cfg.scales, cfg.head_hidden)


def layer_decay_groups(model: Detector, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ViT block ``i`` of ``L`` gets ``lr * layer_decay ** (L - i)``, the
    embeddings ``layer_decay ** (L + 1)``, the rest (final norm, pyramid, head) ``lr``. Biases,
    norms, tokens and position embeddings get no weight decay."""
    depth = len(model.backbone.vit.blocks)
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if name.startswith("backbone.vit.blocks."):
            layer = int(name.split(".")[3]) + 1
        elif name.startswith(tuple(f"backbone.vit.{n}" for n in ("patch_embed", "cls_token", "pos_embed"))):
            layer = 0
        else:
            layer = depth + 1
        no_decay = param.ndim < 2 or name.endswith(("cls_token", "pos_embed"))
        key = (lr * layer_decay ** (depth + 1 - layer), 0.0 if no_decay else weight_decay)
        groups.setdefault(key, []).append(param)
    return [{"params": ps, "lr": group_lr, "weight_decay": wd} for (group_lr, wd), ps in groups.items()]


def label_subset(count: int, fraction: float, seed: int) -> torch.Tensor:
    """The first ``fraction`` of a seeded permutation: nested subsets across fractions."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[: max(1, round(fraction * count))]


def torch_runner(model: torch.nn.Module):
    """Wrap a PyTorch detector as :data:`edgefm.runtime.RunModel` (NumPy in, NumPy out)."""

    @torch.no_grad()
    def run(images):
        model.eval()
        return tuple(o.numpy() for o in model(torch.from_numpy(images)))

    return run


def finetune(cfg: FinetuneConfig, backbone: BackboneConfig, dataset: DetectionDataset, work: Path,
             mae_source: str | None = None, progress: bool = True) -> TrainState:
    """Train a detector on ``dataset.train`` (validating on ``dataset.val``); outputs go to ``work``."""
    torch.manual_seed(cfg.seed)
    size = cfg.detector.image_size
    train = CocoDetection(dataset.train, detection_transforms(size, train=True))
    subset = label_subset(len(train), cfg.label_fraction, cfg.seed)
    model = build_detector(cfg.detector, backbone, len(train.class_names), mae_source).train()
    decay = cfg.layer_decay if mae_source is not None else 1.0
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.lr, decay, cfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.warmup_steps, cfg.steps))
    checkpoint = work / "checkpoint.pt"
    state = load_checkpoint(checkpoint, model, optimizer, scheduler) if checkpoint.exists() else TrainState()
    out_size = (round(size / model.stride),) * 2
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"fine-tuning ({cfg.init})", disable=not progress)
    while state.step < cfg.steps:
        start = time.perf_counter()
        chosen = subset[batch_indices(state.step, cfg.batch_size, len(subset), cfg.seed)]
        images, targets = collate([train[int(i)] for i in chosen])
        encoded = [centernet_targets(t["boxes"], t["labels"], model.num_classes, out_size, model.stride)
                   for t in targets]
        losses = centernet_loss(model(images), encoded, model.stride)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        state.step += 1
        state.seconds += time.perf_counter() - start
        state.losses.append(round(losses["total"].item(), 5))
        bar.update()
        bar.set_postfix(loss=f"{losses['total'].item():.3f}")
        if dataset.val is not None and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
            metrics = evaluate_split(torch_runner(model), dataset.val, cfg.detector, model.stride)
            state.evals.append({"step": state.step, "map": metrics["map"], "map50": metrics["map50"]})
            model.train()
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            save_checkpoint(checkpoint, model, optimizer, scheduler, state)
    bar.close()
    with atomic_path(work / WEIGHTS) as tmp:
        save_file(model.state_dict(), str(tmp))
    atomic_write_json(work / "train_state.json", asdict(state))
    atomic_write_json(work / "classes.json", train.class_names)
    return state


@dataclass(frozen=True)
class Finetuned:
    """A trained detector's folder, how it was made, and its training history."""

    path: Path
    config: FinetuneConfig
    backbone: BackboneConfig
    class_names: list[str]
    state: TrainState

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def ensure_finetuned(profile: Profile | str | None = None, init: str | None = None,
                     label_fraction: float | None = None, progress: bool = True,
                     **overrides) -> Finetuned:
    """The profile's detector for an ``init`` and label fraction (default: the profile's), trained
    once and cached; ``overrides`` replace other :class:`FinetuneConfig` fields (``seed``,
    ``steps``). The key covers the MAE weights' content too when they are used."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    cfg = replace(profile.finetune, init=init or profile.finetune.init,
                  label_fraction=label_fraction or profile.finetune.label_fraction, **overrides)
    if cfg.init not in ("mae", "random"):
        raise ValueError(f"unknown init {cfg.init!r}; use 'mae' or 'random'")
    dataset = ensure_dataset(profile)
    mae_source, key = None, {"finetune": cfg, "data": profile.data, "backbone": profile.pretrain.backbone}
    if cfg.init == "mae":
        from edgefm.pretrain import ensure_pretrained

        pretrained = ensure_pretrained(profile, progress=progress)
        mae_source, key["mae_weights"] = pretrained.source, pretrained.fingerprint
    target = stage_dir(profile.name, "finetune", key, "edgefm.finetune")
    backbone = profile.pretrain.backbone
    ensure_dir(target, lambda work: finetune(cfg, backbone, dataset, work, mae_source, progress), config=key)
    saved = json.loads((target / "train_state.json").read_text(encoding="utf-8"))
    class_names = json.loads((target / "classes.json").read_text(encoding="utf-8"))
    return Finetuned(target, cfg, backbone, class_names, TrainState(**saved))


def load_detector(trained: Finetuned) -> Detector:
    """The trained detector, in eval mode, from its safetensors weights."""
    model = build_detector(trained.config.detector, trained.backbone, trained.num_classes)
    path = trained.path / WEIGHTS
    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"{path}: cannot load detector weights ({error})") from error
    return model.eval()
