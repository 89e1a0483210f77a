"""Model A measured: the machine, its GEMM ceiling, and where A's time and FLOPs go, per block.

This is the reference every later variant is compared with. The profile times each block of one
batch-1 forward pass with hooks (:func:`~edgefm.tools.bench.block_times`) and counts its FLOPs with
``torch.utils.flop_counter``; achieved GFLOP/s against the FP32 ceiling says which blocks run
near the hardware's limit and which are held back by memory traffic or overheads.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from edgefm.artifacts import stage
from edgefm.config import Profile, load_profile
from edgefm.data import ensure_dataset
from edgefm.models.detector import Detector
from edgefm.stages.finetune import Finetuned, ensure_finetuned, load_detector
from edgefm.tools.bench import benchmark, block_times, module_variant
from edgefm.tools.evaluate import evaluate_split


def detector_blocks(model: Detector) -> dict[str, torch.nn.Module]:
    """The detector's parts in execution order, named for a table."""
    vit = model.backbone.vit
    return {"patch embedding": vit.patch_embed, **{f"ViT block {i}": b for i, b in enumerate(vit.blocks)},
            "pyramid": model.pyramid, "head": model.head}


def block_flops(model: Detector, blocks: dict[str, torch.nn.Module], image_size: int) -> dict[str, int]:
    """FLOPs of one image in each block (``FlopCounterMode`` counts per module path)."""
    paths = {module: name for name, module in model.named_modules()}
    root = type(model).__name__
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.rand(1, 3, image_size, image_size))
    counts = counter.get_flop_counts()
    return {name: int(sum(counts.get(f"{root}.{paths[block]}", {}).values()))
            for name, block in blocks.items()}


def _build(profile: Profile, trained: Finetuned) -> dict:
    model, cfg = load_detector(trained), trained.config.detector
    size, settings = cfg.image_size, profile.quantize.bench
    variant = module_variant(model, size)
    split = ensure_dataset(profile).eval
    results = benchmark([variant], size, settings,
                        lambda v: evaluate_split(v.runner(2), split, cfg, model.stride))
    blocks = detector_blocks(model)
    flops = block_flops(model, blocks, size)
    profiles = {t: block_times(model, blocks, size, threads=t, runs=settings.runs) for t in settings.threads}
    results["blocks"] = [
        {"block": name, "flops": flops.get(name, 0),
         **{f"ms_{t}t": profiles[t][name] for t in settings.threads}}
        for name in (*blocks, "other")
    ]
    results["total_ms"] = {f"{t}t": profiles[t]["total"] for t in settings.threads}
    return results


def ensure_measuring(profile: Profile | str | None = None, progress: bool = True) -> dict:
    """Benchmark A alone (with the ceiling and the machine) and profile it per block; cached, like
    every timing of the book, under A's identity and the benchmark's settings; writes the metrics."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    trained = ensure_finetuned(profile, progress=progress)
    key = {"bench": profile.quantize.bench, "model_a": trained.identity, "data": profile.data}
    return stage(profile.name, "measuring", key, lambda work: _build(profile, trained))
