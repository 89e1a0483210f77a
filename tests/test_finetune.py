import pytest
import torch

from conftest import kill_after_checkpoint
from edgefm.config import BackboneConfig, DetectorConfig, FinetuneConfig, load_profile
from edgefm.data import ensure_dataset
from edgefm.stages.finetune import (
    build_detector,
    ensure_finetuned,
    finetune,
    label_subset,
    layer_decay_groups,
    load_detector,
)
from edgefm.tools.training import CheckpointError

BACKBONE = BackboneConfig(image_size=64, patch_size=8, hidden_size=32, num_layers=2, num_heads=2)
CFG = FinetuneConfig(detector=DetectorConfig(image_size=64, channels=32, head_hidden=32), batch_size=4,
                     steps=6, warmup_steps=2, eval_every=3, checkpoint_every=3)


def test_layer_decay_scales_blocks_from_the_top():
    model = build_detector(CFG.detector, BACKBONE, num_classes=3)
    groups = layer_decay_groups(model, lr=1.0, layer_decay=0.5, weight_decay=0.05)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    vit = model.backbone.vit
    assert lr_of[id(model.head.heatmap[0].weight)] == 1.0
    assert lr_of[id(vit.blocks[1].attn.qkv.weight)] == 0.5
    assert lr_of[id(vit.blocks[0].attn.qkv.weight)] == 0.25
    assert lr_of[id(vit.patch_embed.proj.weight)] == 0.125
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(vit.pos_embed)] == 0.0 and decay_of[id(vit.blocks[0].norm1.weight)] == 0.0
    assert decay_of[id(vit.blocks[0].mlp.fc1.weight)] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_label_subsets_are_nested():
    small, large = label_subset(100, 0.1, seed=0), label_subset(100, 0.5, seed=0)
    assert len(small) == 10 and len(large) == 50 and set(small.tolist()) <= set(large.tolist())


def test_resume_after_interruption_matches_an_uninterrupted_run(fashion_dir, tmp_path, monkeypatch):
    dataset = ensure_dataset("smoke")
    straight = finetune(CFG, BACKBONE, dataset, tmp_path / "straight", progress=False)
    kill_after_checkpoint(monkeypatch, 3,
                          lambda: finetune(CFG, BACKBONE, dataset, tmp_path / "resumed", progress=False))
    resumed = finetune(CFG, BACKBONE, dataset, tmp_path / "resumed", progress=False)
    assert resumed.losses == straight.losses
    assert [e["step"] for e in resumed.evals] == [3, 6] and resumed.evals == straight.evals


def test_ensure_finetuned_from_mae_and_reload(fashion_dir):
    trained = ensure_finetuned("smoke", init="mae", progress=False)
    assert trained.state.step == load_profile("smoke").finetune.steps
    model = load_detector(trained)
    outputs = model(torch.rand(1, 3, 64, 64))
    assert outputs[0].shape[1] == 10
    assert ensure_finetuned("smoke", init="mae", progress=False).path == trained.path
    scratch = ensure_finetuned("smoke", init="random", progress=False)
    assert scratch.path != trained.path


