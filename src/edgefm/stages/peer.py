"""The peer: the detector a practitioner would train instead of adapting a foundation model.

People who put a detector on a device mostly train a small single-stage detector on their own
labels. The peer is torchvision's SSDlite with a MobileNetV3-Large backbone (Liu et al., 2016;
Howard et al., 2019), the mobile detector torchvision ships, trained *from scratch* (nothing is
downloaded) on the same labelled scenes, at A's input size, by the same training loop as every
other model here (:func:`edgefm.tools.training.fit`, AdamW and a cosine schedule instead of the
reference recipe's SGD over 600 COCO epochs).

Two departures from ``ssdlite320_mobilenet_v3_large`` as built: the input is A's letterboxed
square (no resize inside), and the anchor scales span the scenes' objects
(:class:`~edgefm.config.PeerConfig` ``min_ratio`` .. ``max_ratio`` of the image; COCO's are 0.2 ..
0.95, which would leave the smallest items without an anchor).

:class:`PeerNetwork` is what runs on a device and what is exported and timed: normalisation,
backbone and head, class logits and box offsets for every anchor. :class:`PeerDecoder` turns them
into detections (softmax, box decoding, per-class NMS; torchvision's own code) outside the timed
graph, as :func:`edgefm.runtime.decode.decode` does for A.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from edgefm.artifacts import atomic_write_json, plain, stage
from edgefm.config import DetectorConfig, PeerConfig, Profile, load_profile
from edgefm.data import DetectionDataset, ensure_dataset
from edgefm.data.coco import CocoDetection, CocoSplit
from edgefm.data.transforms import detection_transforms
from edgefm.stages.finetune import config_differences, weights_root
from edgefm.tools.bench import count_flops
from edgefm.tools.evaluate import BOOTSTRAP, evaluate_split, gap_interval, interval_verdict, torch_runner
from edgefm.tools.export import export_onnx
from edgefm.tools.training import Schedule, StepData, TrainState, fit, loss_gaps, save_weights

WEIGHTS, ONNX_FILE = "model.safetensors", "peer.onnx"
FEATURE_MAPS = 6  # SSDlite's: two from the backbone, four extra blocks


def build_peer(num_classes: int, detector: DetectorConfig, cfg: PeerConfig) -> SSD:
    """SSDlite-MobileNetV3-Large for ``num_classes`` (plus background), randomly initialised the way
    torchvision initialises it without pretrained weights, for A's square input; it keeps as many
    detections per image, above the same score, as A's decoder."""
    image_size = detector.image_size
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                          score_thresh=detector.score_threshold,
                                          detections_per_img=detector.max_detections)
    model.anchor_generator = DefaultBoxGenerator([[2, 3]] * FEATURE_MAPS, min_ratio=cfg.min_ratio,
                                                 max_ratio=cfg.max_ratio)
    model.transform = GeneralizedRCNNTransform(image_size, image_size, [0.5] * 3, [0.5] * 3,
                                               size_divisible=1, fixed_size=(image_size, image_size))
    model.image_size = image_size
    return model


class PeerNetwork(nn.Module):
    """The peer's network: images (B, 3, S, S) in [0, 1] -> class logits (B, anchors, classes + 1)
    and box offsets (B, anchors, 4). It normalises as the SSD's transform does (to [-1, 1])."""

    def __init__(self, ssd: SSD):
        super().__init__()
        self.ssd = ssd

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = list(self.ssd.backbone(images * 2.0 - 1.0).values())
        out = self.ssd.head(features)
        return out["cls_logits"], out["bbox_regression"]


