import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from edgefm.targets import TARGETS, Check, Target, targets_table  # noqa: E402
from edgefm.viz import draw_boxes  # noqa: E402


def test_target_direction():
    faster = Target("speed-up", "C", "latency_speedup_2t", ">=", 8, "x", "ours")
    assert faster.met(8.0) and not faster.met(7.9)
    drop = Target("mAP drop", "C", "map_drop", "<=", 0.01, "", "ours")
    assert drop.met(0.005) and not drop.met(0.011)
    assert faster.describe() == "speed-up >= 8x"


def test_a_verdict_with_an_interval_needs_all_of_it():
    accuracy = Target("mAP", "A", "map", ">=", 0.40, "", "ours")
    assert accuracy.verdict(0.42, (0.41, 0.43)) == "met"
    assert accuracy.verdict(0.41, (0.39, 0.43)) == "not shown"
    assert accuracy.verdict(0.35, (0.33, 0.37)) == "not met"
    assert accuracy.verdict(None) == "not measured" and accuracy.verdict(0.41) == "met"
    table = targets_table([Check(accuracy, 0.41, (0.39, 0.43)), Check(accuracy, None)], model=True)
    lines = table.splitlines()
    assert lines[0] == "| model | target | measured |  |" and len(lines) == 4
    assert lines[2] == "| A | mAP >= 0.4 | 0.41 [0.39, 0.43] | **not shown** |"
    assert lines[3].endswith("| - | **not measured** |")
    faster = Target("speed-up", "C", "camera_speedup_2t", ">=", 8, "x", "ours")
    record = {"camera_speedup_2t": 8.4, "camera_speedup_2t_range": [7.8, 8.9]}
    assert Check.of(faster, record).verdict == "not shown"  # one of the repeats fell short
    assert Check.of(faster, {"camera_speedup_2t": 8.4}).verdict == "met"


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t.model}-{t.metric}-{t.origin}")
def test_targets_are_well_formed(target):
    assert target.comparison in (">=", "<=") and target.model in ("A", "A-INT8", "B", "C")


def test_draw_boxes_adds_one_patch_and_label_per_box():
    fig, ax = plt.subplots()
    draw_boxes(ax, torch.rand(3, 32, 32), torch.tensor([[1, 2, 10, 12], [5, 5, 30, 30]]), [0, 1],
               ["cat", "dog"], scores=[0.9, 0.5])
    assert len(ax.patches) == 2
    assert [t.get_text() for t in ax.texts] == ["cat 0.90", "dog 0.50"]
    plt.close(fig)


def test_each_step_is_judged_by_all_of_its_targets():
    from edgefm.report import targets_by_model, targets_phrase

    speed = Target("speed-up", "B", "camera_speedup_2t", ">=", 3, "x", "ours")
    drop = Target("mAP drop", "B", "map_drop", "<=", 0.01, "", "ours")
    accuracy = Target("mAP", "A", "map", ">=", 0.4, "", "ours")
    checks = [Check(speed, 4.0), Check(drop, 0.005, (-0.002, 0.012)), Check(accuracy, 0.45)]
    by_model = targets_by_model(checks)
    assert by_model["B"] == {"met": ["speed-up >= 3x"], "not_met": ["mAP drop <= 0.01"]}  # not shown: not met
    assert targets_phrase(by_model["B"]) == "did not meet 1 of its 2 targets (mAP drop <= 0.01)"
    assert targets_phrase(by_model["A"]) == "met its target"
    both = targets_by_model([Check(speed, 4.0), Check(drop, 0.0)])["B"]
    assert targets_phrase(both) == "met all 2 of its targets"


def test_the_speedup_factors_multiply_to_cs_speedup():
    from edgefm.report import A_ORT, A_TORCH, B_ORT, C_INT8, speedup_factors

    ms = {A_TORCH: 40.0, A_ORT: 20.0, B_ORT: 5.0, C_INT8: 2.5}
    factors = speedup_factors({name: {"latency_camera_ms_2t": v} for name, v in ms.items()})
    assert factors == {"runtime": 2.0, "architecture": 4.0, "INT8": 2.0}
    assert factors["runtime"] * factors["architecture"] * factors["INT8"] == ms[A_TORCH] / ms[C_INT8]
