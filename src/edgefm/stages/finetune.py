"""Fine-tuning the detector on labelled scenes: the feasibility model A and its baselines.

The backbone starts from the MAE encoder (through the adapter) or from random weights; the
pyramid and head always start random. AdamW with warm-up and cosine decay, layer-wise
learning-rate decay for a pretrained encoder, flips and colour jitter, gradient clipping, a
validation mAP every ``eval_every`` steps, and checkpoints from which a killed run continues
exactly (:mod:`edgefm.tools.training`). The final weights are saved with safetensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from edgefm.artifacts import (
    atomic_write_bytes,
    atomic_write_json,
    ensure_dir,
    plain,
    project_root,
    stage_dir,
)
from edgefm.config import WEIGHTS_ENV, BackboneConfig, DetectorConfig, FinetuneConfig, Profile, load_profile
from edgefm.data import DetectionDataset, ensure_dataset
from edgefm.data.coco import CocoDetection
from edgefm.data.transforms import detection_transforms
from edgefm.models.centernet import EncodeTargets, centernet_loss
from edgefm.models.detector import Detector
from edgefm.models.vit import load_mae_backbone, random_mae_backbone
from edgefm.tools.evaluate import evaluate_split, torch_runner
from edgefm.tools.training import (
    CheckpointError,
    Schedule,
    StepData,
    TrainState,
    fit,
    resolve_device,
    save_weights,
)

WEIGHTS = "model.safetensors"
INITS = ("mae", "random")


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
    """AdamW parameter groups: ViT block ``i`` of ``L`` (from 1 at the input) gets
    ``lr * layer_decay ** (L + 1 - i)``, the embeddings ``layer_decay ** (L + 1)``, the rest
    (final norm, pyramid, head) ``lr``. Biases, norms, tokens and position embeddings get no
    weight decay."""
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


def finetune(cfg: FinetuneConfig, backbone: BackboneConfig, dataset: DetectionDataset, work: Path,
             mae_source: str | None = None, progress: bool = True, device: str = "auto",
             workers: int | None = None) -> TrainState:
    """Train a detector on ``dataset.train`` (validating on ``dataset.val``); outputs go to ``work``.

    ``cfg.stop_after`` > 0 stops the run after that many steps of its schedule (the start of a
    long run, re-traced); the weights are then those of that step."""
    torch.manual_seed(cfg.seed)
    train = CocoDetection(dataset.train, detection_transforms(cfg.detector.image_size, train=True))
    model = build_detector(cfg.detector, backbone, len(train.class_names), mae_source)
    decay = cfg.layer_decay if mae_source is not None else 1.0
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.lr, decay, cfg.weight_decay))
    data = StepData(train, cfg.batch_size, cfg.seed, EncodeTargets(model.num_classes, model.stride),
                    label_subset(len(train), cfg.label_fraction, cfg.seed).tolist())
    schedule = Schedule(cfg.steps, cfg.warmup_steps, cfg.grad_clip, cfg.checkpoint_every, cfg.eval_every,
                        stop=cfg.stop_after)

    def loss(model: Detector, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        return centernet_loss(model(images), targets, model.stride)

    def validate(model: Detector) -> dict:
        metrics = evaluate_split(torch_runner(model), dataset.val, cfg.detector, model.stride)
        return {"map": metrics["map"], "map50": metrics["map50"]}

    state = fit(model, optimizer, loss, data, schedule, work / "checkpoint.pt", device=device,
                workers=workers, validate=validate if dataset.val is not None else None,
                progress=progress, desc=f"fine-tuning ({cfg.init})")
    save_weights(model, work / WEIGHTS)
    atomic_write_json(work / "train_state.json", asdict(state))
    atomic_write_json(work / "classes.json", train.class_names)
    return state


@dataclass(frozen=True)
class Finetuned:
    """A trained detector's folder, how it was made, and its training history. ``shipped`` is
    True when the folder is a result shipped with the book (``weights/``), not trained here."""

    path: Path
    config: FinetuneConfig
    backbone: BackboneConfig
    class_names: list[str]
    state: TrainState
    shipped: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def identity(self) -> str:
        """What results built on this detector are keyed by: its stage key, or for a shipped one
        its weights' hash (a folder name would survive new weights)."""
        if not self.shipped:
            return self.path.name
        from edgefm.stages.pretrain import fingerprint

        return f"shipped-{fingerprint(str(self.path))[:12]}"


def _read_finetuned(path: Path, cfg: FinetuneConfig, backbone: BackboneConfig, shipped: bool) -> Finetuned:
    saved = json.loads((path / "train_state.json").read_text(encoding="utf-8"))
    class_names = json.loads((path / "classes.json").read_text(encoding="utf-8"))
    return Finetuned(path, cfg, backbone, class_names, TrainState(**saved), shipped)


def config_differences(made: object, wanted: object, prefix: str = "") -> list[str]:
    """The dotted names of the fields where two configs (plain JSON data) differ."""
    if isinstance(made, dict) and isinstance(wanted, dict):
        return [d for key in sorted(set(made) | set(wanted))
                for d in config_differences(made.get(key), wanted.get(key), f"{prefix}{key}.")]
    if isinstance(made, (list, tuple)) and isinstance(wanted, (list, tuple)):
        made, wanted = list(made), list(wanted)
    return [] if made == wanted else [prefix.rstrip(".")]


