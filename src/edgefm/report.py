"""The final benchmark's verdicts: C against the book's targets, C against the peer, the summary.

The deployment stage (:mod:`edgefm.stages.deploy`) measures every variant in one benchmark run; the
functions here turn those records into the decisions the chapters display: which targets C meets
(:func:`targets_report`, judged with intervals), which of the peer's files a practitioner would
deploy (:func:`peer_format`, chosen on val) and whether C beats it (:func:`peer_comparison`), and
``summary.json`` (:func:`summary`). The variants are named here, by role.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgefm.targets import TARGETS, Check
from edgefm.tools.evaluate import gap_interval, interval_verdict

A_TORCH, A_ORT = "A (PyTorch FP32)", "A (ONNX Runtime FP32)"
B_TORCH, B_ORT = "B (PyTorch FP32)", "B (ONNX Runtime FP32)"
B_STUDY = "B"  # B among the candidates of the smaller study's benchmark (PyTorch FP32)
C_INT8 = "C (ONNX INT8)"
# C timed on its own, as the benchmark runs it and as a device runs it (threads spinning between frames)
C_STOPPED, C_SPINNING = "C, threads stopped after each run", "C, threads spinning (ONNX Runtime's default)"
PEER_ORT, PEER_INT8 = "Peer (ONNX Runtime FP32)", "Peer (ONNX INT8)"
PEER_FORMATS = (PEER_ORT, PEER_INT8)  # the peer's files a practitioner could deploy
PAIRED = (A_TORCH, C_INT8, *PEER_FORMATS)  # whose mAPs carry intervals and paired gaps


def targets_report(a: dict, c: dict, map_drop_ci: list[float] | None = None) -> list[dict]:
    """Every target on model C, with its measured value and whether it is met; ``map_drop_ci``
    (points) is the interval the mAP drop is judged with."""
    values = {**c, "map_drop_relative": (a["map"] - c["map"]) / a["map"]}
    if map_drop_ci is not None:
        values["map_drop_range"] = [v / 100 for v in map_drop_ci]
        values["map_drop_relative_range"] = [v / 100 / a["map"] for v in map_drop_ci]
    checks = [Check.of(t, values) for t in TARGETS if t.model == "C"]
    return [{"target": c.target.describe(), "origin": c.target.origin, "metric": c.target.metric,
             "comparison": c.target.comparison, "threshold": c.target.threshold, "value": c.value,
             "interval": c.interval, "verdict": c.verdict, "met": c.verdict == "met"} for c in checks]


def speedup_factors(records: dict[str, dict]) -> dict[str, float]:
    """C's speed-up over A at camera rate on 2 threads, split into its three factors, which
    multiply to it: the runtime (A in ONNX Runtime FP32 against A in PyTorch), the architecture
    (B against A, both in ONNX Runtime FP32) and INT8 (C against B in ONNX Runtime)."""
    ms = {name: records[name]["latency_camera_ms_2t"] for name in (A_TORCH, A_ORT, B_ORT, C_INT8)}
    return {"runtime": ms[A_TORCH] / ms[A_ORT], "architecture": ms[A_ORT] / ms[B_ORT],
            "INT8": ms[B_ORT] / ms[C_INT8]}


def _levers(records: dict[str, dict]) -> dict[str, tuple[str, float]]:
    """Per target metric of C, the figure of B it is built on (``speed``: B's speed-up over A, both
    in ONNX Runtime FP32 at camera rate; ``size``: B's size reduction; ``loss``: B's mAP points lost
    against A) and its measured value."""
    a, b = records[A_TORCH], records[B_ORT]
    speed, loss = ("speed", speedup_factors(records)["architecture"]), ("loss", 100 * (a["map"] - b["map"]))
    return {"camera_speedup_2t": speed, "camera_speedup_vs_a_ort_2t": speed,
            "size_reduction": ("size", b["size_reduction"]), "map_drop": loss, "map_drop_relative": loss}


def shortfalls(records: dict[str, dict], targets: list[dict]) -> list[dict]:
    """For each of C's targets not met (:func:`targets_report`), what B would have to reach for C to
    meet it, the other steps (the runtime, INT8) doing what they measured: C's speed-up and size
    reduction are B's times those steps' factors, so B's must grow by the ratio C's falls short;
    C's mAP drop is B's plus INT8's, so B's must shrink by the points C's is over. ``needed_shown``
    is the same for the whole interval to clear the target, its spread kept. ``now`` and the
    needs are in ``unit``: times for speed and size, mAP points lost against A for ``loss``."""
    levers, a_map = _levers(records), records[A_TORCH]["map"]

    def needed(t: dict, now: float, value: float) -> float:
        if t["comparison"] == ">=":
            return now * t["threshold"] / value
        scale = 100 * (a_map if t["metric"] == "map_drop_relative" else 1)  # the excess, in points
        return now - (value - t["threshold"]) * scale

    entries = []
    for t in targets:
        if t["met"] or t["value"] is None or t["metric"] not in levers:
            continue
        lever, now = levers[t["metric"]]
        worst = t["interval"][0 if t["comparison"] == ">=" else 1] if t["interval"] else None
        entries.append({"target": t["target"], "origin": t["origin"], "verdict": t["verdict"],
                        "value": t["value"], "lever": lever, "unit": "points" if lever == "loss" else "x",
                        "now": now, "needed": needed(t, now, t["value"]),
                        "needed_shown": None if worst is None else needed(t, now, worst)})
    return entries


def shortfall_phrase(entry: dict) -> str:
    """An entry of :func:`shortfalls` in words, e.g. "mAP drop vs A <= 0.01 (ours, not met): B
    could lose at most 0.50 points of mAP against A (it loses 4.00); for its whole interval to
    clear it, B would have to beat A by at least 0.50 points of mAP"."""
    lever, now, needed, shown = entry["lever"], entry["now"], entry["needed"], entry["needed_shown"]

    def what(v: float, short: bool = False) -> str:
        if lever == "loss":
            return (f"B could lose at most {v:.2f} points of mAP against A" if v >= 0.005
                    else f"B would have to beat A by at least {max(-v, 0.0):.2f} points of mAP")
        if short:
            return f"{v:.1f} times"
        return (f"B would have to be {v:.1f} times as fast as A, both in ONNX Runtime FP32 at camera rate"
                if lever == "speed" else f"B would have to be {v:.1f} times smaller than A")

    if lever == "loss":
        actual = f"it loses {now:.2f}" if now >= 0.005 else f"it gains {max(-now, 0.0):.2f}"
    else:
        actual = f"it is {now:.1f}"
    head = f"{entry['target']} ({entry['origin']}, {entry['verdict']}): "
    reached = needed >= now if lever == "loss" else needed <= now  # the value meets it; its interval does not
    if reached and shown is not None:
        return f"{head}the measurement meets it; for its whole interval to clear it, {what(shown)} ({actual})"
    text = head + f"{what(needed)} ({actual})"
    if shown is not None:
        text += f"; for its whole interval to clear it, {what(shown, short=True)}"
    return text


