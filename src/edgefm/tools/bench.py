"""The benchmark harness: accuracy, latency, throughput, size, FLOPs and memory of model variants.

Latency is measured at batch 1 with a fixed number of threads, after a warm-up, as the median and
90th percentile of many runs; the variants are *interleaved* (one run of each, round after round)
in one process, so a frequency change or a noisy neighbour hits them all alike. Speed is only
reported as a ratio against model A measured in the same run. Peak memory is read in a fresh
process per variant (a process's peak resident size only grows), which imports only what that
variant needs: ONNX Runtime for an ONNX file, PyTorch for a module.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from edgefm.config import BenchConfig
from edgefm.report import A_TORCH
from edgefm.runtime import LEVELS, onnx_runner, open_session
from edgefm.tools.export import fixed_batch, onnx_size, op_counts
from edgefm.tools.isa import cpu, isa

LEVEL_NAMES = {name: level.name for name, level in LEVELS.items()}
Run = Callable[[np.ndarray], tuple[np.ndarray, ...]]


@dataclass
class Variant:
    """One model to measure: a PyTorch module or an ONNX file (``precision`` picks the ceiling).

    ``flops`` and ``params`` of an ONNX variant are those of the PyTorch model it was made from:
    quantization changes how the work is done, not how much of it there is.
    """

    name: str
    module: torch.nn.Module | None = None
    onnx: Path | None = None
    precision: str = "fp32"  # "fp32" or "int8"
    flops: int | None = None
    params: int | None = None
    level: str = "all"  # ONNX Runtime graph optimisation level

    @property
    def format(self) -> str:
        return "pytorch" if self.module is not None else "onnx"

    def runner(self, threads: int) -> Run:
        """Images (B, 3, S, S) in [0, 1] -> raw outputs, on ``threads`` threads."""
        if self.module is not None:
            module = self.module.eval()

            @torch.no_grad()
            def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
                torch.set_num_threads(threads)
                return tuple(o.numpy() for o in module(torch.from_numpy(images)))

            return run
        return onnx_runner(open_session(self.onnx, threads=threads, level=self.level, spin=False))

    def takes_batch(self, batch: int) -> bool:
        """Whether the variant accepts ``batch`` images at once (an ONNX file may fix its batch)."""
        return self.onnx is None or fixed_batch(self.onnx) in (None, batch)

    def exported(self, name: str, path: Path, precision: str = "fp32", level: str = "all") -> Variant:
        """An ONNX variant made from this model: it keeps this one's FLOPs and parameters."""
        return Variant(name, onnx=Path(path), precision=precision, flops=self.flops, params=self.params,
                       level=level)

    def size_bytes(self) -> int:
        """Bytes on disk: the safetensors file of the weights, or the ONNX model with its data."""
        if self.onnx is not None:
            return onnx_size(self.onnx)
        from edgefm.tools.training import save_weights

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "weights.safetensors"
            save_weights(self.module, path)
            return path.stat().st_size


def module_variant(module: torch.nn.Module, image_size: int, name: str = A_TORCH) -> Variant:
    """A PyTorch model as a variant, its FLOPs and parameters counted (by default, model A)."""
    return Variant(name, module=module, flops=count_flops(module, image_size),
                   params=sum(p.numel() for p in module.parameters()))


def count_flops(module: torch.nn.Module, image_size: int) -> int:
    """FLOPs of one image through ``module`` (``torch.utils.flop_counter``: 2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.eval()(torch.rand(1, 3, image_size, image_size))
    return int(counter.get_total_flops())


def machine() -> dict:
    """What the numbers were measured on: CPU, its SIMD features, threads and library versions."""
    import onnxruntime

    name, flags = cpu()
    return {"cpu": name, "cores": os.cpu_count(), "isa": isa(flags),
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def _timing(seconds: list[float], after_idle: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(seconds) * 1e3), "p90_ms": float(np.percentile(seconds, 90) * 1e3),
            "after_idle_ms": float(np.median(after_idle) * 1e3)}


def gemm_ceiling(threads: int, size: int = 1024, runs: int = 10) -> dict:
    """What this CPU's matrix products reach: GFLOP/s of an FP32 GEMM in PyTorch and GOP/s of an
    INT8 (u8 x s8 -> s32) GEMM in ONNX Runtime's ``MatMulInteger``, both ``size`` cubed."""
    import onnx
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    a, b = torch.rand(size, size), torch.rand(size, size)
    fp32 = _timed(lambda: torch.mm(a, b), runs)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [size, size])])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gemm.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        session = open_session(path, threads=threads, spin=False)
    ua = np.random.randint(0, 255, (size, size), dtype=np.uint8)
    sb = np.random.randint(-127, 127, (size, size), dtype=np.int8)
    int8 = _timed(lambda: session.run(None, {"a": ua, "b": sb}), runs)
    work = 2 * size**3
    return {"threads": threads, "size": size, "fp32_gflops": work / fp32 / 1e9,
            "int8_gops": work / int8 / 1e9}


