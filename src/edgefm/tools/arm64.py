"""A 64-bit Arm board, emulated: does the bundle detect there what it detects here?

Many edge boards are Arm, not x86: a Raspberry Pi 4 (Cortex-A72, ARMv8.0) or 5 (Cortex-A76,
ARMv8.2 with the dot-product instructions), the CPU cores of a Jetson. ONNX Runtime's integer
kernels there are NEON code of their own, picked by the CPU's features, so an INT8 model's outputs
on Arm are not the x86 ones by construction. This module runs the deployed path itself
(:class:`~edgefm.runtime.EdgeDetector`: decode, letterbox, session, NumPy decoder) under
``qemu-aarch64 -cpu CPU`` (Debian's ``qemu-user``) with Debian's arm64 Python and the aarch64 wheels
of the ONNX Runtime, NumPy and Pillow versions installed here, and compares its detections with
this machine's. Emulation checks correctness only: it runs far slower, and its timings mean nothing.
An emulated Arm core does not show the 16-bit pair saturation of x86 CPUs without VNNI (a test
measures it on a Cortex-A72), so on such a CPU, which qemu cannot make into one with VNNI, an Arm
run is also the reference without saturation.

:func:`prepare_root` makes that Python once (package registries only; apt runs with private state,
so the host's package configuration is not touched); it needs Debian 12's sources (Python 3.11).
Debian 12's qemu-user (7.2) passes the host's ``/proc/cpuinfo`` through, in which ONNX Runtime's
CPU detection finds no Arm core and crashes; each emulated CPU therefore gets a folder with its own
``proc/cpuinfo`` beside links to the root's files, which qemu (``-L``) reads before the host's.
(The instructions a kernel may use are those qemu's ``-cpu`` model reports; the two agree.)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ArmCpu:
    """An Arm core as qemu emulates it and as ``/proc/cpuinfo`` names it (MIDR fields, features)."""

    qemu: str
    board: str
    part: int
    variant: int
    revision: int
    features: str

    def cpuinfo(self, cores: int = 2) -> str:
        """``/proc/cpuinfo`` of a board with ``cores`` of these cores, as Linux writes it."""
        core = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                "CPU architecture: 8\nCPU variant\t: {variant:#x}\nCPU part\t: {part:#05x}\n"
                "CPU revision\t: {revision}\n")
        return "\n".join(core.format(i=i, features=self.features, variant=self.variant, part=self.part,
                                     revision=self.revision) for i in range(cores)) + "\n"


ARM_CPUS = {
    "cortex-a72": ArmCpu("cortex-a72", "Raspberry Pi 4", 0xD08, 0x0, 3, "fp asimd evtstrm crc32 cpuid"),
    "cortex-a76": ArmCpu("cortex-a76", "Raspberry Pi 5", 0xD0B, 0x4, 1,
                         "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                         "lrcpc dcpop asimddp"),
}
CHUNK = 32  # images a session run: memory bounded whatever the number of images
RUNTIME_PACKAGES = ("onnxruntime", "numpy", "pillow")  # what edgefm.runtime imports
DEBIAN_PACKAGES = ("libpython3.11-stdlib", "python3.11-minimal", "libstdc++6")
VERSIONS_FILE = "versions.json"  # what prepare_root installed in site/
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")


def default_root() -> Path:
    """Where the emulated board's Python lives: ``EDGEFM_ARM64_ROOT``, else ``.arm64/`` in the project."""
    from edgefm.artifacts import project_root

    return Path(os.environ.get("EDGEFM_ARM64_ROOT") or project_root() / ".arm64").expanduser().resolve()


def python_in(root: Path) -> Path:
    """The board's Python: Debian's arm64 interpreter, which only the emulator can run."""
    return root / "sysroot" / "usr" / "bin" / "python3.11"


def qemu_aarch64(root: Path | None = None) -> str | None:
    """The path of ``qemu-aarch64``, where this x86 machine has it and a prepared ``root`` (by
    default :func:`default_root`); None: the bundle cannot be checked on Arm here."""
    qemu = shutil.which("qemu-aarch64")
    if qemu is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    return qemu if root_is_ready(default_root() if root is None else root) else None


def runtime_versions() -> dict[str, str]:
    """The versions of what :mod:`edgefm.runtime` imports, installed here: the board gets the same."""
    return {name: metadata.version(name) for name in RUNTIME_PACKAGES}


