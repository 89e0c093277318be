"""Vision: the Fashion-MNIST loader's parsers (ar, .deb, idx) and the V-MoE ViT with its dense twin."""
import dataclasses
import gzip
import hashlib
import io
import math
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import moekit
import moekit.train.fetch as fetch_mod
import moekit.train.images as images
from moekit.layers import MoEConfig
from moekit.models import ViTConfig, ViTMoE, active_param_counts, vit_dense_twin
from moekit.models.vision import VMOE_DEFAULTS
from moekit.train.images import deb_data_tar, load_fashion_mnist, parse_idx, read_ar


# -- hand-built archives ---------------------------------------------------------------------
def make_ar(members: dict) -> bytes:
    """A GNU-style ar archive: 60-byte headers (name with a trailing '/'), data padded to even."""
    out = [b"!<arch>\n"]
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii")
        assert len(header) == 60
        out += [header, data, b"\n" * (len(data) % 2)]
    return b"".join(out)


def make_tar(files: dict, mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_deb(files: dict, data_member: str = "data.tar.xz") -> bytes:
    mode = {"data.tar.xz": "w:xz", "data.tar.gz": "w:gz", "data.tar": "w"}[data_member]
    return make_ar({"debian-binary": b"2.0\n", "control.tar.xz": make_tar({"./control": b"Package: x\n"}),
                    data_member: make_tar(files, mode)})


def make_idx(a: np.ndarray, code: int) -> bytes:
    """The idx format written independently of the parser: struct for the header, tobytes for values."""
    header = struct.pack(">BBBB", 0, 0, code, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


# -- ar / deb / idx ----------------------------------------------------------------------------
def test_read_ar_members_with_odd_sizes_and_padding():
    members = {"debian-binary": b"2.0\n", "odd": b"abc", "empty": b"", "bin": bytes(range(256)) * 3 + b"x"}
    assert read_ar(make_ar(members)) == members


@pytest.mark.skipif(shutil.which("ar") is None, reason="binutils' ar is not installed")
def test_read_ar_matches_binutils_ar(tmp_path):
    files = {"one.txt": b"hello\n", "two.bin": b"\x00\x01\x02", "three": b"odd"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    subprocess.run(["ar", "rcD", "x.a", *files], cwd=tmp_path, check=True)
    assert read_ar((tmp_path / "x.a").read_bytes()) == files


def test_read_ar_rejects_bad_archives():
    with pytest.raises(ValueError, match="not an ar archive"):
        read_ar(b"PK\x03\x04 a zip file")
    good = make_ar({"a": b"0123456789"})
    with pytest.raises(ValueError, match="needs 10 bytes"):
        read_ar(good[:-4])
    with pytest.raises(ValueError, match="corrupt ar header"):
        read_ar(good[:8] + b"x" * 60)


@pytest.mark.parametrize("member", ["data.tar.xz", "data.tar.gz", "data.tar"])
def test_deb_data_tar_opens_each_compression(member):
    deb = make_deb({"./usr/share/a.txt": b"payload"}, member)
    with deb_data_tar(deb) as tar:
        assert tar.extractfile("./usr/share/a.txt").read() == b"payload"


def test_deb_without_data_tar_is_refused():
    with pytest.raises(ValueError, match="no data.tar"):
        deb_data_tar(make_ar({"debian-binary": b"2.0\n", "data.tar.zst": b"..."}))


@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x0C, np.int32), (0x0D, np.float32)])
@pytest.mark.parametrize("compress", [False, True])
def test_parse_idx_round_trip(code, dtype, compress):
    a = (np.arange(3 * 5 * 7) * 37 % 251).astype(dtype).reshape(3, 5, 7)
    data = make_idx(a, code)
    got = parse_idx(gzip.compress(data) if compress else data)
    assert got.dtype == np.dtype(dtype) and got.shape == (3, 5, 7)
    np.testing.assert_array_equal(got, a)


def test_parse_idx_rejects_bad_files():
    with pytest.raises(ValueError, match="not an idx file"):
        parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match=r"needs 6 bytes of values, got 5"):
        parse_idx(make_idx(np.zeros((2, 3), np.uint8), 0x08)[:-1])