def interval_text(interval: Iterable[float], scale: float = 1.0) -> str:
    """A 95 % interval as the book prints it, signed to one decimal, e.g. "+3.2 to +5.5";
    ``scale`` 100 turns a gap in mAP into points."""
    low, high = (scale * v for v in interval)
    return f"{low:+.1f} to {high:+.1f}"


def pareto_front(records: Iterable[dict], latency: str = "latency_camera_ms_2t") -> list[dict]:
    """The variants no other beats, that is, is at least as fast (by ``latency``) and as accurate
    (eval mAP) and better on one; fastest first."""
    front: list[dict] = []
    for record in sorted(records, key=lambda r: (r[latency], -r["map"])):
        if not front or record["map"] > front[-1]["map"]:
            front.append(record)
    return front


def targets_by_model(checks: Iterable[Check]) -> dict[str, dict]:
    """Per model, the targets it met and those it did not (not met, or not shown by the interval),
    by description: a step of the book worked when it met every target set for it, whatever was
    expected of it."""
    by_model: dict[str, dict] = {}
    for check in checks:
        entry = by_model.setdefault(check.target.model, {"met": [], "not_met": []})
        entry["met" if check.verdict == "met" else "not_met"].append(check.target.describe())
    return by_model


def targets_phrase(entry: dict) -> str:
    """An entry of :func:`targets_by_model` in words, e.g. "met all 3 of its targets" or "did not
    meet 1 of its 3 targets (mAP drop vs A <= 0.01)"."""
    met, not_met = entry["met"], entry["not_met"]
    total = len(met) + len(not_met)
    if not not_met:
        return "met its target" if total == 1 else f"met all {total} of its targets"
    which = "; ".join(not_met)
    return (f"did not meet its target ({which})" if total == 1
            else f"did not meet {len(not_met)} of its {total} targets ({which})")