def test_unknown_init_and_bad_weights_fail_clearly(fashion_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown init 'imagenet'"):
        ensure_finetuned("smoke", init="imagenet", progress=False)
    trained = ensure_finetuned("smoke", init="random", progress=False)
    (trained.path / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot load detector weights"):
        load_detector(trained)


def test_feasibility_writes_every_required_figure(fashion_dir, tmp_path, monkeypatch):
    from edgefm.artifacts import read_metrics
    from edgefm.stages import feasibility
    from edgefm.stages.feasibility import ensure_feasibility, feasibility_key
    from edgefm.tools.bench import machine

    results = ensure_feasibility("smoke", progress=False)
    metrics = read_metrics("smoke", "feasibility")
    assert metrics == results
    for role in ("a", "random"):
        figures = metrics[role]
        low, high = figures["map_ci"]
        assert low <= figures["map"] <= high and figures["steps"] == 6 and figures["shipped"] is False
        assert [p[0] for p in figures["val_curve"]] == [3, 6]
        assert figures["machine"] == machine()  # a run's time says what it was measured on
    assert [(p["fraction"], p["init"]) for p in metrics["label_efficiency"]] == [
        (0.3, "mae"), (0.3, "random"), (1.0, "mae"), (1.0, "random")]
    assert metrics["label_efficiency"][2]["map"] == metrics["a"]["map"]
    assert [p["steps"] for p in metrics["label_efficiency"]] == [2, 2, 6, 6]  # the same epochs
    assert len(metrics["seeds"]) == 3 and metrics["seed_spread"] is not None
    assert metrics["converged"] in (True, False) and metrics["missing"] == []
    check = metrics["layer_decay"]  # A's layer decay checked on the shortest schedule, without it
    assert check["with"]["name"] == "a-0.5x" and check["without"]["name"] == "a-0.5x-no-layer-decay"
    assert check["without"]["steps"] == check["with"]["steps"] == 3 and check["layer_decay"] == 0.75
    final_val = {run: check[run]["val_curve"][-1][1] for run in ("with", "without")}
    assert check["val_gap"] == pytest.approx(final_val["without"] - final_val["with"])
    assert check["eval_gap"]["gap"] == pytest.approx(check["without"]["map"] - check["with"]["map"])
    assert [len(r["val_curve"]) for r in metrics["retrace"]["seeds"]] == [1, 1, 1]
    assert {g["fraction"] for g in metrics["mae_vs_random"]} == {0.3, 1.0}
    paired = metrics["mae_vs_random_paired"]  # A and its twin on the same resamplings
    assert paired["gap"] == pytest.approx(metrics["a"]["map"] - metrics["random"]["map"])
    low, high = paired["ci"]
    assert low <= high and paired["significant"] == (low > 0 or high < 0)
    # cached: a second chapter asking for the study reads it back, nothing is re-evaluated...
    monkeypatch.setattr(feasibility, "_build", lambda *args: pytest.fail("the study was computed again"))
    assert ensure_feasibility("smoke", progress=False) == results
    # ...until what it depends on changes, such as the records shipped in weights/
    key = feasibility_key(load_profile("smoke"), progress=False)
    records = tmp_path / "weights" / "feasibility-smoke" / "runs.json"  # EDGEFM_WEIGHTS, set by conftest
    records.parent.mkdir(parents=True)
    records.write_text('{"runs": {}}')
    changed = feasibility_key(load_profile("smoke"), progress=False)
    assert key["records"] is None and changed["records"] is not None and {**changed, "records": None} == key


def test_a_shipped_detector_is_used_only_with_its_exact_config(fashion_dir, tmp_path, capsys):
    from dataclasses import replace

    from edgefm.stages.finetune import export_finetuned, shipped_folder

    profile = replace(load_profile("smoke"), shipped=True)
    trained = ensure_finetuned(profile, init="random", progress=False)
    folder = export_finetuned(trained, shipped_folder(profile, "random"), "edgefm train", "cpu")
    assert folder == tmp_path / "weights" / "a-random-smoke"  # EDGEFM_WEIGHTS, set by conftest
    shipped = ensure_finetuned(profile, init="random", progress=False)
    assert shipped.shipped and shipped.path == folder and shipped.state.losses == trained.state.losses
    assert torch.equal(load_detector(shipped).head.box[0].weight, load_detector(trained).head.box[0].weight)

    other = replace(profile, finetune=replace(profile.finetune, lr=2e-3))
    retrained = ensure_finetuned(other, init="random", progress=False)
    assert not retrained.shipped
    assert "made with another config (differs in: finetune.lr)" in capsys.readouterr().out


def _gap(gap: float, margin: float) -> dict:
    return {"gap": gap, "margin": margin, "significant": abs(gap) > margin}


def test_pretraining_summary_tells_a_head_start_from_a_better_end_point():
    from edgefm.stages.feasibility import pretraining_summary

    curve = [{"fraction": f, "init": i, "map": m} for f, i, m in
             ((0.03, "mae", 0.036), (0.03, "random", 0.026), (0.3, "mae", 0.2), (0.3, "random", 0.21))]
    metrics = {"label_efficiency": curve,
               "retrace": {"steps": 300, "mae_vs_random": _gap(0.026, 0.011)},
               "mae_vs_random": [{"fraction": 0.03, **_gap(0.010, 0.004)},
                                 {"fraction": 0.3, **_gap(-0.01, 0.02)},
                                 {"fraction": 1.0, **_gap(-0.013, 0.022)}]}
    level = pretraining_summary(metrics)
    assert level["paid"] is False
    assert "are level" in level["text"] and "head start, not a better end point" in level["text"]
    assert "beats a random encoder at 3 % (+1.0);" in level["text"]
    assert "level at 30 % (-1.0)" in level["text"]
    assert "at most 0.210 mAP" in level["text"]

    # the same gap, paired: the interval leaves out zero, so the random encoder is shown to be better
    metrics["mae_vs_random_paired"] = {"gap": -0.013, "ci": [-0.025, -0.002], "significant": True}
    paired = pretraining_summary(metrics)
    assert paired["paid"] is False and "a random encoder beats the MAE encoder (-1.3 points" in paired["text"]
    assert "interval -2.5 to -0.2; side by side, the gap is within the two intervals' margin of 2.2)" in (
        paired["text"])
    assert "a head start and a worse end point" in paired["text"]
    assert "With fewer labels, judged by the intervals side by side" in paired["text"]

    metrics["mae_vs_random"][-1] = {"fraction": 1.0, **_gap(0.05, 0.02)}
    metrics["mae_vs_random_paired"] = {"gap": 0.05, "ci": [0.03, 0.07], "significant": True}
    paid = pretraining_summary(metrics)
    assert paid["paid"] is True and "head start" not in paid["text"]

    metrics["mae_vs_random"].pop()  # the twin's whole schedule missing: judged on the re-trace only
    missing = pretraining_summary(metrics)
    assert missing["paid"] is None and "not in this build" in missing["text"]


def test_convergence_rule_decides_with_two_seeds_only_when_a_third_cannot_change_it():
    from edgefm.stages.feasibility import converged

    curve = [[0, 0.1], [750, 0.30], [1000, 0.31]]  # gained 1 point over the last quarter
    assert converged(curve, 0.02, seeds=3)["converged"] is True
    assert converged(curve, 0.005, seeds=3)["converged"] is False
    # two seeds 2 points apart: a third can only widen that, so the gain is already below it
    assert converged(curve, 0.02, seeds=2)["converged"] is True
    # two seeds 0.5 points apart: a third might still land further away
    assert converged(curve, 0.005, seeds=2)["converged"] is None
    assert converged(curve, None, seeds=1)["converged"] is None
    assert converged(curve, 0.02, seeds=2)["gain_last_quarter"] == pytest.approx(0.01)


def test_the_convergence_verdict_says_what_the_rule_decided_and_for_which_model():
    from edgefm.stages.feasibility import converged, convergence_verdict

    curve = [[0, 0.1], [750, 0.30], [1000, 0.31]]
    assert convergence_verdict(converged(curve, 0.02, 3), "B").endswith("by the rule B has converged")
    assert convergence_verdict(converged(curve, 0.005, 3), "B").endswith("by the rule B has not converged")
    assert "has converged already" in convergence_verdict(converged(curve, 0.02, 2), "A")
    assert "cannot decide until the third" in convergence_verdict(converged(curve, 0.005, 2), "A")
    assert "cannot decide yet" in convergence_verdict(converged(curve, None, 1), "A")
