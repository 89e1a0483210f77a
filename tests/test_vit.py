import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from edgefm.config import BackboneConfig
from edgefm.models import CheckpointError, load_mae_backbone, random_mae_backbone
from edgefm.models.vit import init_mae_embeddings, sincos_position_embedding

TINY = dict(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=48, decoder_hidden_size=16, decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2, decoder_intermediate_size=32)


@pytest.fixture
def mae_dir(tmp_path):
    torch.manual_seed(0)
    model = init_mae_embeddings(ViTMAEForPreTraining(ViTMAEConfig(**TINY))).eval()
    model.save_pretrained(tmp_path / "mae")
    return tmp_path / "mae", model


def test_adapter_equals_unshuffled_encoder(mae_dir):
    folder, model = mae_dir
    backbone = load_mae_backbone(folder).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = (32 // 8) ** 2
    model.config.mask_ratio = 0.0  # keep every token; ascending noise keeps their order
    with torch.no_grad():
        expected = model.vit(images, noise=torch.arange(tokens).float().expand(2, tokens)).last_hidden_state
        features = backbone.forward_features(images)
        feature_map = backbone(images)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert feature_map.shape == (2, 24, 4, 4)
    # the map is the patch tokens in raster order: token (row 1, col 2) is index 1 + 1 * 4 + 2
    torch.testing.assert_close(feature_map[:, :, 1, 2], expected[:, 1 + 4 + 2])


def test_hf_encoder_shuffles_which_is_why_we_adapt(mae_dir):
    _, model = mae_dir
    model.config.mask_ratio = 0.0
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model.vit(images).last_hidden_state
        b = model.vit(images, noise=torch.arange(16).float()[None]).last_hidden_state
    assert not torch.allclose(a, b)  # default random noise permutes the tokens


def test_position_embeddings_resized_at_load(mae_dir):
    folder, _ = mae_dir
    backbone = load_mae_backbone(folder, image_size=64)
    assert backbone.vit.pos_embed.shape == (1, 1 + 64, 24)
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 24, 8, 8)


def test_backbone_exports_to_onnx_and_matches(mae_dir, tmp_path):
    folder, _ = mae_dir
    backbone = load_mae_backbone(folder).eval()
    images = torch.randn(1, 3, 32, 32)
    path = tmp_path / "backbone.onnx"
    torch.onnx.export(backbone, (images,), str(path), input_names=["images"], output_names=["features"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, backbone(images).numpy(), rtol=1e-4, atol=1e-5)


def test_missing_checkpoint_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: not a checkpoint folder"):
        load_mae_backbone(tmp_path / "nowhere")


def test_uncached_hub_id_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="facebook/vit-mae-base.*EDGEFM_DOWNLOAD=1"):
        load_mae_backbone("facebook/vit-mae-base")


def test_corrupt_weights_are_named(mae_dir):
    folder, _ = mae_dir
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot load MAE weights"):
        load_mae_backbone(folder)


def test_checkpoint_of_wrong_shape_is_refused(mae_dir):
    folder, _ = mae_dir
    wanted = BackboneConfig(image_size=32, patch_size=8, hidden_size=48, num_layers=2, num_heads=2,
                            mlp_ratio=2.0)
    with pytest.raises(CheckpointError, match="hidden_size 24 != 48"):
        load_mae_backbone(folder, expect=wanted)


def test_built_maes_get_their_fixed_sincos_position_embeddings():
    # transformers 5.x leaves these tables at zero: a position-blind MAE that cannot learn shapes
    raw = ViTMAEForPreTraining(ViTMAEConfig(**TINY))
    assert raw.vit.embeddings.position_embeddings.abs().max() == 0  # if this fails, upstream fixed it
    model = init_mae_embeddings(raw)
    table = model.vit.embeddings.position_embeddings[0]
    assert torch.equal(table, sincos_position_embedding(4, 24)[0])
    assert table[0].abs().max() == 0 and len({tuple(row.tolist()) for row in table[1:]}) == 16
    assert not model.vit.embeddings.position_embeddings.requires_grad
    assert model.decoder.decoder_pos_embed.abs().amax(-1)[0, 1:].min() > 0
    backbone = random_mae_backbone(BackboneConfig(image_size=32, patch_size=8, hidden_size=24, num_layers=2,
                                                  num_heads=2))
    assert torch.equal(backbone.vit.pos_embed.detach(), sincos_position_embedding(4, 24))
