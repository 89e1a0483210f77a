"""The targets the book sets itself, as data: the problem chapter states them from here and the
results chapter checks measured figures against the same records, so the two cannot drift."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A goal on one figure: ``metric <comparison> threshold`` for a model, with its origin.
    Speed targets are judged with frames arriving at a camera's 30 fps, on 2 threads: the regime
    of the book's use case (:func:`edgefm.tools.bench.camera_latencies`)."""

    name: str
    model: str
    metric: str
    comparison: str  # ">=" or "<="
    threshold: float
    unit: str
    origin: str

    def met(self, value: float) -> bool:
        """Whether a measured ``value`` reaches the target."""
        return {">=": operator.ge, "<=": operator.le}[self.comparison](value, self.threshold)

    def describe(self) -> str:
        """The target as a short phrase, e.g. ``latency speed-up vs A >= 8x``."""
        return f"{self.name} {self.comparison} {self.threshold:.3g}{self.unit}"

    def verdict(self, value: float | None, interval: Sequence[float] | None = None) -> str:
        """``met``, ``not met`` or ``not measured``; with a 95 % ``interval`` around the value,
        ``met`` needs the whole interval to meet the target, ``not met`` none of it, and anything
        between is ``not shown``."""
        if value is None:
            return "not measured"
        if interval is None:
            return "met" if self.met(value) else "not met"
        if all(self.met(v) for v in interval):
            return "met"
        return "not met" if not any(self.met(v) for v in interval) else "not shown"


@dataclass(frozen=True)
class Check:
    """A target and what was measured for it (``interval``: its 95 % interval, if it has one)."""

    target: Target
    value: float | None
    interval: Sequence[float] | None = None

    @property
    def verdict(self) -> str:
        return self.target.verdict(self.value, self.interval)

    @classmethod
    def of(cls, target: Target, record: dict) -> Check:
        """The check of a benchmark record: its figure, with the spread over the benchmark's
        repeats (``<metric>_range``) as the interval where it has one."""
        return cls(target, record.get(target.metric), record.get(f"{target.metric}_range"))


def targets_table(checks: Iterable[Check], model: bool = False, origin: bool = False) -> str:
    """The one Markdown table every chapter shows targets in: target, measured (with its
    interval), verdict (bold unless met); ``model`` and ``origin`` add those columns."""
    head = ["model"] * model + ["target"] + ["origin"] * origin + ["measured", ""]
    rule = "|" + "|".join("---:" if h == "measured" else "---" for h in head) + "|"
    rows = ["| " + " | ".join(head) + " |", rule]
    for check in checks:
        t, value = check.target, check.value
        measured = "-" if value is None else f"{value:.3g}"
        if check.interval is not None and value is not None:
            measured += f" [{check.interval[0]:.3g}, {check.interval[1]:.3g}]"
        verdict = check.verdict if check.verdict == "met" else f"**{check.verdict}**"
        cells = [t.model] * model + [t.describe()] + [t.origin] * origin + [measured, verdict]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


TARGETS: tuple[Target, ...] = (
    Target("mAP@[.5:.95]", "A", "map", ">=", 0.40, "", "ours"),
    Target("MAE init beats random init", "A", "map_gain_mae", ">=", 0.02, "", "ours"),
    Target("speed-up vs A at camera rate", "A-INT8", "camera_speedup_2t", ">=", 1.6, "x", "ours"),
    Target("size reduction vs A", "A-INT8", "size_reduction", ">=", 3.5, "x", "ours"),
    Target("mAP drop vs A", "A-INT8", "map_drop", "<=", 0.01, "", "ours"),
    Target("speed-up vs A at camera rate", "B", "camera_speedup_2t", ">=", 3, "x", "ours"),
    Target("mAP drop vs A", "B", "map_drop", "<=", 0.01, "", "ours"),
    Target("speed-up vs A at camera rate", "C", "camera_speedup_2t", ">=", 8, "x", "ours"),
    Target("speed-up vs A in ONNX Runtime FP32 at camera rate", "C", "camera_speedup_vs_a_ort_2t", ">=", 6,
           "x", "ours"),
    Target("size reduction vs A", "C", "size_reduction", ">=", 12, "x", "ours"),
    Target("mAP drop vs A", "C", "map_drop", "<=", 0.01, "", "ours"),
    Target("size reduction vs A", "C", "size_reduction", ">=", 1 / 0.7, "x", "seed: size -30 %"),
    Target("speed-up vs A at camera rate", "C", "camera_speedup_2t", ">=", 1 / 0.6, "x",
           "seed: latency -40 %"),
    Target("relative mAP drop vs A", "C", "map_drop_relative", "<=", 0.05, "", "seed: within 5 %"),
)
