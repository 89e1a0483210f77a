"""The ``full`` profile at ViT-B shapes, offline: ``facebook/vit-mae-base``'s configuration with
random weights, written by ``save_pretrained`` and read back through the loading code the hub id
takes, on Penn-Fudan-format images, from fine-tuning through ONNX, INT8 and the bundle.

The step counts and held-out splits are shrunk; the shapes (768 wide, 12 blocks, 16-pixel patches,
512-pixel inputs: 1,024 tokens) are the real ones. Run alone with ``pytest -k full_profile``.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from edgefm.config import load_profile
from edgefm.data import ensure_dataset
from edgefm.runtime import EdgeDetector, open_session
from edgefm.stages.finetune import ensure_finetuned, load_detector
from edgefm.stages.quantization import RECIPES
from edgefm.tools.bundle import write_bundle
from edgefm.tools.export import export_onnx
from edgefm.tools.quantize import CalibrationScenes, preprocess, quantize

# facebook/vit-mae-base's config.json (encoder and decoder), as published on the hub
VIT_MAE_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    image_size=224, patch_size=16, qkv_bias=True, decoder_hidden_size=512,
                    decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                    decoder_intermediate_size=2048, mask_ratio=0.75, norm_pix_loss=False)


def pedestrians(root, count=6):
    """Penn-Fudan's layout: ``PNGImages`` and instance masks, photo-sized, two people each."""
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
        mask = np.zeros((300, 420), np.uint8)
        mask[40:260, 60:140], mask[80:290, 250:330] = 1, 2
        image[mask > 0] //= 3
        Image.fromarray(image).save(root / "PNGImages" / f"FudanPed{i:05d}.png")
        Image.fromarray(mask).save(root / "PedMasks" / f"FudanPed{i:05d}_mask.png")
    return root


@pytest.fixture
def vit_b_profile(tmp_path, monkeypatch):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    mae = tmp_path / "vit-mae-base"
    ViTMAEForPreTraining(ViTMAEConfig(**VIT_MAE_BASE)).save_pretrained(mae)
    monkeypatch.setenv("EDGEFM_PENNFUDAN", str(pedestrians(tmp_path / "PennFudanPed")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the network (read at import,
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # so set where it is kept)
    full = load_profile("full")
    return replace(full, data=replace(full.data, val_scenes=1, eval_scenes=1),
                   pretrain=replace(full.pretrain, weights=str(mae)),
                   finetune=replace(full.finetune, steps=2, batch_size=2, warmup_steps=1, eval_every=2,
                                    checkpoint_every=2))


@pytest.mark.full_profile
def test_full_profile_at_vit_b_shapes_runs_offline_to_an_int8_bundle(vit_b_profile, tmp_path):
    from safetensors.torch import load_file

    from edgefm.models.vit import load_mae_backbone

    profile = vit_b_profile
    saved = load_file(f"{profile.pretrain.weights}/model.safetensors")
    backbone = load_mae_backbone(profile.pretrain.weights, image_size=512)  # what a hub id goes through
    patches = next(v for k, v in saved.items() if k.endswith("patch_embeddings.projection.weight"))
    assert torch.equal(backbone.vit.patch_embed.proj.weight, patches)
    trained = ensure_finetuned(profile, "mae", 1.0, progress=False)
    model = load_detector(trained)
    vit = model.backbone.vit
    assert len(vit.blocks) == 12 and vit.patch_embed.proj.weight.shape == (768, 3, 16, 16)
    assert trained.state.step == 2 and trained.class_names == ["person"]

    exported = export_onnx(model, tmp_path / "a.onnx", 512)
    images = torch.rand(1, 3, 512, 512)
    with torch.no_grad():
        expected = [t.numpy() for t in model.eval()(images)]
    session = open_session(exported, threads=2)
    outputs = session.run(None, {"images": images.numpy()})
    for got, want in zip(outputs, expected, strict=True):
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())

    dataset = ensure_dataset(profile)
    recipe = next(r for r in RECIPES if r.name == "static-reduce-range")  # right without VNNI too
    int8 = quantize(exported, preprocess(exported, tmp_path / "a-pre.onnx"), tmp_path / "a-int8.onnx", recipe,
                    CalibrationScenes(dataset.train, 512, count=2, batch_size=1))
    quantized = open_session(int8, threads=2).run(None, {"images": images.numpy()})
    heat, heat_int8 = expected[0].ravel(), quantized[0].ravel()
    assert np.corrcoef(heat, heat_int8)[0, 1] > 0.9  # INT8 keeps the float heatmap's shape

    bundle = tmp_path / "bundle"
    write_bundle(bundle, int8, trained.class_names, profile.finetune.detector, model.stride, name="ViT-B")
    photo = Image.open(dataset.eval.images / "FudanPed00005.png")
    found = EdgeDetector(bundle).detect([photo], score_threshold=0.0)[0]  # every candidate, however weak
    assert found["names"] == ["person"] * profile.finetune.detector.max_detections
    assert (found["boxes"][:, 2:] <= [photo.width, photo.height]).all()  # in the photo's own pixels
