"""Instruction sets: what this CPU has, and what an INT8 model computes on a CPU without VNNI.

ONNX Runtime's u8 x s8 integer kernels differ by instruction set. With VNNI (AVX-512 VNNI,
AVX-VNNI) four u8 x s8 products are summed straight into 32 bits. Without it (AVX2 only: most x86
CPUs before 2019, many edge boxes today) ``vpmaddubsw`` first adds *pairs* of products in 16 bits,
saturating at 32,767: two products of 255 x 127 already overflow. The same INT8 file then computes
different outputs on different CPUs. Weights of at most 64 in magnitude (``reduce_range``'s 7 bits,
or QAT's 63) keep every pair within 2 x 255 x 64 = 32,640, so they cannot saturate.

To see what a model computes without VNNI on any x86 machine, :func:`outputs_on_avx2` runs it under
``qemu-x86_64 -cpu Haswell`` (Debian's ``qemu-user``): user-mode emulation of an AVX2-only CPU, whose
features ONNX Runtime detects and whose kernels it then takes. Emulation checks correctness only:
it runs far slower, and its timings mean nothing.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
EMULATED_CPU = "Haswell"  # AVX2 and FMA, no AVX-512, no VNNI
PAIR_SUM_LIMIT = 2**15 - 1  # what a 16-bit pair sum holds
SAFE_WEIGHT_PEAK = PAIR_SUM_LIMIT // (2 * 255)  # 64: the largest weight two u8 products can carry


def cpu() -> tuple[str, set[str]]:
    """This CPU's model name and feature flags (from ``/proc/cpuinfo``; empty flags elsewhere)."""
    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return name, flags


def isa(flags: set[str] | None = None) -> dict[str, bool]:
    """Which of :data:`ISA_FLAGS` the CPU has: what every timing records."""
    flags = cpu()[1] if flags is None else flags
    return {flag: flag in flags for flag in ISA_FLAGS}


def has_vnni(features: dict[str, bool]) -> bool:
    """Whether INT8 products are summed in 32 bits (no pair saturation) on a CPU with ``features``."""
    return any(features.get(flag) for flag in VNNI_FLAGS)


def avx2_only(features: dict[str, bool]) -> bool:
    """Whether a CPU with ``features`` is itself one without VNNI (AVX2, no VNNI): what its INT8
    models compute there is what every such CPU computes, measured natively."""
    return bool(features.get("avx2")) and not has_vnni(features)


def can_compare() -> bool:
    """Whether this machine can show what VNNI changes: it has VNNI itself and can emulate a CPU
    without it. (On a CPU without VNNI, the emulated CPU computes what this one does, so a
    comparison would pass whatever the model; there the weights' range has to decide.)"""
    return emulator() is not None and has_vnni(isa())


def emulator() -> list[str] | None:
    """The command prefix that runs a program on an emulated AVX2-only CPU, if this machine can."""
    qemu = shutil.which("qemu-x86_64")
    if platform.machine() not in ("x86_64", "AMD64") or qemu is None:
        return None
    return [qemu, "-cpu", EMULATED_CPU]


def run_session(model: Path | str, images: np.ndarray) -> list[np.ndarray]:
    """Every output of ``model`` for ``images``, one image at a time (INT8 exports may have a fixed
    batch of 1), on one thread, concatenated over the images."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: images[i:i + 1]}) for i in range(len(images))]
    return [np.concatenate(outputs) for outputs in zip(*runs, strict=True)]


def outputs_on_avx2(models: list[Path], images: np.ndarray) -> dict[str, list[np.ndarray]] | None:
    """:func:`run_session` of each model on an emulated AVX2-only CPU (None: no emulator here)."""
    prefix = emulator()
    if prefix is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "images.npy", images)
        command = [*prefix, sys.executable, "-m", "edgefm.tools.isa", tmp, *map(str, models)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "TCG doesn't support" not in line]
            errors = "\n".join(lines[-20:])
            names = ", ".join(map(str, models))
            raise RuntimeError(f"running {names} on an emulated {EMULATED_CPU} failed:\n{errors}")
        return {str(model): list(np.load(Path(tmp) / f"{i}.npz").values()) for i, model in enumerate(models)}


def avx2_agreement(models: list[Path], images: np.ndarray, tolerance: float = 1e-3) -> dict[str, dict] | None:
    """For each model, how far its outputs on an emulated AVX2-only CPU are from this CPU's: the
    largest absolute difference, and ``same`` when every output is within ``tolerance`` (float
    kernels of different vector widths round differently; a saturated integer sum is far off).
    None where :func:`can_compare` is false."""
    if not can_compare():
        return None
    emulated = outputs_on_avx2(models, images)
    agreement = {}
    for model in models:
        here = run_session(model, images)
        there = emulated[str(model)]
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(here, there, strict=True))
        agreement[str(model)] = {"cpu": EMULATED_CPU, "images": len(images), "max_abs_diff": diff,
                                 "same": diff <= tolerance}
    return agreement


def evaluate_on_avx2(model: Path, split, cfg, stride: float) -> dict | None:
    """COCO metrics of an ONNX ``model`` on ``split`` (a :class:`~edgefm.data.coco.CocoSplit`)
    computed on an emulated AVX2-only CPU (None where :func:`can_compare` is false). The split
    is preprocessed and decoded here, exactly as :func:`~edgefm.tools.evaluate.evaluate_split` does;
    only the session runs under emulation, all images in one emulated process."""
    from edgefm.runtime import onnx_runner, open_session
    from edgefm.tools.evaluate import evaluate_split

    if not can_compare():
        return None
    inputs: list[np.ndarray] = []
    native = onnx_runner(open_session(model))

    def record(images: np.ndarray) -> list[np.ndarray]:
        inputs.append(images)
        return native(images)

    evaluate_split(record, split, cfg, stride)  # the batches evaluate_split makes, in its order
    outputs = outputs_on_avx2([model], np.concatenate(inputs))[str(model)]
    starts = np.cumsum([0, *(len(batch) for batch in inputs)])
    replay = iter([[o[a:b] for o in outputs] for a, b in zip(starts[:-1], starts[1:], strict=True)])
    return evaluate_split(lambda images: next(replay), split, cfg, stride)


def weight_peak(model: Path | str) -> int | None:
    """The largest magnitude of the model's 8-bit integer weights (None: it has none): at most
    :data:`SAFE_WEIGHT_PEAK` and its u8 x s8 products cannot saturate on any x86 CPU."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model)).graph
    peaks = [int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max()) for t in graph.initializer
             if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) > 1]
    return max(peaks) if peaks else None


def main(argv: list[str]) -> None:
    """``python -m edgefm.tools.isa FOLDER MODEL...``: run each model on ``FOLDER/images.npy``, writing
    ``FOLDER/<i>.npz`` (what :func:`outputs_on_avx2` runs under the emulator)."""
    folder, models = Path(argv[0]), argv[1:]
    images = np.load(folder / "images.npy")
    for i, model in enumerate(models):
        np.savez(folder / f"{i}.npz", *run_session(model, images))


if __name__ == "__main__":
    main(sys.argv[1:])
