"""``edgefm plan``: every stage with what sizes it and an upper bound on its cost, computing nothing."""

import re
from functools import partial

import pytest
import torch

from edgefm import plan
from edgefm.artifacts import artifacts_root
from edgefm.cli import main
from edgefm.config import load_profile
from edgefm.plan import a_cost, stages

STAGES = ["data", "pretrain", "feasibility", "quantization", "smaller", "peer", "deployment"]


def test_the_plan_lists_every_stage_and_counts_what_each_trains():
    profile = load_profile("smoke")
    planned = {s.name: s for s in stages(profile)}
    assert list(planned) == STAGES
    # smoke, by hand: A, its twin and two spread seeds at 6 steps of 8; A at half its schedule (3),
    # with and without layer decay; both inits on 30 % of the labels (2 steps each); then 4 live
    # re-traces of 3 steps
    assert planned["feasibility"].train_images == 8 * (6 + 6 + 2 * 6 + 2 * 3 + 2 * 2) + 4 * 3 * 8
    assert planned["quantization"].train_images == 2 * 4 * 8  # QAT and its FP32 control
    # the peer (6 steps of 4) and its schedule doubled, each with the re-trace of its start if shipped
    assert planned["peer"].train_images == (6 + 6 + 12 + 12) * 4
    # default: the peer's two runs share their warm-up, so one re-trace of 100 steps serves both
    default = {s.name: s for s in stages(load_profile("default"))}
    assert default["peer"].train_images == (4000 + 8000 + 100) * 32
    assert planned["pretrain"].train_images == 6 * 8
    # pruning (1 ratio) at the comparison budget (4 steps of 4); 2 seeds of: 3 training modes and the
    # control at that budget, the equal-compute arm (6 of 4), 2 students at that budget and 2 at the
    # long one (6 of 4); 2 search trials; B's 2 seeds at 12 steps of 4 and at twice that, and its
    # control; the re-traces of the 9 long runs a build would read from weights/ (100 steps of 4)
    assert planned["smaller"].train_images == (16 + 2 * (4 * 16 + 24 + 2 * 16 + 2 * 24) + 2 * 16
                                               + (2 * 12 + 2 * 24 + 12) * 4 + 9 * 100 * 4)
    assert planned["data"].train_images == 0
    assert "vit-mae-base (downloaded once from the hub)" in {s.name: s for s in stages(load_profile("full"))}[
        "pretrain"].settings


def test_a_cost_counts_flops_and_times_a_training_step():
    cost = a_cost(load_profile("smoke"))
    assert cost["flops_per_image"] > 0 and cost["params"] > 0 and cost["seconds_per_image"] > 0
    assert cost["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_plan_times_the_recipes_batch_there():
    cost = a_cost(load_profile("smoke"), "auto")
    assert cost["device"] == "cuda" and cost["seconds_per_image"] > 0


def test_plan_for_the_full_profile_downloads_and_builds_nothing(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any attempt to reach the hub would fail
    # ViT-B at 512 px: time a step of one image, not the plan's four, to keep the test short
    monkeypatch.setattr(plan, "a_cost", partial(plan.a_cost, batch=1))
    assert main(["--profile", "full", "plan", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    params = float(re.search(r"A has ([0-9.]+) M parameters", out).group(1))
    assert params > 86  # ViT-B's 86 M and the pyramid and head, counted on a randomly built copy
    for name in STAGES:
        assert any(line.startswith(name) for line in out.splitlines())
    assert not (artifacts_root() / "full").exists()