def _timed(call: Callable[[], object], runs: int) -> float:
    call()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def latencies(variants: list[Variant], image_size: int, threads: int,
              settings: BenchConfig) -> dict[str, dict[str, float]]:
    """``{name: {"median_ms", "p90_ms", "after_idle_ms"}}`` at batch 1, the variants interleaved.

    The variants take turns in rounds; in its turn a variant runs ``settings.burst`` + 1 times back
    to back and the last ``burst`` runs are the timed ones, until ``settings.runs`` are timed.
    Before each turn the harness waits ``settings.pause_ms``: a runtime's worker threads keep
    spinning for a while after a run (PyTorch's OpenMP pool does by default), and on a 2-core
    machine they would take a core from whichever variant runs next. The first run of a turn
    starts on cores that have been idle for that pause; waking them is not the model's work (on
    the virtual machine this book is built on it cost milliseconds), so that run is reported
    apart, as ``after_idle_ms``, and the timed runs are those of a processor already at work.
    """
    image = np.random.default_rng(0).random((1, 3, image_size, image_size), dtype=np.float32)
    runners = {v.name: v.runner(threads) for v in variants}
    for run in runners.values():
        for _ in range(settings.warmup):
            run(image)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    after_idle: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(-(-settings.runs // settings.burst)):
        for name, run in runners.items():
            time.sleep(settings.pause_ms / 1e3)
            for i in range(settings.burst + 1):
                start = time.perf_counter()
                run(image)
                (after_idle if i == 0 else seconds)[name].append(time.perf_counter() - start)
    return {name: _timing(seconds[name][:settings.runs], after_idle[name]) for name in runners}


def camera_latencies(variants: list[Variant], image_size: int, threads: int,
                     settings: BenchConfig) -> dict[str, float]:
    """``{name: median ms}`` at batch 1 when frames arrive at ``settings.camera_fps``, as a device
    fed by a camera runs: each variant in turn takes ``settings.camera_frames`` frames, each
    starting one frame period after the previous one started (or as soon as it ended, if it ran
    longer), and its threads may sleep in between (the sessions do not spin)."""
    image = np.random.default_rng(0).random((1, 3, image_size, image_size), dtype=np.float32)
    period = 1 / settings.camera_fps
    medians = {}
    for variant in variants:
        run = variant.runner(threads)
        run(image)
        seconds = []
        start = time.perf_counter()
        for _ in range(settings.camera_frames):
            end = time.perf_counter()
            time.sleep(max(0.0, start + period - end))
            start = time.perf_counter()
            run(image)
            seconds.append(time.perf_counter() - start)
        medians[variant.name] = float(np.median(seconds) * 1e3)
    return medians


def throughput(variant: Variant, image_size: int, batch: int, threads: int, runs: int = 5) -> float:
    """Images per second at ``batch``, median of ``runs`` after one warm-up."""
    run = variant.runner(threads)
    images = np.random.default_rng(0).random((batch, 3, image_size, image_size), dtype=np.float32)
    return batch / _timed(lambda: run(images), runs)


# ONNX Runtime's integer matrix-product kernels (after its QDQ fusions): where INT8 does its work
INTEGER_PRODUCTS = ("QLinearMatMul", "QLinearConv", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
                    "QGemm", "DynamicQuantizeMatMul")


QUANTIZE_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")  # INT8 <-> float


def runtime_operators(model: Path) -> dict[str, dict[str, int]]:
    """What ONNX Runtime runs of an ONNX model, by node type, after its portable graph
    optimisations (the extended level: a quantize-dequantize pair around an operator it has an
    INT8 kernel for is fused into that kernel): ``int8`` kernels, ``conversions`` between INT8
    and float, and ``float``, everything else. A QDQ file's node counts alone cannot tell these
    apart."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        counts = op_counts(Path(folder) / "optimized.onnx")
    int8 = {op: n for op, n in counts.items() if op.startswith("QLinear") or op in INTEGER_PRODUCTS}
    conversions = {op: n for op, n in counts.items() if op in QUANTIZE_OPS}
    return {"int8": int8, "conversions": conversions,
            "float": {op: n for op, n in counts.items() if op not in int8 and op not in conversions}}


ENCODER, NECK = "encoder", "pyramid and head"


def detector_part(scope: str) -> str | None:
    """The half of a detector a module path belongs to: its encoder (``backbone...``) or the
    pyramid and head above it; None for the detector's own top-level operations."""
    root = scope.split(".")[0]
    return ENCODER if root == "backbone" else NECK if root in ("pyramid", "head") else None


def _parts_of_kernels(names: list[str], scopes: dict[str, str]) -> list[str]:
    """Each kernel's half of the detector, in execution order, from the exporter's module scopes
    (``scopes``: node name -> module). The optimiser renames what it fuses: a fused node keeps its
    first node's name before a ``/`` (``node_MatMul_61/MatMulScaleFusion/``) or gets a new one
    (``conv2d_nchwc``, a quantizer's ``QuantizeLinear``). Those, and top-level operations (the
    input normalisation, the pyramid's upsampling), run among their neighbours, so they count
    for the part of the kernel before them (the first ones: the part of the first known kernel).
    Only two halves are told apart: a fused head convolution that follows the pyramid cannot be
    told from the pyramid's own."""
    known = [detector_part(scopes.get(name, scopes.get(name.split("/")[0], ""))) for name in names]
    current = next((part for part in known if part is not None), ENCODER)
    found = []
    for part in known:
        current = part or current
        found.append(current)
    return found


def part_shares(profile: dict) -> dict[str, float]:
    """The fraction of an :func:`operator_profile`'s kernel time in each half of the detector."""
    total = sum(profile["ms_by_part"].values())
    return {part: ms / total for part, ms in profile["ms_by_part"].items()}


def _summed(keys: list[str], values: list[float]) -> dict[str, float]:
    """``values`` added up by ``keys``."""
    totals: dict[str, float] = {}
    for key, value in zip(keys, values, strict=True):
        totals[key] = totals.get(key, 0.0) + value
    return totals


def operator_profile(model: Path, image_size: int, threads: int = 2, runs: int = 20,
                     scopes: dict[str, str] | None = None) -> dict:
    """Where an ONNX model's time goes, from ONNX Runtime's profiler: milliseconds per image spent
    in each operator type (after the session's graph optimisations, so fused kernels count as
    theirs) and, where ``scopes`` (:func:`~edgefm.tools.export.node_scopes` of the model as exported,
    before quantization dropped them) are given, in the encoder and in the pyramid and head
    (:func:`_parts_of_kernels`), over ``runs`` batch-1 runs after one untimed run."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling, options.profile_file_prefix = True, str(Path(folder) / "profile")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name:
                np.random.default_rng(0).random((1, 3, image_size, image_size), dtype=np.float32)}
        session.run(None, feed)
        started = time.perf_counter()
        for _ in range(runs):
            session.run(None, feed)
        wall_ms = (time.perf_counter() - started) / runs * 1e3
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    timed = kernels[len(kernels) // (runs + 1):]  # the untimed first run's kernels come first
    ms = [e["dur"] / 1e3 / runs for e in timed]
    per_op = _summed([e["args"]["op_name"] for e in timed], ms)
    ordered = dict(sorted(per_op.items(), key=lambda item: -item[1]))
    per_part = None
    if scopes:
        names = [e["name"].removesuffix("_kernel_time") for e in timed]
        per_run = len(names) // runs  # every run executes the same kernels, in the same order
        per_part = _summed(_parts_of_kernels(names[:per_run], scopes) * runs, ms)
    return {"ms_by_op_type": ordered, "ms_by_part": per_part, "kernels_ms": sum(ordered.values()),
            "wall_ms": wall_ms,
            "integer_products_ms": sum(ms for op, ms in ordered.items() if op in INTEGER_PRODUCTS),
            "threads": threads, "runs": runs}


_PEAK_SCRIPT = """
import json, sys
import numpy as np
spec = json.loads(sys.argv[1])
images = np.random.default_rng(0).random((1, 3, spec["size"], spec["size"]), dtype=np.float32)
if spec["onnx"]:
    import onnxruntime as ort
    options = ort.SessionOptions(); options.intra_op_num_threads = spec["threads"]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, spec["level"])
    session = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
    run = lambda: session.run(None, {session.get_inputs()[0].name: images})
else:
    import torch
    torch.set_num_threads(spec["threads"])
    model = torch.load(spec["module"], weights_only=False).eval()
    x = torch.from_numpy(images)
    run = lambda: model(x)
    torch.set_grad_enabled(False)
for _ in range(5):
    run()
# VmHWM, not ru_maxrss: Linux carries the parent's peak across fork and exec into ru_maxrss
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]) * 1024)
"""


def peak_memory(variant: Variant, image_size: int, threads: int = 2) -> int:
    """Peak resident bytes of a fresh process that loads the variant and runs 5 images (Linux)."""
    with tempfile.TemporaryDirectory() as folder:
        spec = {"size": image_size, "threads": threads, "onnx": str(variant.onnx) if variant.onnx else None,
                "module": None, "level": LEVEL_NAMES[variant.level]}
        if variant.module is not None:
            spec["module"] = str(Path(folder) / "model.pt")
            torch.save(variant.module, spec["module"])
        done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, json.dumps(spec)], capture_output=True,
                              text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the memory of {variant.name} failed: {done.stderr.strip()[-500:]}")
    return int(done.stdout.strip().splitlines()[-1])


# the fields of a :func:`latencies` timing, as a benchmark record names them
_TIMING_FIELDS = {"median_ms": "latency_ms", "p90_ms": "latency_p90_ms",
                  "after_idle_ms": "latency_after_idle_ms"}


def repeat_ratio(reference_ms: list[float], variant_ms: list[float]) -> tuple[float, list[float]]:
    """A speed-up over repeated measurements: the median of the repeats' ratios, and their min-max."""
    ratios = [r / m for r, m in zip(reference_ms, variant_ms, strict=True)]
    return float(np.median(ratios)), [min(ratios), max(ratios)]


