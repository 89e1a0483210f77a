"""A Sphinx extension: re-execute every chapter when the ``edgefm`` library, the shipped weights or
the data folder (``EDGEFM_DATA``) change, however the book is built (``make book``, ``jb build .``,
the publishing workflow).

jupyter-cache keys a chapter's outputs by its code cells only, and Sphinx re-reads only the pages
whose source changed; a chapter's outputs also depend on the library it imports and on the
results shipped in ``weights/``. This extension hashes both; when the hash differs from the one
stored beside the execution cache, it clears the cache and marks every page out of date.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

HASH_FILE = "edgefm-library.hash"
DATA_ENV = "EDGEFM_DATA"  # edgefm.config.DATA_ENV; the extension does not import the library


def inputs_hash(root: Path) -> str:
    """SHA-256 (16 hex digits) of every file under ``src/edgefm`` (code and package data, such as
    the stage versions) and ``weights/``, and of the data folder a reader chose; Python's bytecode
    caches do not count."""
    files = sorted(p for folder in (root / "src" / "edgefm", root / "weights") for p in folder.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    if os.environ.get(DATA_ENV):  # another dataset, or new labels: every chapter's outputs change
        folder = Path(os.environ[DATA_ENV]).expanduser().resolve()
        digest.update(str(folder).encode() + b"\0")
        for labels in sorted(folder.glob("instances.json")) + sorted(folder.glob("*/instances.json")):
            digest.update(labels.read_bytes())
    return digest.hexdigest()[:16]


def refresh_cache(cache: Path, current: str) -> bool:
    """Clear ``cache`` if it was made with other inputs than ``current``; record ``current``.
    Returns whether the inputs changed since the last build that used this cache."""
    stored = cache / HASH_FILE
    changed = stored.is_file() and stored.read_text().strip() != current
    if changed:
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    stored.write_text(current + "\n")
    return changed


def _on_builder_inited(app) -> None:
    from sphinx.util import logging

    cache = Path(app.env.mystnb_config.execution_cache_path)
    app.env.edgefm_inputs_changed = refresh_cache(cache, inputs_hash(Path(app.srcdir)))
    if app.env.edgefm_inputs_changed:
        logging.getLogger(__name__).info(
            f"edgefm library or weights changed: cleared {cache}; every chapter runs again")


def _on_env_get_outdated(app, env, added, changed, removed) -> list[str]:
    return sorted(env.found_docs) if getattr(env, "edgefm_inputs_changed", False) else []


def setup(app) -> dict:
    """Sphinx's entry point (``local_extensions`` in ``_config.yml``)."""
    app.connect("builder-inited", _on_builder_inited, priority=900)  # after myst-nb sets the path
    app.connect("env-get-outdated", _on_env_get_outdated)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":  # the hash alone, e.g. for a CI cache key: python book/_ext/edgefm_cache.py
    print(inputs_hash(Path.cwd()))
