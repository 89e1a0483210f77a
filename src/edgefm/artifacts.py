"""Where stage results live, how they are keyed, and how they are written safely.

Every stage writes into ``<root>/<profile>/<stage>/<key>/``. The key hashes three things: the
stage's config (the slice of the profile it reads), the keys of the stage results it consumes
(A's identity, for everything built on A), and the stage's *code version*, a number a person
bumps when a change to the stage's code changes what it computes. Moving code, renaming,
rewording a docstring or a model card re-keys nothing, so hours of training stay valid; a change
that does alter results gets a new folder once its version is bumped.

A forgotten bump is caught, not silent: ``stage_versions.json`` records, beside each version, the
hash of the code the stage runs (its modules and every ``edgefm`` module they import, docstrings
and comments left out), and a test fails when that hash moves. Then either bump the stage
(``python -m edgefm.artifacts --bump STAGE``) or, for a change that computes the same results,
record the new hash alone (``python -m edgefm.artifacts``).

Everything is written to a temporary name first and renamed into place, so an interrupted run
never leaves a half-written file where a complete one is expected.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

ARTIFACTS_ENV = "EDGEFM_ARTIFACTS"
_UMASK = os.umask(0o022)  # read the process umask (the only way) and put it straight back
os.umask(_UMASK)
PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The folder holding the book's ``_toc.yml`` (searched upwards from the cwd), else the cwd.

    Book chapters execute with their own folder as working directory; looking upwards puts every
    chapter's artifacts in one place and finds the weights shipped with the book.
    """
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "_toc.yml").is_file() and (folder / "_config.yml").is_file():
            return folder
    return cwd


def artifacts_root() -> Path:
    """``$EDGEFM_ARTIFACTS``, else ``artifacts/`` in :func:`project_root`."""
    if env := os.environ.get(ARTIFACTS_ENV):
        return Path(env).expanduser().resolve()
    return project_root() / "artifacts"


def _module_file(module: str) -> Path | None:
    parts = module.split(".")[1:]
    base = PACKAGE_DIR.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _edgefm_imports(path: Path, module: str) -> set[str]:
    """The ``edgefm`` modules that the file at ``path`` imports (absolute or relative)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "edgefm")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "edgefm":
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # names may be submodules
    return {m for m in found if _module_file(m) is not None}


# Configs enter a stage's key by value (``config_hash``): editing the file that defines another
# stage's config must not invalidate this stage's result.
_NOT_CODE = {"edgefm.config"}


@cache
def code_hash(*modules: str) -> str:
    """Hash the code of ``modules`` and of every ``edgefm`` module they import, transitively
    (except :mod:`edgefm.config`, whose values are hashed instead); docstrings and comments
    do not count."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or name in _NOT_CODE or path is None:
            continue
        seen[name] = path
        todo.extend(_edgefm_imports(path, name))
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(name.encode() + b"\0" + _code_only(seen[name]).encode() + b"\0")
    return digest.hexdigest()[:16]