def spread(work: list[Callable[[], object]], gaps: int) -> list[list[Callable[[], object]]]:
    """``work`` cut, in order, into ``gaps`` shares as even as its items allow (one share when
    there is no gap: a single repeat does it all afterwards)."""
    gaps = max(gaps, 1)
    return [work[i * len(work) // gaps:(i + 1) * len(work) // gaps] for i in range(gaps)]


def benchmark(variants: list[Variant], image_size: int, settings: BenchConfig,
              accuracy: Callable[[Variant], dict] | None = None,
              between: list[Callable[[], object]] | None = None) -> dict:
    """Measure every variant in one process; the first one is the reference (model A).

    Returns ``{"machine", "ceiling", "variants", "settings", "repeat_started_s"}``; each variant
    record has the name, format, mAP and mAP@.5 (if ``accuracy`` is given), latency per thread
    count back to back (``latency_ms_<n>t``, median and p90) and with frames arriving at the camera's rate
    (``latency_camera_ms_<n>t``), throughput (None for a model whose batch is fixed), size,
    params, FLOPs, peak memory, achieved GFLOP/s against the ceiling, and ratios to the reference
    (``latency_speedup_<n>t``, ``camera_speedup_<n>t``: reference latency / this latency;
    ``size_reduction``). The accuracies come first (stages pass scores they keep, so timing again
    scores nothing again); then the latencies are measured ``settings.repeats`` times, spread
    through the run: the throughputs, the peak memories and the caller's own timing work
    (``between``: callables, run in order) are done in the gaps between the repeats, so a ratio's
    spread covers a while of the machine's life and not one moment. ``repeat_started_s`` says when
    each repeat began. Each latency is the median of the repeats' medians, and each ratio the
    median of the repeats' ratios, with their min and max in ``<ratio>_range``.
    """
    ceiling = {t: gemm_ceiling(t) for t in settings.threads}
    scores = {v.name: accuracy(v) for v in variants} if accuracy is not None else {}
    top, batch = max(settings.threads), settings.throughput_batch
    rates: dict[str, float | None] = {}
    memory: dict[str, int | None] = {}

    def measure_throughput() -> None:
        rates.update({v.name: throughput(v, image_size, batch, top) if v.takes_batch(batch) else None
                      for v in variants})

    def measure_memory() -> None:
        memory.update({v.name: peak_memory(v, image_size, top) if settings.memory else None
                       for v in variants})

    gaps = spread([measure_throughput, measure_memory, *(between or [])], settings.repeats - 1)
    back_to_back, camera, started = [], [], []
    began = time.perf_counter()
    for repeat in range(settings.repeats):
        started.append(time.perf_counter() - began)
        back_to_back.append({t: latencies(variants, image_size, t, settings) for t in settings.threads})
        camera.append({t: camera_latencies(variants, image_size, t, settings) for t in settings.threads})
        for work in gaps[repeat] if repeat < len(gaps) else []:  # one repeat: its work after it
            work()
    records = []
    for variant in variants:
        record: dict = {"name": variant.name, "format": variant.format, "precision": variant.precision,
                        "params": variant.params, "flops": variant.flops, "size_bytes": variant.size_bytes()}
        if accuracy is not None:
            score = scores[variant.name]
            record.update({k: score[k] for k in ("map", "map50", "map_ci") if k in score})
        for t in settings.threads:
            repeats = {name: [timing[t][variant.name][field] for timing in back_to_back]
                       for field, name in _TIMING_FIELDS.items()}
            repeats["latency_camera_ms"] = [timing[t][variant.name] for timing in camera]
            for name, values in repeats.items():
                record[f"{name}_{t}t"] = float(np.median(values))
            record[f"latency_ms_{t}t_repeats"] = repeats["latency_ms"]
            record[f"latency_camera_ms_{t}t_repeats"] = repeats["latency_camera_ms"]
            if variant.flops:
                achieved = variant.flops / (record[f"latency_ms_{t}t"] / 1e3) / 1e9
                peak = ceiling[t]["fp32_gflops" if variant.precision == "fp32" else "int8_gops"]
                record[f"gflops_{t}t"], record[f"ceiling_fraction_{t}t"] = achieved, achieved / peak
        record[f"throughput_{top}t"] = rates[variant.name]
        record["peak_memory_bytes"] = memory[variant.name]
        records.append(record)
    reference = records[0]
    for record in records:
        for t in settings.threads:
            for ratio, latency in ((f"latency_speedup_{t}t", f"latency_ms_{t}t_repeats"),
                                   (f"camera_speedup_{t}t", f"latency_camera_ms_{t}t_repeats")):
                record[ratio], record[f"{ratio}_range"] = repeat_ratio(reference[latency], record[latency])
        record["size_reduction"] = reference["size_bytes"] / record["size_bytes"]
        if "map" in record:
            record["map_drop"] = reference["map"] - record["map"]
    return {"machine": machine(), "ceiling": list(ceiling.values()), "variants": records,
            "settings": asdict(settings), "repeat_started_s": started}


def block_times(model: torch.nn.Module, blocks: dict[str, torch.nn.Module], image_size: int,
                threads: int = 2, runs: int = 20) -> dict[str, float]:
    """Median milliseconds spent in each named submodule of one batch-1 forward pass; ``other``
    is what the forward spends outside them (normalisation, resizing, additions)."""
    torch.set_num_threads(threads)
    spent: dict[str, list[float]] = {name: [] for name in (*blocks, "total")}
    starts: dict[str, float] = {}
    handles = []
    for name, block in blocks.items():
        handles.append(block.register_forward_pre_hook(lambda m, a, name=name: starts.__setitem__(
            name, time.perf_counter())))
        handles.append(block.register_forward_hook(lambda m, a, o, name=name: spent[name].append(
            time.perf_counter() - starts[name])))
    image = torch.rand(1, 3, image_size, image_size)
    try:
        with torch.no_grad():
            model.eval()(image)
            for values in spent.values():
                values.clear()
            for _ in range(runs):
                start = time.perf_counter()
                model(image)
                spent["total"].append(time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()
    result = {name: float(np.median(values) * 1e3) for name, values in spent.items()}
    result["other"] = result["total"] - sum(result[name] for name in blocks)
    return result