def weights_root() -> Path:
    """The folder of results shipped with the book: ``$EDGEFM_WEIGHTS``, else ``weights/``."""
    if env := os.environ.get(WEIGHTS_ENV):
        return Path(env).expanduser().resolve()
    return project_root() / "weights"


def shipped_folder(profile: Profile, init: str) -> Path:
    """Where the detector of the profile's recipe for ``init`` is shipped (it may not be)."""
    return weights_root() / (f"a-{profile.name}" if init == "mae" else f"a-{init}-{profile.name}")


def shipped_detector(profile: Profile, init: str, key: dict, announce: bool) -> Path | None:
    """The shipped detector for ``init`` (:func:`shipped_folder`) if it was made with exactly ``key``.

    A shipped result that is missing, or whose config differs (another recipe, other data, other
    MAE weights), is not used: with ``announce`` the reason is printed, and the caller trains."""
    path = shipped_folder(profile, init)
    if not (path / WEIGHTS).is_file() or not (path / "config.json").is_file():
        if announce and profile.shipped:
            print(f"note: no shipped detector in {path}; training the {init}-init detector here instead")
        return None
    made = json.loads((path / "config.json").read_text(encoding="utf-8"))
    differences = config_differences(made, json.loads(json.dumps(plain(key), default=str)))
    if differences:
        if announce:
            print(f"note: the shipped detector in {path} was made with another config (differs in: "
                  f"{', '.join(differences)}); training the {init}-init detector here instead")
        return None
    return path


def finetune_key(profile: Profile, cfg: FinetuneConfig, progress: bool = True) -> tuple[dict, str | None]:
    """A fine-tuning run's stage key (its config, the data, the backbone and, from MAE, the
    weights' content), and the MAE weights it starts from (None: random init)."""
    key: dict = {"finetune": cfg, "data": profile.data, "backbone": profile.pretrain.backbone}
    if cfg.init != "mae":
        return key, None
    from edgefm.stages.pretrain import ensure_pretrained, fingerprint, resolve_weights

    if profile.pretrain.weights:  # named weights: the profile's own (illustrative) run is not needed
        source = resolve_weights(profile.pretrain.weights)
    else:
        source = ensure_pretrained(profile, progress=progress).source
    key["mae_weights"] = fingerprint(source)
    return key, source


def ensure_finetuned(profile: Profile | str | None = None, init: str | None = None,
                     label_fraction: float | None = None, progress: bool = True, device: str = "auto",
                     workers: int | None = None, **overrides) -> Finetuned:
    """The profile's detector for an ``init`` and label fraction (default: the profile's), trained
    once and cached; ``overrides`` replace other :class:`FinetuneConfig` fields (``seed``,
    ``steps``). The profile's own recipe comes from ``weights/`` when a result made with exactly
    this config is shipped there. ``device`` and ``workers`` change speed, never the key."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    cfg = replace(profile.finetune, init=init or profile.finetune.init,
                  label_fraction=label_fraction or profile.finetune.label_fraction, **overrides)
    if cfg.init not in INITS:
        raise ValueError(f"unknown init {cfg.init!r}; use 'mae' or 'random'")
    key, mae_source = finetune_key(profile, cfg, progress)
    backbone = profile.pretrain.backbone
    own_recipe = cfg == replace(profile.finetune, init=cfg.init)
    if (shipped := shipped_detector(profile, cfg.init, key, announce=own_recipe)) is not None:
        return _read_finetuned(shipped, cfg, backbone, shipped=True)
    dataset = ensure_dataset(profile)
    target = stage_dir(profile.name, "finetune", key)
    ensure_dir(target, lambda work: finetune(cfg, backbone, dataset, work, mae_source, progress, device,
                                             workers), config=key)
    return _read_finetuned(target, cfg, backbone, shipped=False)


def export_finetuned(trained: Finetuned, out: Path, command: str, device: str) -> Path:
    """Copy a trained detector to ``out`` as the book ships it: weights (safetensors), the config
    it was made with (its stage key), class names, loss and validation history, and
    ``made_by.json``: the command that reproduces it and where it ran."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, "config.json", "classes.json", "train_state.json"):
        atomic_write_bytes(out / name, (trained.path / name).read_bytes())
    state = trained.state
    images = state.step * trained.config.batch_size
    where = resolve_device(device)
    if where.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(where)})"
    atomic_write_json(out / "made_by.json", {
        "command": command, "device": str(where), "torch": torch.__version__, "steps": state.step,
        "images_seen": images, "seconds": round(state.seconds, 1),
        "images_per_second": round(images / max(state.seconds, 1e-9), 1),
    })
    return out


def load_detector(trained: Finetuned) -> Detector:
    """The trained detector, in eval mode, from its safetensors weights."""
    model = build_detector(trained.config.detector, trained.backbone, trained.num_classes)
    path = trained.path / WEIGHTS
    try:
        model.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"{path}: cannot load detector weights ({error})") from error
    return model.eval()
