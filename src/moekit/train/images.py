"""Image data for the vision demos: Fashion-MNIST from its Debian package, without dpkg.

Legend: N images, H height, W width.

Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747; MIT licence) ships in the
Debian package ``dataset-fashion-mnist`` as the original ``idx-ubyte.gz`` files. The package
registry is the only network this project may use, so `load_fashion_mnist` fetches the .deb
once with ``apt-get download`` (`moekit.train.fetch.fetch_archive`, sha256-checked) and reads
it with the standard library alone:

- a .deb is an ``ar`` archive (`read_ar`) holding ``debian-binary``, ``control.tar.*`` and
  ``data.tar.{xz,gz,bz2}`` (`deb_data_tar`);
- each idx file (LeCun et al.'s MNIST format, `parse_idx`) is a big-endian header — two zero
  bytes, a type code, the number of dimensions, one uint32 per dimension — then the values.

The four arrays are cached as ``.npy`` files written to a temporary folder and renamed into
place, so an interrupted extraction never leaves half a data set.
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np

from moekit.train.fetch import default_cache_dir, extract_once, fetch_archive

__all__ = ["FASHION_MNIST_CLASSES", "FashionMNIST", "read_ar", "deb_data_tar", "parse_idx", "load_fashion_mnist"]

FASHION_MNIST_DEB = "dataset-fashion-mnist"
FASHION_MNIST_FILE = "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
FASHION_MNIST_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_MNIST_MEMBER = "./usr/share/datasets/fashion-mnist/{split}-{kind}-ubyte.gz"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_SPLITS = {"train": ("train", 60000), "test": ("t10k", 10000)}

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60               # name 16, mtime 12, uid 6, gid 6, mode 8, size 10, "`\n" 2
# idx type codes (http://yann.lecun.com/exdb/mnist/): values are stored big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FashionMNIST(NamedTuple):
    """uint8 images (N, 28, 28) and int64 labels (N,) in 0..9 (`FASHION_MNIST_CLASSES`)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def read_ar(data: bytes) -> dict[str, bytes]:
    """``{member name: bytes}`` of a Unix ``ar`` archive (the container of a .deb).

    Common format: the magic ``!<arch>\\n``, then per member a 60-byte ASCII header (name,
    mtime, uid, gid, mode, decimal size, ``\\x60\\n``) and the data, padded to an even offset.
    GNU's trailing ``/`` on names is stripped; GNU/BSD long-name tables are not needed for
    .deb files and are refused rather than misread.
    """
    if not data.startswith(_AR_MAGIC):
        raise ValueError(f"not an ar archive: starts with {data[:8]!r}, expected {_AR_MAGIC!r}")
    members, pos = {}, len(_AR_MAGIC)
    while pos < len(data):
        header = data[pos:pos + _AR_HEADER]
        if len(header) < _AR_HEADER or header[58:60] != b"`\n":
            raise ValueError(f"corrupt ar header at byte {pos}: {header!r}")
        name = header[:16].decode("ascii").rstrip(" ").rstrip("/")
        if not name or name.startswith("#1/"):
            raise ValueError(f"ar member at byte {pos} uses a long-name table ({header[:16]!r}), not supported")
        size = int(header[48:58].decode("ascii"))
        start = pos + _AR_HEADER
        if start + size > len(data):
            raise ValueError(f"ar member {name!r} needs {size} bytes at byte {start}, the archive has "
                             f"{len(data) - start}")
        members[name] = data[start:start + size]
        pos = start + size + (size % 2)
    return members


def deb_data_tar(deb: bytes) -> tarfile.TarFile:
    """The ``data.tar.*`` payload of a .deb, opened for reading (xz, gz, bz2 or plain)."""
    members = read_ar(deb)
    modes = {"data.tar.xz": "r:xz", "data.tar.gz": "r:gz", "data.tar.bz2": "r:bz2", "data.tar": "r:"}
    for name, mode in modes.items():
        if name in members:
            return tarfile.open(fileobj=io.BytesIO(members[name]), mode=mode)
    raise ValueError(f"no data.tar.{{xz,gz,bz2}} in the .deb (members: {sorted(members)}); "
                     "data.tar.zst would need the zstandard module")


def parse_idx(data: bytes) -> np.ndarray:
    """The array stored in an idx file (gzip-compressed or not), in native byte order."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"not an idx file: header {data[:4]!r}, expected 00 00 <type in "
                         f"{sorted(_IDX_DTYPES)}> <ndim>")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"idx shape {shape} of {dtype} needs {expected} bytes of values, got {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _extract_fashion_mnist(deb_path: Path) -> dict[str, np.ndarray]:
    """``{"train_images": …, …}`` read from the .deb, checked for shapes and label range."""
    arrays = {}
    with deb_data_tar(deb_path.read_bytes()) as tar:
        for split, (prefix, n) in _SPLITS.items():
            for kind, field, shape in (("images-idx3", "images", (n, 28, 28)), ("labels-idx1", "labels", (n,))):
                member = FASHION_MNIST_MEMBER.format(split=prefix, kind=kind)
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    raise ValueError(f"{deb_path.name} has no member {member}") from None
                a = parse_idx(f.read())
                if a.shape != shape or a.dtype != np.uint8:
                    raise ValueError(f"{member}: expected uint8 {shape}, got {a.dtype} {a.shape}")
                arrays[f"{split}_{field}"] = a if field == "images" else a.astype(np.int64)
        for split in _SPLITS:
            labels = arrays[f"{split}_labels"]
            if labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES):
                raise ValueError(f"{split} labels must lie in [0, 10), got [{labels.min()}, {labels.max()}]")
    return arrays


def load_fashion_mnist(cache_dir: Optional[Union[str, os.PathLike]] = None, *, verbose: bool = True) -> FashionMNIST:
    """Fashion-MNIST's 60,000 training and 10,000 test images, fetched and cached on first use.

    The .deb (31 MB) comes through ``apt-get download dataset-fashion-mnist`` with its sha256
    checked; the arrays are cached under ``<cache>/fashion-mnist/*.npy``.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "fashion-mnist"
    fields = FashionMNIST._fields
    if not (target / ".complete").exists():
        deb = fetch_archive(FASHION_MNIST_DEB, FASHION_MNIST_FILE, FASHION_MNIST_SHA256, source="apt",
                            cache_dir=root, what="Fashion-MNIST (31 MB)", verbose=verbose)
        arrays = _extract_fashion_mnist(deb)

        def fill(out: Path) -> None:
            for name in fields:
                np.save(out / f"{name}.npy", arrays[name])

        extract_once(target, fill, FASHION_MNIST_SHA256)
    return FashionMNIST(*(np.load(target / f"{name}.npy") for name in fields))
