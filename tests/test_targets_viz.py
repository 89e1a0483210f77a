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


def _final_records(b_ms: float, c_ms: float, b_map: float, c_map: float) -> dict[str, dict]:
    """A final benchmark's records as :func:`edgefm.report.summary` reads them: A in PyTorch at
    28 ms and 0.35 mAP, A in ONNX Runtime at 24 ms, C twice B's size reduction."""
    from edgefm.report import A_ORT, A_TORCH, B_ORT, C_INT8

    c_camera = 28.0 / c_ms
    return {A_TORCH: {"name": A_TORCH, "map": 0.35, "latency_camera_ms_2t": 28.0, "size_reduction": 1.0},
            A_ORT: {"name": A_ORT, "map": 0.35, "latency_camera_ms_2t": 24.0, "size_reduction": 1.0},
            B_ORT: {"name": B_ORT, "map": b_map, "latency_camera_ms_2t": b_ms, "size_reduction": 10.0},
            C_INT8: {"name": C_INT8, "map": c_map, "latency_camera_ms_2t": c_ms, "size_reduction": 20.0,
                     "map_drop": 0.35 - c_map, "camera_speedup_2t": c_camera,
                     "camera_speedup_2t_range": [0.8 * c_camera, 1.1 * c_camera],
                     "camera_speedup_vs_a_ort_2t": 24.0 / c_ms}}


def test_a_shortfall_says_what_b_must_reach_for_c_to_meet_the_target():
    from edgefm.report import A_TORCH, C_INT8, interval_text, shortfall_phrase, shortfalls, targets_report

    records = _final_records(b_ms=12.0, c_ms=6.0, b_map=0.31, c_map=0.305)
    targets = targets_report(records[A_TORCH], records[C_INT8], map_drop_ci=[3.5, 5.5])
    missed = {(e["target"], e["origin"]): e for e in shortfalls(records, targets)}
    assert {t["origin"] for t in targets if t["met"]} and not any(  # met targets need nothing
        (t["target"], t["origin"]) in missed for t in targets if t["met"])
    speed = missed[("speed-up vs A at camera rate >= 8x", "ours")]
    assert speed["now"] == pytest.approx(2.0)  # B against A, both in ONNX Runtime
    # B that much faster, INT8 and the runtime as measured: C meets the target exactly
    faster = speed["needed"] / speed["now"]
    again = _final_records(b_ms=12.0 / faster, c_ms=6.0 / faster, b_map=0.31, c_map=0.305)
    assert again[C_INT8]["camera_speedup_2t"] == pytest.approx(8.0)
    assert speed["needed_shown"] == pytest.approx(speed["needed"] / 0.8)  # the low end clears it too
    # 4.5 points lost, 0.5 of them by INT8: B may lose at most 0.5 points (for the interval, gain 0.5)
    drop = missed[("mAP drop vs A <= 0.01", "ours")]
    assert (drop["now"], drop["needed"], drop["needed_shown"]) == pytest.approx((4.0, 0.5, -0.5))
    assert shortfall_phrase(drop) == (
        "mAP drop vs A <= 0.01 (ours, not met): B could lose at most 0.50 points of mAP against A (it loses "
        "4.00); for its whole interval to clear it, B would have to beat A by at least 0.50 points of mAP")
    relative = missed[("relative mAP drop vs A <= 0.05", "seed: within 5 %")]
    assert relative["needed"] == pytest.approx(4.0 - (0.045 / 0.35 - 0.05) * 35)  # the excess in points
    assert relative["needed_shown"] == pytest.approx(4.0 - (0.055 / 0.35 - 0.05) * 35)
    assert shortfall_phrase(speed).startswith(
        "speed-up vs A at camera rate >= 8x (ours, not met): B would have to be 3.4 times as fast as A")
    assert shortfall_phrase(speed).endswith("(it is 2.0); for its whole interval to clear it, 4.3 times")
    assert interval_text([0.032, 0.0546], 100) == "+3.2 to +5.5"
    assert interval_text([-1.0, 0.04]) == "-1.0 to +0.0"
    # against A in ONNX Runtime only INT8 follows B: 4x measured, so B needs 6/4 of its 2x
    ort = missed[("speed-up vs A in ONNX Runtime FP32 at camera rate >= 6x", "ours")]
    assert ort["needed"] == pytest.approx(3.0) and ort["unit"] == "x"


def test_a_missed_size_target_asks_b_to_shrink_by_the_same_ratio():
    from edgefm.report import A_TORCH, C_INT8, shortfall_phrase, shortfalls, targets_report

    records = _final_records(b_ms=3.0, c_ms=1.5, b_map=0.35, c_map=0.35)
    records[C_INT8]["size_reduction"] = 8.0  # B 10x, so INT8 shrank it 0.8x: B would need 15x
    targets = targets_report(records[A_TORCH], records[C_INT8], map_drop_ci=[-0.5, 0.5])
    (size,) = [e for e in shortfalls(records, targets) if e["target"] == "size reduction vs A >= 12x"]
    assert size["needed"] == pytest.approx(15.0) and size["needed_shown"] is None
    assert shortfall_phrase(size) == (
        "size reduction vs A >= 12x (ours, not met): B would have to be 15.0 times smaller than A "
        "(it is 10.0)")


def test_a_shortfall_met_by_the_value_but_not_by_its_interval_says_so():
    from edgefm.report import A_TORCH, C_INT8, shortfall_phrase, shortfalls, targets_report

    records = _final_records(b_ms=6.0, c_ms=3.0, b_map=0.35, c_map=0.35)  # 9.3x, range 7.5x to 10.3x
    targets = targets_report(records[A_TORCH], records[C_INT8], map_drop_ci=[-0.5, 0.5])
    (speed,) = [e for e in shortfalls(records, targets) if e["target"].startswith("speed-up vs A at camera")]
    assert speed["verdict"] == "not shown" and speed["needed"] < speed["now"] < speed["needed_shown"]
    assert "the measurement meets it; for its whole interval to clear it, B would" in shortfall_phrase(speed)
    # 0.7 points lost, within the target, but the interval reaches 1.3: B would have to gain 0.05 on A
    records = _final_records(b_ms=6.0, c_ms=3.0, b_map=0.3475, c_map=0.343)
    targets = targets_report(records[A_TORCH], records[C_INT8], map_drop_ci=[0.1, 1.3])
    (drop,) = [e for e in shortfalls(records, targets) if e["target"] == "mAP drop vs A <= 0.01"]
    assert drop["verdict"] == "not shown" and drop["needed_shown"] == pytest.approx(-0.05)
    assert shortfall_phrase(drop) == (
        "mAP drop vs A <= 0.01 (ours, not shown): the measurement meets it; for its whole interval to clear "
        "it, B would have to beat A by at least 0.05 points of mAP (it loses 0.25)")


def test_the_pareto_front_keeps_what_nothing_beats_on_both_fastest_first():
    from edgefm.report import pareto_front

    records = [{"name": n, "map": m, "latency_camera_ms_2t": ms}
               for n, m, ms in (("A", 0.35, 28.0), ("A INT8", 0.33, 30.0), ("B", 0.31, 4.0), ("C", 0.30, 4.1),
                                ("peer", 0.22, 2.0), ("B fast", 0.31, 3.9))]
    assert [r["name"] for r in pareto_front(records)] == ["peer", "B fast", "A"]