# -- the loader, without network -----------------------------------------------------------
def fake_fashion_deb(n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    arrays, files = {}, {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y.astype(np.int64)
        member = "./usr/share/datasets/fashion-mnist/{}-{}-ubyte.gz"
        files[member.format(prefix, "images-idx3")] = gzip.compress(make_idx(x, 0x08))
        files[member.format(prefix, "labels-idx1")] = gzip.compress(make_idx(y, 0x08))
    return make_deb(files), arrays


def fake_apt(calls, payload):
    def run(cmd, cwd=None, **kw):
        calls.append(cmd)
        (Path(cwd) / images.FASHION_MNIST_FILE).write_bytes(payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_loader_extracts_checks_and_caches_a_hand_built_deb(tmp_path, monkeypatch):
    deb, arrays = fake_fashion_deb()
    monkeypatch.setattr(images, "_SPLITS", {"train": ("train", 6), "test": ("t10k", 4)})
    monkeypatch.setattr(images, "FASHION_MNIST_SHA256", hashlib.sha256(deb).hexdigest())
    calls = []
    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_apt(calls, deb))
    data = load_fashion_mnist(tmp_path, verbose=False)
    assert calls[0][:3] == ["apt-get", "download", "dataset-fashion-mnist"]
    for name in images.FashionMNIST._fields:
        got = getattr(data, name)
        assert got.dtype == (np.uint8 if name.endswith("images") else np.int64)
        np.testing.assert_array_equal(got, arrays[name])
    # Cached arrays are used without the .deb; no temporary folders are left behind.
    (tmp_path / images.FASHION_MNIST_FILE).unlink()
    again = load_fashion_mnist(tmp_path, verbose=False)
    np.testing.assert_array_equal(again.test_images, arrays["test_images"])
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fashion-mnist"]


def test_loader_refuses_a_wrong_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_apt([], b"not the package"))
    with pytest.raises(RuntimeError, match="sha256"):
        load_fashion_mnist(tmp_path, verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_loader_refuses_wrong_shapes(tmp_path, monkeypatch):
    deb, _ = fake_fashion_deb()
    monkeypatch.setattr(images, "FASHION_MNIST_SHA256", hashlib.sha256(deb).hexdigest())
    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_apt([], deb))
    with pytest.raises(ValueError, match=r"expected uint8 \(60000, 28, 28\), got uint8 \(6, 28, 28\)"):
        load_fashion_mnist(tmp_path, verbose=False)
    assert not (tmp_path / "fashion-mnist").exists()


# -- the model --------------------------------------------------------------------------------
def small(**kw):
    moe_keys = {f.name for f in dataclasses.fields(MoEConfig)}
    moe = dict(VMOE_DEFAULTS.to_dict(), num_experts=4, top_k=2)
    moe.update({k: kw.pop(k) for k in list(kw) if k in moe_keys})
    base = dict(image_size=8, patch_size=2, d_model=16, n_layers=2, n_heads=2, mlp_hidden=24, num_classes=5)
    base.update(kw)
    return ViTConfig(**base, moe=MoEConfig.from_dict(moe))


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_shapes_dtypes_and_initial_loss(pool, dtype):
    m = ViTMoE(small(pool=pool)).to(dtype)
    x, y = torch.randn(3, 1, 8, 8, dtype=dtype), torch.randint(0, 5, (3,))
    logits, loss = m(x, y)
    assert logits.shape == (3, 5) and logits.dtype == dtype
    # The head starts at zero: every class has probability 1/L, the loss is log L.
    assert loss.ndim == 0 and math.isclose(loss.item(), math.log(5), rel_tol=1e-6)
    assert m(x)[1] is None
    n_tokens = 16 + (pool == "cls")
    assert m.blocks[1].mlp.last_stats.num_tokens == 3 * n_tokens       # the MoE routes every token of the batch


@pytest.mark.parametrize("n_layers,every,expected", [(2, 2, [1]), (4, 2, [1, 3]), (3, 1, [0, 1, 2]), (4, 0, []),
                                                     (4, 3, [2])])
def test_moe_placement(n_layers, every, expected):
    m = ViTMoE(small(n_layers=n_layers, moe_every=every))
    assert [i for i, b in enumerate(m.blocks) if isinstance(b.mlp, moekit.MoE)] == expected
    assert m.config.moe_layer_ids == expected


def test_bad_inputs_and_configs_raise_value_errors_naming_values():
    m = ViTMoE(small())
    with pytest.raises(ValueError, match=r"floating \(B, 1, 8, 8\).*\(2, 8, 8\)"):
        m(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match=r"floating .*torch.uint8"):
        m(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), got \(2, 1\)"):
        m(torch.randn(2, 1, 8, 8), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="image_size=8 must be a multiple of patch_size=3"):
        small(patch_size=3)
    with pytest.raises(ValueError, match="pool must be one of"):
        small(pool="max")
    with pytest.raises(ValueError, match="top_k must be <= num_experts=4, got top_k=5"):
        small(top_k=5)
    with pytest.raises(ValueError, match="moe_every must be an int >= 0"):
        small(moe_every=-1)
    with pytest.raises(TypeError, match="ViTConfig"):
        ViTMoE({"d_model": 16})


def test_defaults_are_v_moe():
    c = ViTConfig()
    m = ViTMoE(c)
    moe = m.blocks[1].mlp
    assert c.moe_layer_ids == [1, 3] and moe.top_k == 2 and moe.num_experts == 8
    assert moe.router.norm == "raw" and moe.router.drop_policy == "probability"
    assert moe.router.capacity_factor == 1.05 and moe.d_hidden == 4 * c.d_model


def test_aux_loss_is_the_sum_over_moe_layers_with_grad():
    m = ViTMoE(small(n_layers=4))
    m(torch.randn(4, 1, 8, 8))
    total = moekit.aux_loss(m)
    assert total.requires_grad and total.item() > 0
    torch.testing.assert_close(total, sum(b.mlp.aux_loss for b in m.moe_blocks))
    twin = ViTMoE(vit_dense_twin(m.config))
    twin(torch.randn(4, 1, 8, 8))
    assert moekit.aux_loss(twin).item() == 0


@pytest.mark.parametrize("expert_hidden,top_k", [(None, 2), (12, 1), (10, 3)])
def test_dense_twin_has_the_active_parameters_minus_the_routers(expert_hidden, top_k):
    cfg = small(n_layers=4, d_hidden=expert_hidden, top_k=top_k)
    moe, twin = ViTMoE(cfg), ViTMoE(vit_dense_twin(cfg))
    c_moe, c_twin = active_param_counts(moe), active_param_counts(twin)
    routers = sum(p.numel() for b in moe.moe_blocks for p in b.mlp.router.parameters())
    assert routers == 2 * cfg.moe.num_experts * cfg.d_model
    assert c_moe["active"] - c_twin["active"] == routers
    assert c_twin["total"] == c_twin["active"] and not twin.moe_blocks
    # Independently: each MoE layer keeps K of its E experts, the twin's MLP is K experts wide.
    bank = sum(p.numel() for p in moe.blocks[1].mlp.experts.parameters())
    assert c_moe["total"] - c_moe["active"] == 2 * bank * (cfg.moe.num_experts - top_k) // cfg.moe.num_experts
    assert twin.blocks[1].mlp.down_proj.in_features == top_k * (expert_hidden or 24)
    assert twin.blocks[0].mlp.down_proj.in_features == 24 == cfg.mlp_width(0)
    assert moe.blocks[1].mlp.d_hidden == (expert_hidden or 24) == cfg.mlp_width(1)


def test_defining_identity_and_bpr_inside_the_model_in_eval_mode():
    """For a block's MoE in eval mode: ``y[t] = Σ_{kept (t, e, w)} w · experts[e](x[t])``, with
    capacity short enough to drop pairs; and BPR keeps, per expert and choice slot, the pairs of
    largest weight: no kept pair weighs less than a dropped one competing for the same expert."""
    m = ViTMoE(small(n_layers=2, capacity_factor=0.5)).eval()
    moe = m.blocks[1].mlp
    seen = {}
    moe.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    m(torch.randn(6, 1, 8, 8))
    x_TD, y_TD = seen["x"].reshape(-1, 16), seen["y"].reshape(-1, 16)
    r = moe.last_routing
    assert moe.last_stats.dropped.item() > 0
    ref = torch.zeros_like(x_TD)
    for t, e, w in zip(r.token_ids.tolist(), r.expert_ids.tolist(), r.weights.tolist()):
        ref[t] += w * moe.experts[e](x_TD[t:t + 1])[0]
    torch.testing.assert_close(y_TD, ref, rtol=1e-5, atol=1e-6)

    kept = set(zip(r.token_ids.tolist(), r.expert_ids.tolist()))
    for k in range(moe.top_k):
        for e in range(moe.num_experts):
            ts = (r.topk_ids[:, k] == e).nonzero().flatten().tolist()
            w_kept = [r.probs[t, e].item() for t in ts if (t, e) in kept]
            w_drop = [r.probs[t, e].item() for t in ts if (t, e) not in kept]
            if w_kept and w_drop:
                assert min(w_kept) >= max(w_drop)


def synthetic_images(n, generator):
    """4 classes of 8×8 images: a bright horizontal bar at the top or bottom, or a vertical bar
    at the left or right, at a random offset, in Gaussian noise."""
    y = torch.randint(0, 4, (n,), generator=generator)
    x = 0.5 * torch.randn(n, 1, 8, 8, generator=generator)
    off = torch.randint(0, 3, (n,), generator=generator)
    for i in range(n):
        c, o = y[i].item(), off[i].item()
        if c == 0:
            x[i, 0, o, :] += 2.0
        elif c == 1:
            x[i, 0, 7 - o, :] += 2.0
        elif c == 2:
            x[i, 0, :, o] += 2.0
        else:
            x[i, 0, :, 7 - o] += 2.0
    return x, y


def test_short_training_run_beats_chance():
    g = torch.Generator().manual_seed(0)
    x, y = synthetic_images(512, g)
    x_test, y_test = synthetic_images(256, g)
    m = ViTMoE(small(num_classes=4))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for step in range(100):
        idx = torch.randint(0, 512, (64,), generator=g)
        _, loss = m(x[idx], y[idx])
        (loss + moekit.aux_loss(m)).backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    with torch.no_grad():
        acc = (m(x_test)[0].argmax(-1) == y_test).float().mean().item()
    assert acc > 0.7, acc                                 # chance is 0.25 (seed 0 reaches 0.95)
