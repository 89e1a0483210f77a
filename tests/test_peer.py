"""The peer detector: torchvision's SSDlite trained from scratch, exported and decoded like A."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import kill_after_checkpoint
from edgefm.config import DetectorConfig, PeerConfig, load_profile
from edgefm.data import ensure_dataset
from edgefm.stages.peer import (
    RUNS,
    PeerDecoder,
    PeerNetwork,
    build_peer,
    ensure_peer,
    load_peer,
    longer_peer,
    peer_collate,
    ship_peer,
    shipped_peer,
    train_peer,
)
from edgefm.tools.evaluate import gap_interval
from edgefm.tools.export import export_onnx

DETECTOR = DetectorConfig(image_size=64, max_detections=20)


def test_the_network_gives_a_score_and_a_box_per_anchor_and_the_decoder_keeps_a_limit():
    torch.manual_seed(0)
    ssd = build_peer(3, DETECTOR, PeerConfig())
    logits, offsets = PeerNetwork(ssd).eval()(torch.rand(2, 3, 64, 64))
    decoder = PeerDecoder(ssd)
    assert logits.shape == (2, len(decoder.anchors), 4) and offsets.shape == (2, len(decoder.anchors), 4)
    found = decoder(logits.detach().numpy(), offsets.detach().numpy())
    assert len(found) == 2
    for image in found:
        assert len(image["boxes"]) <= 20 and set(image["labels"].tolist()) <= {0, 1, 2}
        assert (image["boxes"] >= 0).all() and (image["boxes"] <= 64).all()
        assert np.all(np.diff(image["scores"]) <= 0) or len(image["scores"]) < 2
    assert not ssd.training  # the decoder put the model back the way it found it (eval here)


def test_the_decoder_finds_a_box_the_network_scores_high():
    ssd = build_peer(2, DETECTOR, PeerConfig())
    decoder = PeerDecoder(ssd)
    logits = np.full((1, len(decoder.anchors), 3), -10.0, np.float32)
    logits[0, :, 0] = 10.0  # background everywhere ...
    logits[0, 7] = [-10.0, -10.0, 10.0]  # ... but class 1 (stored as 2) at anchor 7
    found = decoder(logits, np.zeros((1, len(decoder.anchors), 4), np.float32))[0]
    assert found["labels"][0] == 1 and found["scores"][0] > 0.99
    anchor = decoder.anchors[7].numpy()  # zero offsets: the anchor itself, clipped to the image
    assert np.allclose(found["boxes"][0], np.clip(anchor, 0, 64), atol=1e-4)


def test_targets_keep_class_zero_for_the_background():
    image = torch.zeros(3, 8, 8)
    target = {"boxes": torch.tensor([[1.0, 1, 4, 4]]), "labels": torch.tensor([0]), "image_id": 1}
    images, targets = peer_collate([(image, target)])
    assert targets[0]["labels"].tolist() == [1] and type(targets[0]["boxes"]) is torch.Tensor


def test_the_onnx_export_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    network = PeerNetwork(build_peer(3, DETECTOR, PeerConfig())).eval()
    images = torch.rand(2, 3, 64, 64)
    path = export_onnx(network, tmp_path / "peer.onnx", 64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = network(images)
    for got, want in zip(ours, expected, strict=True):
        assert np.abs(got - want.numpy()).max() < 1e-3


def test_training_resumes_and_its_weights_reload(fashion_dir, tmp_path, monkeypatch):
    profile = load_profile("smoke")
    dataset = ensure_dataset(profile)
    cfg = PeerConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, eval_every=2)
    detector = profile.finetune.detector
    kill_after_checkpoint(monkeypatch, 2,
                          lambda: train_peer(cfg, dataset, detector, tmp_path, progress=False))
    model, state = train_peer(cfg, dataset, detector, tmp_path, progress=False)
    assert state.step == 4 and len(state.losses) == 4 and [e["step"] for e in state.evals] == [2, 4]
    reloaded = load_peer(tmp_path, 10, detector, cfg)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name])
    with pytest.raises(ValueError, match="not this peer's"):
        load_peer(tmp_path, 3, detector, cfg)
    with pytest.raises(FileNotFoundError, match="no peer weights"):
        load_peer(tmp_path / "nowhere", 10, detector, cfg)


def test_the_peer_stage_evaluates_exports_and_reads_a_shipped_peer(fashion_dir, monkeypatch, capsys):
    from edgefm.cli import main
    from edgefm.stages import peer as module

    profile = load_profile("smoke")
    results = ensure_peer("smoke", progress=False)
    low, high = results["eval"]["map_ci"]
    assert low <= results["eval"]["map"] <= high and results["run"] in RUNS
    assert results["runs"]["base"]["steps"] == profile.peer.steps
    assert results["runs"]["longer"]["steps"] == longer_peer(profile).steps == 2 * profile.peer.steps
    assert results["steps"] == results["runs"][results["run"]]["steps"]
    state = json.loads((Path(results["folder"]) / "longer" / "train_state.json").read_text())
    assert results["runs"]["longer"]["end_loss"] == pytest.approx(np.mean(state["losses"][-1:]))  # 5 % of 12
    assert not results["shipped"] and results["train_flops"] == 3 * results["flops"] * results["train_images"]
    # the longer schedule against the peer's own, on val: deployed only if shown better
    check = results["longer_check"]
    assert check["gap"] == pytest.approx(100 * (check["val_map"]["longer"] - check["val_map"]["base"]))
    assert check["gap_ci"][0] <= check["gap_ci"][1]
    assert (check["chosen"] == "longer") == (check["gap_ci"][0] > 0) and check["chosen"] == results["run"]
    folder = Path(results["folder"])  # the stage's cached result, removed to build it again
    deployed = load_peer(folder, 10, profile.finetune.detector, profile.peer)
    chosen = load_peer(folder / results["run"], 10, profile.finetune.detector, profile.peer)
    assert all(torch.equal(v, chosen.state_dict()[k]) for k, v in deployed.state_dict().items())
    shipped = ship_peer("smoke")
    for run in RUNS:
        assert (shipped_peer(profile, run) / "made_by.json").is_file()
        assert (shipped_peer(profile, run) / "model.safetensors").is_file()
    # a build with the shipped runs trains nothing and gets the same weights
    shutil.rmtree(folder)
    real_train = module.train_peer

    def only_its_start(*args, stop=0, **kwargs):
        assert stop > 0, "trained a shipped peer in full"
        return real_train(*args, stop=stop, **kwargs)

    monkeypatch.setattr(module, "train_peer", only_its_start)
    again = ensure_peer("smoke", progress=False)
    assert again["shipped"] and again["eval"]["map"] == pytest.approx(results["eval"]["map"], abs=1e-9)
    assert again["longer_check"] == check
    # ... and checks the start of each shipped run by training it again: same seed, same losses
    for run, steps in (("base", 6), ("longer", 12)):  # smoke's warm-up is 1 step: two live runs
        retraced = again["runs"][run]["retrace"]
        assert retraced["steps"] == steps and retraced["max_loss_gap"] < 1e-3
    assert shipped == shipped_peer(profile)
    assert main(["--profile", "smoke", "peer"]) == 0  # the command reads the cached stage
    out = capsys.readouterr().out
    assert "eval mAP" in out and "12 steps long" in out
    # a shipped folder missing a file fails naming it, rather than training in its place
    shutil.rmtree(folder)
    (shipped_peer(profile, "longer") / "train_state.json").unlink()
    with pytest.raises(FileNotFoundError, match="longer: lacks train_state.json"):
        ensure_peer("smoke", progress=False)


def test_one_live_run_retraces_every_schedule_whose_warm_up_it_stays_within(fashion_dir, tmp_path,
                                                                            monkeypatch):
    from edgefm.stages import peer as module

    profile = load_profile("smoke")
    profile = replace(profile, peer=replace(profile.peer, warmup_steps=6))
    dataset, detector = ensure_dataset(profile), profile.finetune.detector
    _, longer = train_peer(longer_peer(profile), dataset, detector, tmp_path / "longer", progress=False)
    monkeypatch.setattr(module, "RETRACE_STEPS", 4)
    stops, real_train = [], module.train_peer
    monkeypatch.setattr(module, "train_peer", lambda *a, stop=0, **k: stops.append(stop) or real_train(
        *a, stop=stop, **k))
    runs = {run: {"cfg": cfg, "shipped": True, "state": longer}
            for run, cfg in zip(RUNS, (profile.peer, longer_peer(profile)), strict=True)}
    gaps = module.retrace(profile, dataset, runs, tmp_path)
    # both schedules' first 4 steps lie in their warm-up: one live run of 4 steps re-traces both
    assert stops == [4] and all(gaps[run]["max_loss_gap"] < 1e-3 for run in RUNS)
    assert gaps["base"]["steps"] == gaps["longer"]["steps"] == 4
    # past the warm-up the two schedules' learning rates part: each needs its own live run
    short = replace(profile, peer=replace(profile.peer, warmup_steps=2))
    runs = {run: {**record, "cfg": replace(record["cfg"], warmup_steps=2)} for run, record in runs.items()}
    stops.clear()
    module.retrace(short, dataset, runs, tmp_path)
    assert stops == [4, 4]


@pytest.mark.parametrize(("longer_samples", "verdict"), [
    ([0.30, 0.31, 0.32], "longer better"), ([0.10, 0.11, 0.12], "longer worse"),
    ([0.18, 0.20, 0.23], "no difference shown")])
def test_the_longer_schedule_is_chosen_only_when_shown_better_on_val(monkeypatch, longer_samples, verdict):
    from edgefm.stages import peer as module

    scores = {"base": {"map": 0.2, "map_samples": [0.2, 0.2, 0.2]},
              "longer": {"map": float(np.mean(longer_samples)), "map_samples": longer_samples}}
    monkeypatch.setattr(module, "evaluate_peer", lambda model, *args, **kwargs: scores[model])
    check = module.longer_check("base", "longer", None, DETECTOR)  # models stand in by name
    assert check["verdict"] == verdict
    assert check["chosen"] == ("longer" if verdict == "longer better" else "base")
    gaps = 100 * (np.asarray(longer_samples) - 0.2)
    assert check["gap"] == pytest.approx(gaps.mean())
    assert check["gap_ci"] == pytest.approx(np.percentile(gaps, [2.5, 97.5]))


def test_the_longer_run_is_deployed_when_it_is_chosen(fashion_dir, monkeypatch):
    from edgefm.stages import peer as module

    monkeypatch.setattr(module, "longer_check", lambda *args: {
        "val_map": {}, "gap": 1.0, "gap_ci": [0.5, 1.5], "verdict": "longer better", "chosen": "longer"})
    profile = replace(load_profile("smoke"), peer_longer_factor=3.0)  # a stage of its own
    results = ensure_peer(profile, progress=False)
    assert results["run"] == "longer" and results["steps"] == 3 * profile.peer.steps
    assert results["train_flops"] == 3 * results["flops"] * 3 * profile.peer.steps * profile.peer.batch_size
    folder = Path(results["folder"])
    deployed = load_peer(folder, 10, profile.finetune.detector, profile.peer)
    longer = load_peer(folder / "longer", 10, profile.finetune.detector, profile.peer)
    assert all(torch.equal(v, longer.state_dict()[k]) for k, v in deployed.state_dict().items())


def test_a_paired_interval_needs_the_same_resamplings():
    assert gap_interval([0.5, 0.6, 0.7], [0.4, 0.5, 0.6]) == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError, match="as many resamplings"):
        gap_interval([0.5], [0.4, 0.5])