def root_is_ready(root: Path) -> bool:
    """Whether ``root`` holds the board's Python with this machine's runtime versions (a root made
    before an upgrade compares two different ONNX Runtimes: it is not ready)."""
    record = root / VERSIONS_FILE
    return (python_in(root).is_file() and record.is_file()
            and json.loads(record.read_text()) == runtime_versions())


def prepare_root(root: Path) -> Path:
    """Make ``root``: ``sysroot/`` holds Debian's arm64 Python 3.11 and the libraries it links,
    ``site/`` the aarch64 wheels of this machine's ONNX Runtime, NumPy and Pillow versions, and
    ``cpus/<name>/`` each emulated CPU's view. Needs apt-get (Debian bookworm sources), dpkg-deb
    and pip, and the package registries; not root."""
    root = root.resolve()  # apt reads relative folders from /
    apt_dir = root / "apt"
    for sub in ("state/lists/partial", "cache/archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "state" / "status").touch()
    options = {"Dir::State": apt_dir / "state", "Dir::State::status": apt_dir / "state" / "status",
               "Dir::Cache": apt_dir / "cache", "APT::Architecture": "arm64", "APT::Architectures": "arm64",
               "Debug::NoLocking": 1}
    apt = ["apt-get", "-qq", *(f for key, value in options.items() for f in ("-o", f"{key}={value}"))]
    _run([*apt, "update"], "reading the arm64 package lists")
    _run([*apt, "install", "-y", "--download-only", "--no-install-recommends", *DEBIAN_PACKAGES],
         "downloading Debian's arm64 Python")
    for deb in sorted((apt_dir / "cache" / "archives").glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root / "sysroot")], f"unpacking {deb.name}")
    pins = [f"{name}=={version}" for name, version in runtime_versions().items()]
    platforms = [flag for tag in WHEEL_PLATFORMS for flag in ("--platform", tag)]
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", "--target", str(root / "site"),
          *platforms, "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:", *pins],
         "downloading the aarch64 wheels")
    for cpu in ARM_CPUS.values():
        cpu_root(root, cpu)
    shutil.rmtree(apt_dir)  # the packages are unpacked; their lists and files are not needed again
    (root / VERSIONS_FILE).write_text(json.dumps(runtime_versions()))
    return root


def cpu_root(root: Path, cpu: ArmCpu) -> Path:
    """The folder qemu reads first for ``cpu`` (``-L``): the root's files, and ``cpu``'s cpuinfo;
    made (or mended, if :data:`ARM_CPUS` changed since the root was made) only when it differs."""
    folder = root / "cpus" / cpu.qemu
    cpuinfo = folder / "proc" / "cpuinfo"
    if cpuinfo.is_file() and cpuinfo.read_text() == cpu.cpuinfo():
        return folder
    (folder / "proc").mkdir(parents=True, exist_ok=True)
    for name in ("etc", "lib", "usr"):
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path("..", "..", "sysroot", name))
    cpuinfo.write_text(cpu.cpuinfo())
    return folder


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(command[:2])} ...):\n{done.stderr[-2000:]}")


def detect_on_arm(bundle: Path | str, image_files: list[Path], cpu: str = "cortex-a76",
                  root: Path | None = None) -> dict:
    """The bundle's detections of ``image_files`` (one thread) and its raw outputs for the
    letterboxed images, computed on an emulated ``cpu`` (a key of :data:`ARM_CPUS`)."""
    root = default_root() if root is None else root
    qemu = qemu_aarch64(root)
    if qemu is None:
        raise RuntimeError(f"no emulated Arm board here: needs qemu-aarch64 and {root} (make arm64-root)")
    src = Path(__file__).resolve().parents[2]  # the folder that holds the edgefm package
    env = {**os.environ, "QEMU_LD_PREFIX": str(cpu_root(root, ARM_CPUS[cpu])), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "site"), str(src)])}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "found.npz"
        # -S: no site folders, which -L would find on the host (x86 packages of the same Python)
        command = [qemu, "-cpu", cpu, str(python_in(root)), "-S", "-m", "edgefm.tools.arm64", str(bundle),
                   str(out), *map(str, image_files)]
        _run(command, f"running {bundle} on an emulated {cpu}", env)
        with np.load(out) as saved:
            return _unpack(dict(saved))


