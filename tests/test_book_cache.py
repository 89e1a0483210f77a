"""The book's extensions: every chapter re-executes after a library change, however the book is built,
and its kernels start without a warning."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("edgefm_cache", ROOT / "book" / "_ext" / "edgefm_cache.py")
edgefm_cache = importlib.util.module_from_spec(spec)
spec.loader.exec_module(edgefm_cache)


def tiny_book(root: Path) -> None:
    """A one-chapter book whose output depends on a library file, not on its own code."""
    (root / "src" / "edgefm").mkdir(parents=True)
    (root / "src" / "edgefm" / "answer.py").write_text("ANSWER = 41\n")
    (root / "_config.yml").write_text(
        "title: t\nexecute:\n  execute_notebooks: cache\n"
        f"sphinx:\n  local_extensions:\n    edgefm_cache: {ROOT / 'book' / '_ext'}\n"
        f"    edgefm_kernel: {ROOT / 'book' / '_ext'}\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: chapter\n")
    (root / "chapter.md").write_text(
        "---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n"
        "kernelspec:\n  display_name: Python 3\n  language: python\n  name: python3\n---\n\n# Chapter\n\n"
        "```{code-cell} ipython3\nexec(open('src/edgefm/answer.py').read())\n"
        "print('answer', ANSWER + 1)\n```\n")


def test_hash_covers_library_weights_and_data_folder_and_a_change_clears_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(edgefm_cache.DATA_ENV, raising=False)
    tiny_book(tmp_path)
    before = edgefm_cache.inputs_hash(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.json").write_text("{}")
    with_weights = edgefm_cache.inputs_hash(tmp_path)
    assert with_weights != before
    (tmp_path / "src" / "edgefm" / "__pycache__").mkdir()
    (tmp_path / "src" / "edgefm" / "__pycache__" / "answer.pyc").write_bytes(b"\0")
    assert edgefm_cache.inputs_hash(tmp_path) == with_weights  # bytecode is not an input
    versions = tmp_path / "src" / "edgefm" / "stage_versions.json"
    versions.write_text('{"a": 1}')
    assert edgefm_cache.inputs_hash(tmp_path) != with_weights  # package data is (a version bump)
    versions.unlink()
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "instances.json").write_text("{}")
    monkeypatch.setenv(edgefm_cache.DATA_ENV, str(tmp_path / "coco"))
    with_data = edgefm_cache.inputs_hash(tmp_path)
    assert with_data != with_weights  # another dataset: every chapter again
    (tmp_path / "coco" / "instances.json").write_text('{"images": []}')
    assert edgefm_cache.inputs_hash(tmp_path) != with_data  # new labels too
    monkeypatch.delenv(edgefm_cache.DATA_ENV)
    cache = tmp_path / "cache"
    assert not edgefm_cache.refresh_cache(cache, with_weights)  # a first build: nothing to clear
    (cache / "outputs").write_text("old")
    assert not edgefm_cache.refresh_cache(cache, with_weights) and (cache / "outputs").exists()
    assert edgefm_cache.refresh_cache(cache, "other") and not (cache / "outputs").exists()


@pytest.mark.skipif(not (Path(sys.executable).parent / "jupyter-book").exists(), reason="needs jupyter-book")
def test_jb_build_alone_reexecutes_after_a_library_change_and_its_kernel_starts_without_a_warning(tmp_path):
    tiny_book(tmp_path)
    jb = Path(sys.executable).parent / "jupyter-book"

    def build() -> str:
        done = subprocess.run([str(jb), "build", str(tmp_path), "--path-output", str(tmp_path)], check=True,
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert "without encryption" not in done.stdout + done.stderr  # ipykernel's warning, once a chapter
        return (tmp_path / "_build" / "html" / "chapter.html").read_text()

    assert "answer 42" in build()
    (tmp_path / "src" / "edgefm" / "answer.py").write_text("ANSWER = 99\n")
    assert "answer 100" in build()