class PeerDecoder:
    """Detections from :class:`PeerNetwork`'s raw outputs (NumPy, batch first), by torchvision's
    ``SSD.postprocess_detections``: per image XYXY ``boxes`` in input pixels, ``scores`` and
    ``labels`` (0 .. C-1, as :func:`edgefm.runtime.decode.decode` gives them)."""

    def __init__(self, ssd: SSD):
        self.ssd, size, training = ssd, ssd.image_size, ssd.training
        images = torch.zeros(1, 3, size, size, device=next(ssd.parameters()).device)
        with torch.no_grad():  # the anchors depend on the feature maps' sizes only
            features = list(ssd.eval().backbone(images).values())
            self.anchors = ssd.anchor_generator(ImageList(images, [(size, size)]), features)[0].cpu()
        ssd.train(training)

    def __call__(self, cls_logits: np.ndarray, bbox_regression: np.ndarray) -> list[dict[str, np.ndarray]]:
        batch, size = len(cls_logits), self.ssd.image_size
        head = {"cls_logits": torch.as_tensor(np.asarray(cls_logits, dtype=np.float32)),
                "bbox_regression": torch.as_tensor(np.asarray(bbox_regression, dtype=np.float32))}
        with torch.no_grad():
            found = self.ssd.postprocess_detections(head, [self.anchors] * batch, [(size, size)] * batch)
        return [{"boxes": f["boxes"].numpy(), "scores": f["scores"].numpy(),
                 "labels": f["labels"].numpy() - 1} for f in found]


