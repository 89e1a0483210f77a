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