def detect_here(bundle: Path | str, image_files: list[Path]) -> dict:
    """What :func:`detect_on_arm` computes, on this machine (one thread), :data:`CHUNK` images a run."""
    from edgefm.runtime import EdgeDetector, detect
    from edgefm.runtime.images import read_image

    if not image_files:
        raise ValueError(f"{bundle}: no image files to run the bundle on")
    detector = EdgeDetector(bundle, threads=1)
    runs: list[tuple[np.ndarray, ...]] = []  # what the runs inside detect() computed, kept for the comparison

    def run(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        runs.append(tuple(detector.run(batch)))
        return runs[-1]

    found = [detection for start in range(0, len(image_files), CHUNK)
             for detection in detect(run, [read_image(path) for path in image_files[start:start + CHUNK]],
                                     detector.spec)]
    outputs = [np.concatenate(parts) for parts in zip(*runs, strict=True)]
    return {"machine": platform.machine(), "outputs": outputs, "detections": found}


def arm_agreement(bundle: Path | str, image_files: list[Path], cpus: tuple[str, ...] = tuple(ARM_CPUS),
                  root: Path | None = None, min_score: float = 0.3) -> dict[str, dict]:
    """:func:`compare` of the bundle on each emulated Arm CPU with this machine."""
    here = detect_here(bundle, image_files)
    return {cpu: compare(here, detect_on_arm(bundle, image_files, cpu, root), cpu, min_score) for cpu in cpus}


def map_on_arm(bundle: Path | str, split, cpu: str = "cortex-a72", root: Path | None = None,
               images: int | None = None, bootstrap: int = 1000) -> dict:
    """The bundle's mAP on the first ``images`` (default: all) of ``split`` (a
    :class:`~edgefm.data.coco.CocoSplit`), computed by its own program on an emulated ``cpu`` and on
    this machine, and the gap (Arm minus here) in mAP units with its 95 % paired-bootstrap interval
    (``None`` without ``bootstrap``). An Arm core adds INT8 products in 32 bits, as a CPU with VNNI
    does, so on an x86 CPU without VNNI a small gap bounds what its 16-bit pair sums can cost; the
    gap also holds the other differences of two CPUs' kernels (rounding), so it does not isolate
    that cost. The images run in one emulated process: minutes for a small model's eval split."""
    from edgefm.data.coco import CocoDetection
    from edgefm.tools.evaluate import coco_evaluate, gap_interval, to_coco_results

    scenes = CocoDetection(split)
    chosen = scenes.images[:images]
    files = [split.images / info["file_name"] for info in chosen]
    ids = [info["id"] for info in chosen]

    def scored(run: dict) -> dict:
        records = to_coco_results(run["detections"], ids, [1.0] * len(ids), scenes.category_ids)
        return coco_evaluate(split.annotations, records, bootstrap, samples=bootstrap > 0, image_ids=ids)

    here, there = scored(detect_here(bundle, files)), scored(detect_on_arm(bundle, files, cpu, root))
    return {"cpu": cpu, "board": ARM_CPUS[cpu].board, "images": len(files), "map_here": here["map"],
            "map_arm": there["map"], "gap": there["map"] - here["map"],
            "gap_ci": gap_interval(there["map_samples"], here["map_samples"]) if bootstrap else None}


def compare(here: dict, there: dict, cpu: str, min_score: float = 0.3) -> dict:
    """How a run on the emulated ``cpu`` (:func:`detect_on_arm`) agrees with this machine's
    (:func:`detect_here`): the largest difference of the raw outputs, and the detections'
    agreement (:func:`~edgefm.tools.evaluate.detection_agreement`)."""
    from edgefm.tools.evaluate import detection_agreement

    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(here["outputs"], there["outputs"], strict=True))
    found = detection_agreement(here["detections"], there["detections"], min_score=min_score)
    return {"board": ARM_CPUS[cpu].board, "machine": there["machine"], "images": len(here["detections"]),
            "max_abs_diff": diff, "detections": found,
            "same": same_detections(here["detections"], there["detections"], min_score)}


def same_detections(here: list[dict], there: list[dict], min_score: float, score_tol: float = 1e-3,
                    box_tol: float = 0.5) -> bool:
    """Whether two runs found the same detections scored >= ``min_score`` in every image: as many,
    each with a twin of the same class, score within ``score_tol`` and corners within ``box_tol``
    pixels. (Overlap would not do: a box clipped to nothing at the border overlaps not even itself.)"""
    pairs = [*zip(here, there, strict=True), *zip(there, here, strict=True)]  # each way round
    return all(_all_twinned(mine, theirs, min_score, score_tol, box_tol) for mine, theirs in pairs)