def _code_only(path: Path) -> str:
    """The module's syntax tree without docstrings (comments never reach it): rewording the
    explanation of a stage must not throw away hours of its training."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


KEYED_WHEN_SET = "keyed_when_set"  # field metadata: the field is in keys only when not at its default


def plain(config: object) -> object:
    """A config as plain JSON-ready data: dataclasses (also inside dicts and tuples) become dicts.
    A field marked :data:`KEYED_WHEN_SET` is left out while it has its default, so that adding
    one keeps every existing key (and every shipped result's config) as it was."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)
                if not (f.metadata.get(KEYED_WHEN_SET) and getattr(config, f.name) == f.default)}
    if isinstance(config, dict):
        return {key: plain(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(plain(value) for value in config)
    return config


def config_hash(config: object) -> str:
    """A short, stable hash of a config dataclass, or of a dict of them."""
    text = json.dumps(plain(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# The code each stage runs, by the name its version is recorded under.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "data": ("edgefm.data.scenes",),
    "pennfudan": ("edgefm.data.pennfudan",),
    "coco": ("edgefm.data.own",),
    "pretrain": ("edgefm.stages.pretrain",),
    "finetune": ("edgefm.stages.finetune",),
    "measuring": ("edgefm.stages.measuring",),
    "feasibility": ("edgefm.stages.feasibility",),
    "students": ("edgefm.tools.distill", "edgefm.tools.students"),
    "pseudo": ("edgefm.tools.pseudo",),
    "peer": ("edgefm.stages.peer",),
    "smaller": ("edgefm.stages.smaller",),
    "quantization": ("edgefm.stages.quantization",),
    "deployment": ("edgefm.stages.deploy", "edgefm.tools.bundle", "edgefm.report", "edgefm.runtime"),
    # the models and scores of those two, kept apart from their timing: a change to one half is
    # bumped there alone, so new timing or report code does not quantize and score everything again
    "quantization-models": ("edgefm.stages.quantization",),
    "deployment-models": ("edgefm.stages.deploy", "edgefm.tools.bundle", "edgefm.runtime"),
}
VERSIONS_FILE = PACKAGE_DIR / "stage_versions.json"


def stage_versions() -> dict[str, dict]:
    """``{stage: {"version": int, "source": code hash}}`` as recorded in ``stage_versions.json``."""
    return json.loads(VERSIONS_FILE.read_text(encoding="utf-8"))


def stale_stage_sources() -> list[str]:
    """The stages whose code changed since their version was recorded (see the module docstring)."""
    recorded = stage_versions()
    return [stage for stage, modules in STAGE_MODULES.items()
            if recorded.get(stage, {}).get("source") != code_hash(*modules)]


def record_stage_sources(bump: tuple[str, ...] = ()) -> dict[str, dict]:
    """Record every stage's current code hash, bumping the versions of the stages in ``bump``."""
    recorded = stage_versions() if VERSIONS_FILE.is_file() else {}
    for stage, modules in STAGE_MODULES.items():
        version = recorded.get(stage, {}).get("version", 1) + (stage in bump)
        recorded[stage] = {"version": version, "source": code_hash(*modules)}
    atomic_write_json(VERSIONS_FILE, recorded)
    return recorded


def stage_key(stage: str, config: object) -> str:
    """The directory name of a stage result: its config (with the keys of what it consumes) and
    its code version."""
    version = stage_versions()[stage]["version"]
    return hashlib.sha256(f"{config_hash(config)}:{stage}:v{version}".encode()).hexdigest()[:12]


def stage_dir(profile: str, stage: str, config: object, code: str | None = None) -> Path:
    """``<root>/<profile>/<stage>/<key>``; ``code`` names the versioned code when it is not
    ``stage`` (two sources of one stage). The directory is not created."""
    return artifacts_root() / profile / stage / stage_key(code or stage, config)


def ensure_dir(target: Path, build: Callable[[Path], None], config: object = None) -> Path:
    """Return ``target`` if it exists, else run ``build(work)`` and rename ``work`` to ``target``.

    ``work`` is ``<target>.partial``, a fixed name: a build killed half-way leaves its work there,
    and the next call hands the same folder to ``build`` again, so a long stage can resume from
    its last checkpoint (a build that cannot resume simply overwrites). The final rename makes a
    result appear whole or not at all. ``config``, if given, is saved as ``config.json`` beside
    the result so a reader can see what made it.
    """
    if target.is_dir():
        return target
    work = target.with_name(target.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    build(work)
    if config is not None:
        atomic_write_json(work / "config.json", plain(config))
    os.replace(work, target)
    return target


def stage(profile: str, name: str, key: object, build: Callable[[Path], dict]) -> dict:
    """Load or compute a stage's results: the one way every stage keeps what it computed.

    ``build(work)`` computes the results (and writes any files it makes, ONNX models, a bundle,
    into ``work``); they are kept as ``results.json`` in the folder keyed by ``key``
    (:func:`stage_dir`, :func:`ensure_dir`) and read from there ever after, so a first build and a
    cached one hand a chapter the same JSON data. Returned with ``folder``; recorded as
    ``metrics/<name>.json`` for the book.
    """
    def build_and_keep(work: Path) -> None:
        atomic_write_json(work / "results.json", build(work))

    target = ensure_dir(stage_dir(profile, name, key), build_and_keep, config=key)
    results = json.loads((target / "results.json").read_text(encoding="utf-8"))
    results["folder"] = str(target)
    write_metrics(profile, name, results)
    return results


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path`` with the
    permissions a plain ``open`` would give (``mkstemp`` makes its files private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def atomic_write_json(path: Path | str, value: object) -> Path:
    """Write ``value`` as indented, key-sorted JSON, atomically."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def metrics_path(profile: str, stage: str) -> Path:
    """``<root>/<profile>/metrics/<stage>.json``."""
    return artifacts_root() / profile / "metrics" / f"{stage}.json"


def write_metrics(profile: str, stage: str, metrics: dict) -> Path:
    """Record a stage's figures; the book and the final summary read them from here."""
    return atomic_write_json(metrics_path(profile, stage), metrics)


def read_metrics(profile: str, stage: str) -> dict:
    """Read a stage's figures, with a clear error if the stage has not run yet."""
    path = metrics_path(profile, stage)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no metrics for stage {stage!r} in profile {profile!r}; run that stage first"
        )
    return json.loads(path.read_text(encoding="utf-8"))


if __name__ == "__main__":  # python -m edgefm.artifacts [--bump STAGE ...]: record the stages' code
    import argparse

    parser = argparse.ArgumentParser(description="record each stage's code hash in stage_versions.json")
    parser.add_argument("--bump", nargs="*", default=[], choices=sorted(STAGE_MODULES),
                        help="stages whose change alters their results: their version goes up by one")
    for stage, entry in record_stage_sources(tuple(parser.parse_args().bump)).items():
        print(f"{stage:13s} v{entry['version']}  {entry['source']}")