def peer_format(formats: dict[str, dict]) -> tuple[str, str]:
    """The peer's file a practitioner would deploy, chosen on the val scenes, and why in words:
    of its FP32 and INT8 files (``formats``: each one's ``val_map`` and ``latency_camera_ms_2t``),
    the fastest at camera rate on 2 threads among those whose val mAP is within C's mAP target
    (:data:`~edgefm.targets.TARGETS`) of the FP32 file's. INT8 is not assumed to pay: on a
    network it was not tuned for, it may be slower or lose more than the target allows."""
    tolerance = next(t.threshold for t in TARGETS if t.model == "C" and t.metric == "map_drop")
    ms = {name: formats[name]["latency_camera_ms_2t"] for name in PEER_FORMATS}
    val = {name: formats[name]["val_map"] for name in PEER_FORMATS}
    kept = [name for name in PEER_FORMATS if val[PEER_ORT] - val[name] <= tolerance]
    chosen = min(kept, key=ms.get)
    if chosen == PEER_INT8:
        reason = "INT8 is deployed: faster than FP32, and within C's mAP target of it on val"
    elif ms[PEER_INT8] >= ms[PEER_ORT]:
        reason = "INT8 does not pay: it is slower than the FP32 file here"
    else:
        reason = "INT8 is faster, but loses more val mAP than C's target allows, so FP32 is deployed"
    return chosen, reason


def peer_comparison(c: dict, records: dict[str, dict], val_maps: dict[str, float],
                    samples: dict[str, list[float]], peer_results: dict, a_and_b_flops: float) -> dict:
    """C against the peer in the format it would be deployed in (:func:`peer_format`), from one
    benchmark run: the mAP gap (points, C minus peer) with its paired interval, the verdict it
    allows, the latency at camera rate, and how the peer's training compute compares with A's
    and B's (the deployed run's, and each run's: the longer schedule's too). ``formats`` keeps both
    of the peer's files' figures, the one not chosen included."""
    formats = {name: {"val_map": val_maps[name], "map": records[name]["map"],
                      "map_ci": records[name].get("map_ci"),
                      "latency_camera_ms_2t": records[name]["latency_camera_ms_2t"]} for name in PEER_FORMATS}
    chosen, _ = peer_format(formats)
    peer = records[chosen]
    interval = [100 * v for v in gap_interval(samples[C_INT8], samples[chosen])]
    verdict = interval_verdict(interval, "C more accurate", "the peer more accurate")
    return {"format": chosen, "formats": formats, "chosen_on": "val",
            "map_gap": 100 * (c["map"] - peer["map"]), "map_gap_ci": interval, "verdict": verdict,
            "c_latency_camera_ms_2t": c["latency_camera_ms_2t"],
            "peer_latency_camera_ms_2t": peer["latency_camera_ms_2t"],
            "peer_train_flops": peer_results["train_flops"], "a_and_b_train_flops": a_and_b_flops,
            "compute_fraction": peer_results["train_flops"] / a_and_b_flops,
            "peer_steps": peer_results["steps"], "peer_shipped": peer_results["shipped"],
            "peer_val_curve": peer_results["val_curve"], "peer_run": peer_results["run"],
            "longer_check": peer_results["longer_check"],
            "compute_fractions": {run: record["train_flops"] / a_and_b_flops
                                  for run, record in peer_results["runs"].items()}}


def summary(results: dict) -> dict:
    """``summary.json``: A and C, their ratios and the targets, all from one benchmark run."""
    records = {r["name"]: r for r in results["variants"]}
    a, c = records[A_TORCH], records[C_INT8]
    return {"A": a, "C": c, "map_drop_ci": results["map_drop_ci"], "peer": results["peer"],
            "latency_speedup_2t": c["latency_speedup_2t"], "latency_speedup_1t": c["latency_speedup_1t"],
            "latency_camera_speedup_2t": c["camera_speedup_2t"],
            "latency_camera_speedup_2t_range": c["camera_speedup_2t_range"],
            "latency_camera_speedup_vs_a_ort_2t": c["camera_speedup_vs_a_ort_2t"],
            "size_reduction": c["size_reduction"],
            "map_drop": (a["map"] - c["map"]) * 100, "map_drop_unit": "mAP points (0.01 of mAP@[.5:.95])",
            "targets": results["targets"], "all_targets_met": all(t["met"] for t in results["targets"]),
            "shortfalls": shortfalls(records, results["targets"]),
            "pareto_front": [{k: r[k] for k in ("name", "map", "latency_camera_ms_2t")}
                             for r in pareto_front(results["variants"])],
            "machine": results["machine"]}