def _all_twinned(mine: dict, theirs: dict, min_score: float, score_tol: float, box_tol: float) -> bool:
    """Whether each of ``mine`` scored >= ``min_score`` has its own twin in ``theirs`` (which may
    score up to ``score_tol`` below the threshold), the closest in corners first."""
    fields = ("labels", "scores", "boxes")
    candidates = theirs["scores"] >= min_score - score_tol
    labels, scores, boxes = (theirs[key][candidates] for key in fields)
    unused = np.ones(len(scores), bool)
    keep = mine["scores"] >= min_score
    for label, score, box in zip(*(mine[key][keep] for key in fields), strict=True):
        distance = np.abs(boxes - box).max(axis=1) if len(boxes) else np.zeros(0)
        twins = unused & (labels == label) & (np.abs(scores - score) <= score_tol) & (distance <= box_tol)
        if not twins.any():
            return False
        unused[np.flatnonzero(twins)[np.argmin(distance[twins])]] = False
    return True


def describe(agreement: dict[str, dict] | None, without_vnni: bool = False) -> str:
    """The check in a sentence for the book (``agreement`` from :func:`arm_agreement`; None: not run).
    ``without_vnni``: this machine is an x86 CPU without VNNI, whose 16-bit pair sums can saturate;
    an emulated Arm core's do not (``tests/test_arm64.py`` measures it on a Cortex-A72), so the
    same detections there also show that saturation did not change them here."""
    if agreement is None:
        return ("This machine has no emulated Arm board (make arm64-root prepares one, with Debian's "
                "qemu-user), so the bundle was not run on Arm in this build.")
    sentences = []
    for cpu, record in agreement.items():
        found = record["detections"]
        outputs = ("the same raw outputs as here" if record["max_abs_diff"] == 0 else
                   f"raw outputs within {record['max_abs_diff']:.2g} of this machine's")
        there, here, score = found["candidate_detections"], found["reference_detections"], found["min_score"]
        if there == 0:
            verdict = (f"as here, no detection scored at least {score:g}" if here == 0 else
                       f"no detection scored at least {score:g}, against {here} here")
        else:
            verdict = (f"the same {there} detections" if record["same"] else
                       f"{there} detections against {here} here, {found['precision']:.0%} of them matched")
            verdict += f" (score at least {score:g}; largest score change {found['max_score_gap']:.2g})"
        images = f"{record['images']} image" + ("s" if record["images"] != 1 else "")
        sentences.append(f"On an emulated {cpu} (a {record['board']}'s core), the bundle gives {outputs} for "
                         f"{images} and {verdict}.")
    if without_vnni and all(record["same"] for record in agreement.values()):
        sentences.append("An emulated Arm core does not saturate its INT8 sums as this CPU without VNNI can "
                         "(a test measures it), so the agreement also shows that saturation did not change "
                         "the bundle's detections here.")
    return " ".join(sentences)


def _pack(machine: str, outputs: list[np.ndarray], detections: list[dict]) -> dict[str, np.ndarray]:
    packed = {"machine": np.array(machine), **{f"output_{i}": o for i, o in enumerate(outputs)}}
    for i, found in enumerate(detections):
        packed.update({f"detections_{i}_{key}": found[key] for key in ("boxes", "scores", "labels")})
    return packed


def _unpack(saved: dict[str, np.ndarray]) -> dict:
    outputs = [saved[f"output_{i}"] for i in range(sum(k.startswith("output_") for k in saved))]
    count = sum(k.endswith("_scores") for k in saved)
    detections = [{key: saved[f"detections_{i}_{key}"] for key in ("boxes", "scores", "labels")}
                  for i in range(count)]
    return {"machine": str(saved["machine"]), "outputs": outputs, "detections": detections}


def main(argv: list[str]) -> None:
    """``python -m edgefm.tools.arm64 prepare ROOT``: :func:`prepare_root` (``make arm64-root``);
    ``python -m edgefm.tools.arm64 BUNDLE OUT.npz IMAGE...``: :func:`detect_here`, saved (what
    :func:`detect_on_arm` runs on the emulated board; it imports no PyTorch)."""
    if argv[:1] == ["prepare"]:
        prepare_root(Path(argv[1]))
        return
    bundle, out, files = argv[0], argv[1], [Path(f) for f in argv[2:]]
    found = detect_here(bundle, files)
    np.savez(out, **_pack(found["machine"], found["outputs"], found["detections"]))


if __name__ == "__main__":
    main(sys.argv[1:])
