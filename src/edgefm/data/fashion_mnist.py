"""Reading the raw Fashion-MNIST files (the items that the scenes are composed from).

The files are looked for, in order, in ``$EDGEFM_FASHION_MNIST``, in Debian's
``dataset-fashion-mnist`` package, and in torchvision's cache layout. Nothing is downloaded
unless the caller asks (``download=True``, or ``EDGEFM_DOWNLOAD=1``): the book and the tests
run offline.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefm.config import DOWNLOAD_ENV
from edgefm.errors import InputError

FASHION_MNIST_ENV = "EDGEFM_FASHION_MNIST"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/edgefm").expanduser()
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class FashionMNISTNotFound(InputError, FileNotFoundError):
    """The raw files are nowhere this machine can see; the message says how to get them."""


@dataclass(frozen=True)
class Items:
    """One split of Fashion-MNIST: ``images`` (N, 28, 28) uint8 and ``labels`` (N,) int64."""

    images: np.ndarray
    labels: np.ndarray


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): the big-endian format MNIST is distributed in."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read IDX file ({error})") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says {shape}, file holds {body.size} values")
    return body.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def candidate_dirs() -> list[Path]:
    """The folders searched for the raw files, in order."""
    dirs = [Path(os.environ[FASHION_MNIST_ENV]).expanduser()] if FASHION_MNIST_ENV in os.environ else []
    return [*dirs, DEBIAN_DIR, CACHE_DIR / "FashionMNIST" / "raw"]


def _download() -> None:
    from torchvision.datasets import FashionMNIST

    FashionMNIST(root=str(CACHE_DIR), train=True, download=True)
    FashionMNIST(root=str(CACHE_DIR), train=False, download=True)


def load_items(split: str, download: bool | None = None) -> Items:
    """Load the ``train`` or ``test`` split of Fashion-MNIST."""
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    image_stem, label_stem = _FILES[split]
    for folder in candidate_dirs():
        images, labels = _find(folder, image_stem), _find(folder, label_stem)
        if images and labels:
            items = Items(read_idx(images), read_idx(labels).astype(np.int64))
            if len(items.images) != len(items.labels):
                raise ValueError(f"{folder}: {len(items.images)} images but {len(items.labels)} labels")
            return items
    if download if download is not None else os.environ.get(DOWNLOAD_ENV) == "1":
        _download()
        return load_items(split, download=False)
    searched = "\n  ".join(str(d) for d in candidate_dirs())
    raise FashionMNISTNotFound(
        f"Fashion-MNIST {split} files ({image_stem}[.gz], {label_stem}[.gz]) not found in:\n  "
        f"{searched}\nInstall them with `apt-get install dataset-fashion-mnist`, point "
        f"{FASHION_MNIST_ENV} at a folder holding them, or set {DOWNLOAD_ENV}=1 to let "
        "torchvision download them (needs a network)."
    )
