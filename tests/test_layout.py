"""The package layout reads the flow one way: stages build only on earlier stages, tools on no
stage, the deployed path (``edgefm.runtime``) imports no PyTorch, and one loop trains."""

import ast
from pathlib import Path

import pytest

from edgefm.stages import ORDER

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "edgefm"


def imported(path: Path) -> set[str]:
    """Every module that the file at ``path`` imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_imported_sees_nested_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from edgefm.stages.deploy import compress\n")
    assert imported(module) == {"os", "edgefm.stages.deploy"}


@pytest.mark.parametrize("stage", ORDER)
def test_a_stage_builds_only_on_earlier_stages(stage):
    later = {f"edgefm.stages.{s}" for s in ORDER[ORDER.index(stage) + 1:]}
    assert not imported(PACKAGE / "stages" / f"{stage}.py") & later


def test_every_stage_module_is_in_the_order():
    assert {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__"} == set(ORDER)


@pytest.mark.parametrize("tool", sorted(p.stem for p in (PACKAGE / "tools").glob("*.py")))
def test_a_tool_imports_no_stage(tool):
    assert not {m for m in imported(PACKAGE / "tools" / f"{tool}.py") if m.startswith("edgefm.stages")}


DEPLOYED_PATH = ["runtime/__init__.py", "runtime/images.py", "runtime/decode.py", "errors.py"]


@pytest.mark.parametrize("module", DEPLOYED_PATH)
def test_the_deployed_path_imports_no_pytorch(module):
    heavy = {m for m in imported(PACKAGE / module)
             if m.split(".")[0] == "torch" or m.startswith(("edgefm.tools", "edgefm.stages"))}
    assert not heavy


def test_one_module_steps_an_optimiser():
    """Every stage trains through the one training loop, so only it calls ``zero_grad``."""
    stepping = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                if ".zero_grad(" in p.read_text(encoding="utf-8")}
    assert stepping == {"tools/training.py"}