def peer_collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images and targets as torchvision's detectors take them: class 0 is the background."""
    images, targets = zip(*batch, strict=True)
    return ([torch.as_tensor(image) for image in images],
            [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"] + 1} for t in targets])


def evaluate_peer(ssd: SSD, split: CocoSplit, detector: DetectorConfig, bootstrap: int = 0,
                  samples: bool = False) -> dict:
    """COCO metrics of the peer in PyTorch on ``split``, through the same evaluation as A
    (``samples``: keep the resampled mAPs, for a paired gap)."""
    return evaluate_split(torch_runner(PeerNetwork(ssd)), split, detector, decoder=PeerDecoder(ssd),
                          bootstrap=bootstrap, samples=samples)


def train_peer(cfg: PeerConfig, dataset: DetectionDataset, detector: DetectorConfig, work: Path,
               progress: bool = True, device: str = "auto", stop: int = 0) -> tuple[SSD, TrainState]:
    """Train the peer on ``dataset.train`` from scratch (validating on ``dataset.val`` every
    ``cfg.eval_every`` steps); resumes from ``work/checkpoint.pt``; weights to ``work``.
    ``stop`` > 0 ends the run after that many steps of its schedule (its start, re-traced)."""
    torch.manual_seed(cfg.seed)
    size = detector.image_size
    train = CocoDetection(dataset.train, detection_transforms(size, train=True))
    model = build_peer(len(train.class_names), detector, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = Schedule(cfg.steps, cfg.warmup_steps, cfg.grad_clip, cfg.checkpoint_every, cfg.eval_every,
                        stop=stop)

    def loss(model: SSD, batch) -> dict[str, torch.Tensor]:
        losses = model(*batch)
        return {"total": sum(losses.values()), **losses}

    def validate(model: SSD) -> dict:
        metrics = evaluate_peer(model, dataset.val, detector)
        return {"map": metrics["map"], "map50": metrics["map50"]}

    state = fit(model, optimizer, loss, StepData(train, cfg.batch_size, cfg.seed, peer_collate), schedule,
                work / "checkpoint.pt", device=device, validate=validate if dataset.val is not None else None,
                progress=progress, desc="training the peer (SSDlite)")
    model.cpu().eval()
    save_weights(model, work / WEIGHTS)
    atomic_write_json(work / "train_state.json", asdict(state))
    return model, state


def load_peer(folder: Path, num_classes: int, detector: DetectorConfig, cfg: PeerConfig) -> SSD:
    """The peer saved in ``folder`` by :func:`train_peer`, in eval mode."""
    model = build_peer(num_classes, detector, cfg)
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no peer weights here; train it with `edgefm peer`")
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as error:
        raise ValueError(f"{path}: these weights are not this peer's ({error})") from error
    return model.eval()


SHIP_COMMAND = "edgefm --profile {profile} peer --ship"
RETRACE_STEPS = 100  # steps a build trains again to check a shipped peer's start
RUNS = ("base", "longer")  # the peer's schedule, and the same one longer (Profile.peer_longer_factor)


def longer_peer(profile: Profile) -> PeerConfig:
    """The peer's schedule ``profile.peer_longer_factor`` times as long, with the same warm-up."""
    cfg = profile.peer
    return replace(cfg, steps=max(1, round(cfg.steps * profile.peer_longer_factor)))


def peer_key(profile: Profile, cfg: PeerConfig | None = None) -> dict:
    """What a peer run's result depends on: its settings (default: the profile's), A's input and
    decoding, the scenes."""
    return {"peer": profile.peer if cfg is None else cfg, "detector": profile.finetune.detector,
            "data": profile.data}


def shipped_peer(profile: Profile, run: str = "base") -> Path:
    """Where the book ships a peer run too long to train in the build: ``weights/peer-<profile>``,
    the longer schedule in its ``longer`` folder."""
    folder = weights_root() / f"peer-{profile.name}"
    return folder if run == "base" else folder / run


def training_flops(flops: int, images: int) -> float:
    """A run's compute, by the usual estimate: a backward pass costs twice a forward one."""
    return 3.0 * flops * images


def ensure_peer(profile: Profile | str | None = None, progress: bool = True) -> dict:
    """The peer trained (or read from :func:`shipped_peer` when its config matches), beside it the
    same schedule longer, the one to deploy chosen on val (:func:`longer_check`), evaluated on the
    eval scenes with a bootstrap interval and exported to ONNX (``peer.onnx``). Cached; writes
    ``metrics/peer.json``; returns the results with ``folder``."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    key = {**peer_key(profile), "longer_factor": profile.peer_longer_factor}
    return stage(profile.name, "peer", key, lambda work: _build(work, profile, progress))


def _shipped_state(profile: Profile, run: str, cfg: PeerConfig, work: Path) -> TrainState | None:
    """Copy the shipped peer ``run`` into ``work`` if it was made with ``cfg``; its training history."""
    folder = shipped_peer(profile, run)
    if not (folder / "config.json").is_file():
        return None
    made = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    differences = config_differences(made, json.loads(json.dumps(plain(peer_key(profile, cfg)), default=str)))
    if differences:
        print(f"note: {folder} was made with other settings than profile {profile.name!r}'s "
              f"({', '.join(differences)}); training the peer here")
        return None
    missing = [name for name in (WEIGHTS, "train_state.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: lacks {', '.join(missing)}; ship the peer again with "
                                f"`{SHIP_COMMAND.format(profile=profile.name)}` or delete the folder")
    shutil.copyfile(folder / WEIGHTS, work / WEIGHTS)
    return TrainState(**json.loads((folder / "train_state.json").read_text(encoding="utf-8")))


def _run(profile: Profile, run: str, cfg: PeerConfig, dataset: DetectionDataset, classes: int, work: Path,
         progress: bool) -> dict:
    """One of the peer's runs, in ``work/<run>``: read from its shipped copy, else trained there."""
    folder = work / run
    folder.mkdir(exist_ok=True)
    detector = profile.finetune.detector
    state = _shipped_state(profile, run, cfg, folder)
    shipped = state is not None
    if shipped:
        model = load_peer(folder, classes, detector, cfg)
    else:
        model, state = train_peer(cfg, dataset, detector, folder, progress)
    atomic_write_json(folder / "train_state.json", asdict(state))
    atomic_write_json(folder / "config.json", plain(peer_key(profile, cfg)))  # what ship_peer copies
    return {"cfg": cfg, "model": model, "state": state, "shipped": shipped}


def _build(work: Path, profile: Profile, progress: bool) -> dict:
    dataset, detector = ensure_dataset(profile), profile.finetune.detector
    classes = CocoDetection(dataset.train).class_names
    configs = {"base": profile.peer}
    if profile.peer_longer_factor and dataset.val is not None:  # the choice needs val scenes
        configs["longer"] = longer_peer(profile)
    runs = {run: _run(profile, run, cfg, dataset, len(classes), work, progress)
            for run, cfg in configs.items()}
    retraces = retrace(profile, dataset, runs, work)
    check = longer_check(runs["base"]["model"], runs["longer"]["model"], dataset.val, detector) \
        if "longer" in runs else None
    chosen = check["chosen"] if check else "base"
    model = runs[chosen]["model"]
    shutil.copyfile(work / chosen / WEIGHTS, work / WEIGHTS)  # the deployed peer (load_peer(folder))
    network = PeerNetwork(model)
    export_onnx(network, work / ONNX_FILE, detector.image_size)
    flops = count_flops(network, detector.image_size)

    def summary(run: str) -> dict:
        state, batch = runs[run]["state"], runs[run]["cfg"].batch_size
        return {"steps": state.step, "val_curve": [[e["step"], e["map"]] for e in state.evals],
                "end_loss": end_loss(state.losses),
                "train_seconds": state.seconds, "train_images": state.step * batch,
                "train_flops": training_flops(flops, state.step * batch), "shipped": runs[run]["shipped"],
                "retrace": retraces.get(run)}

    metrics = evaluate_peer(model, dataset.eval, detector, bootstrap=BOOTSTRAP)
    return {"eval": metrics, "run": chosen, **summary(chosen), "runs": {run: summary(run) for run in runs},
            "longer_check": check, "flops": flops, "params": sum(p.numel() for p in model.parameters()),
            "classes": classes, "ship_command": SHIP_COMMAND.format(profile=profile.name)}


def end_loss(losses: list[float]) -> float:
    """A run's training loss at its end: the mean over its last 5 % of steps (one step is noisy)."""
    return float(np.mean(losses[-max(1, len(losses) // 20):]))


def longer_check(base: SSD, longer: SSD, split: CocoSplit, detector: DetectorConfig) -> dict:
    """The longer schedule against the peer's own on ``split`` (val), paired over the same
    resampled images: the longer one is deployed only if it is shown better (the interval of its
    gap above zero), since a practitioner would not pay for compute that does not pay."""
    scores = {run: evaluate_peer(model, split, detector, bootstrap=BOOTSTRAP, samples=True)
              for run, model in zip(RUNS, (base, longer), strict=True)}
    interval = [100 * v for v in gap_interval(scores["longer"]["map_samples"], scores["base"]["map_samples"])]
    verdict = interval_verdict(interval, "longer better", "longer worse")
    return {"val_map": {run: scores[run]["map"] for run in RUNS},
            "gap": 100 * (scores["longer"]["map"] - scores["base"]["map"]), "gap_ci": interval,
            "verdict": verdict, "chosen": "longer" if verdict == "longer better" else "base"}


def retrace(profile: Profile, dataset: DetectionDataset, runs: dict[str, dict],
            work: Path) -> dict[str, dict]:
    """Train the first :data:`RETRACE_STEPS` steps of each shipped peer run again, here: same seed,
    same batches, so their losses should follow the shipped ones (to the rounding of another CPU's
    arithmetic); a large gap means the shipped run was made otherwise. In its warm-up a schedule's
    length changes nothing, so one live run serves every schedule whose warm-up it stays within."""
    live: dict[tuple, list[float]] = {}
    gaps = {}
    for run, record in runs.items():
        if not record["shipped"]:
            continue
        cfg, start = record["cfg"], retraced_start(record["cfg"])
        if start not in live:
            with tempfile.TemporaryDirectory(dir=work) as folder:
                _, state = train_peer(cfg, dataset, profile.finetune.detector, Path(folder), progress=False,
                                      stop=start[1])
            live[start] = state.losses
        gaps[run] = loss_gaps(live[start], record["state"].losses)
    return gaps


def retraced_start(cfg: PeerConfig) -> tuple[PeerConfig, int]:
    """What a re-trace of a run with ``cfg`` trains: the settings that shape its first steps and how
    many it trains. Within the warm-up the schedule's length changes nothing, so it is left out."""
    steps = min(RETRACE_STEPS, cfg.steps)
    return (replace(cfg, steps=0) if steps <= cfg.warmup_steps else cfg), steps


def ship_peer(profile: Profile | str | None = None) -> Path:
    """Copy each of the peer's runs (weights, history, config) to :func:`shipped_peer`, with the
    command that made them, so a build reads them instead of training."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    work = Path(ensure_peer(profile)["folder"])
    for run in RUNS:
        if not (work / run).is_dir():
            continue
        target = shipped_peer(profile, run)
        target.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS, "train_state.json", "config.json"):
            shutil.copyfile(work / run / name, target / name)
        atomic_write_json(target / "made_by.json", {"command": SHIP_COMMAND.format(profile=profile.name)})
    return shipped_peer(profile)
