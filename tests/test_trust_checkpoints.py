"""Trust in what a run leaves on disk: no loader runs code from a file, a resume never silently
restarts or deletes history, checksums catch broken files, a full disk names the path, and the
report's details (integer expert ticks, no overlapping labels, no U+FFFD, equal-time notes)."""
import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from moekit import cli
from moekit.layers import MoEConfig
from moekit.models import TransformerConfig, TransformerLM
from moekit.train import Trainer, read_metrics
from moekit.train import checkpoint as ck
from moekit.train.sample import load_model

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny  # noqa: E402


# -- a pickle that would leave a marker file if anything unpickled it -------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _evil_files(marker):
    """The two forms a planted pickle takes: a raw pickle and a torch archive holding one."""
    raw = pickle.dumps(_Evil(marker))
    import io
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    return {"raw": raw, "torch": buf.getvalue()}


def test_the_planted_pickle_does_run_when_unpickled(tmp_path):
    # The test's own premise: the payload creates the marker when unpickled.
    marker = tmp_path / "ran"
    pickle.loads(_evil_files(marker)["raw"])
    assert marker.exists()


def _rewrite_checksums(step_dir: Path):
    """What an attacker who can plant a file can also do: make the checksums match it."""
    p = step_dir / "checksums.json"
    sums = json.loads(p.read_text())
    for name in sums["files"]:
        data = (step_dir / name).read_bytes()
        sums["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    p.write_text(json.dumps(sums))


@pytest.fixture(scope="module")
def data():
    from moekit.train import build_corpus
    return build_corpus(tiny().data)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data):
    """A one-variant run trained to step 10 with checkpoints at 5 and 10 (kept: 3)."""
    root = tmp_path_factory.mktemp("run")
    run = tiny(train={"steps": 20, "ckpt_every": 5, "eval_every": 5, "keep_checkpoints": 3},
               variants={"moe": {}})
    (root / "config.json").write_text(run.to_json())
    res = Trainer(run, "moe", root / "moe", data=data, progress=False).fit(stop_at_step=10)
    assert res["steps"] == 10
    (root / "moe" / "result.json").write_text(json.dumps(res))
    return root, run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    root, run = trained_run
    dst = tmp_path / "run"
    shutil.copytree(root, dst)
    return dst, run


def _tree_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. no code runs from a file we read -------------------------------------------------------
CKPT_FILES = ["model.safetensors", "config.json", "trainer_state.json", "trainer_state.safetensors",
              "checksums.json", "trainer_state.pt"]


@pytest.mark.parametrize("form", ["raw", "torch"])
@pytest.mark.parametrize("forge_checksums", [False, True])
@pytest.mark.parametrize("name", CKPT_FILES)
def test_a_planted_pickle_in_any_checkpoint_file_never_runs(run_copy, tmp_path, data, name, form,
                                                            forge_checksums, capsys):
    root, run = run_copy
    marker = tmp_path / "ran"
    step = root / "moe" / "checkpoints" / "step_000010"
    (step / name).write_bytes(_evil_files(marker)[form])
    if forge_checksums and name != "checksums.json":
        _rewrite_checksums(step)
    # Every loader: the library's, and each CLI entry that reads a checkpoint. A stray
    # trainer_state.pt beside a complete checkpoint is simply never read.
    stray = name == "trainer_state.pt"
    model, _, _ = load_model(root / "moe")                  # falls back to step 5 (or refuses step 10)
    if stray:
        load_model(step)
    else:
        with pytest.raises(ValueError):
            load_model(step)
    t = Trainer(run, "moe", root / "moe", data=data, progress=False)
    assert t.resume() and t.step == (10 if stray else 5)     # else the older good checkpoint
    assert stray or "skipped step_000010" in capsys.readouterr().err
    assert cli.main(["generate", str(root / "moe"), "--max-new-tokens", "5"]) == 0
    assert cli.main(["generate", str(step), "--max-new-tokens", "5"]) == (0 if stray else 2)
    assert stray or "step_000010" in capsys.readouterr().err
    if form == "torch" and forge_checksums:                 # the slow entries, once per file
        assert cli.main(["report", str(root)]) == 0
        assert cli.main(["train", "--resume", str(root), "--quiet", "--no-report"]) == 0
    assert not marker.exists()


def test_legacy_pickled_trainer_state_is_refused_with_a_reason(run_copy, tmp_path):
    root, _ = run_copy
    marker = tmp_path / "ran"
    for step in (root / "moe" / "checkpoints").glob("step_*"):
        for f in step.iterdir():
            f.unlink()
        (step / "trainer_state.pt").write_bytes(_evil_files(marker)["torch"])
    with pytest.raises(ck.CheckpointError, match="older moekit.*pickle"):
        ck.load_checkpoint(root / "moe" / "checkpoints" / "step_000005", model=torch.nn.Linear(1, 1))
    assert cli.main(["train", "--resume", str(root), "--quiet", "--no-report"]) == 2
    assert not marker.exists()


@pytest.mark.parametrize("name", ["config.json", "moe/result.json", "moe/metrics.jsonl"])
def test_a_planted_pickle_in_run_files_never_runs(run_copy, tmp_path, name, capsys):
    root, _ = run_copy
    marker = tmp_path / "ran"
    (root / name).write_bytes(_evil_files(marker)["raw"])
    for argv in (["report", str(root)], ["compare", str(root)], ["train", "--resume", str(root), "--quiet"]):
        rc = cli.main(argv)
        assert rc in (0, 2)
        if rc == 2:
            assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()


def _dcp_run(tmp_path, run, data):
    """A variant folder holding a distributed-format checkpoint (what a torchrun job writes)."""
    from moekit import parallel

    t = Trainer(run, "moe", tmp_path / "moe", data=data, progress=False)
    t.fit(stop_at_step=3)
    state = t.trainer_state()
    state.pop("optimizer")
    path = tmp_path / "moe" / "dcp"
    parallel.save_checkpoint({"model": t.model, "optimizer": t.optimizer, "trainer_state": state,
                              "config": t.checkpoint_config()}, str(path / "step_000003"))
    return path


@pytest.mark.parametrize("forge_checksums", [False, True])
@pytest.mark.parametrize("target", [".metadata", "__0_0.distcp", "blob"])
def test_a_planted_pickle_in_a_distributed_checkpoint_never_runs(tmp_path, data, target, forge_checksums):
    from moekit import parallel
    from moekit.parallel import checkpoint as pck

    run = tiny(variants={"moe": {}})
    path = _dcp_run(tmp_path, run, data)
    step = path / "step_000003"
    model, _, cfg = load_model(path)                              # the untouched checkpoint loads
    assert cfg["variant"] == "moe"
    marker = tmp_path / "ran"
    if target == "blob":
        # A checkpoint whose plain value is a pickle of a code-running object: forged by skipping
        # the save-side check, as an attacker writing their own file would.
        orig = pck._check_plain
        pck._check_plain = lambda v, where: None
        try:
            parallel.save_checkpoint({"model": model, "trainer_state": _Evil(marker), "config": _Evil(marker)},
                                     str(step))
        finally:
            pck._check_plain = orig
        assert not marker.exists()
    else:
        (step / target).write_bytes(_evil_files(marker)["raw" if target == ".metadata" else "torch"])
    if forge_checksums or target == "blob":
        _rewrite_checksums(step)
    with pytest.raises(ValueError):
        parallel.load_checkpoint({"trainer_state": {}, "config": {}}, str(step))
    with pytest.raises(ValueError):
        load_model(path)
    assert not marker.exists()


def test_distributed_plain_values_must_be_plain(tmp_path):
    from moekit import parallel

    with pytest.raises(TypeError, match="'x'.*numpy.ndarray"):
        parallel.save_checkpoint({"x": {"a": np.zeros(3)}}, str(tmp_path / "c"))
    parallel.save_checkpoint({"x": {"a": [1, 2.5, None, "s", (torch.arange(3), True)]}}, str(tmp_path / "c"))
    out = parallel.load_checkpoint({"x": None}, str(tmp_path / "c"))["x"]
    assert out["a"][:4] == [1, 2.5, None, "s"] and torch.equal(out["a"][4][0], torch.arange(3))


# -- 2. a resume never silently restarts ----------------------------------------------------
def _break(step: Path, how: str, name: str):
    f = step / name
    b = bytearray(f.read_bytes())
    if how == "flip":
        b[len(b) // 2] ^= 0x01
        f.write_bytes(bytes(b))
    elif how == "truncate":
        f.write_bytes(bytes(b[: len(b) // 2]))
    elif how == "delete":
        f.unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "trainer_state.json",
                                  "trainer_state.safetensors", "checksums.json"])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(run_copy, data, how, name, capsys):
    root, run = run_copy
    ckdir = root / "moe" / "checkpoints"
    _break(ckdir / "step_000010", how, name)
    before = (root / "moe" / "metrics.jsonl").read_text()
    t = Trainer(run, "moe", root / "moe", data=data, progress=False)
    assert t.resume() and t.step == 5 and t.last_good == ckdir / "step_000005"
    err = capsys.readouterr().err
    assert "skipped step_000010" in err and "resuming from" in err and "step_000005" in err
    assert (ckdir / "step_000010").exists()                       # history kept
    assert (root / "moe" / "metrics.jsonl").read_text() == before   # nothing rewritten by resume itself


@pytest.mark.parametrize("pointer,why", [
    (None, "no 'latest' pointer"), ("step_000099", "does not exist"), ("../../elsewhere", "points outside"),
    ("/etc", "points outside"), ("step_000005/../../x", "points outside"), ("", "points outside"),
    ("step_000005", "step_000010 is newer"),
])
def test_a_bad_latest_pointer_resumes_from_the_newest_complete_checkpoint(run_copy, data, pointer, why, capsys):
    root, run = run_copy
    ptr = root / "moe" / "checkpoints" / "latest"
    if pointer is None:
        ptr.unlink()
    else:
        ptr.write_text(pointer)
    t = Trainer(run, "moe", root / "moe", data=data, progress=False)
    assert t.resume() and t.step == 10
    assert why in capsys.readouterr().err


def test_resume_past_a_broken_checkpoint_is_bit_exact(run_copy, data, tmp_path):
    root, run = run_copy
    _break(root / "moe" / "checkpoints" / "step_000010", "flip", "trainer_state.safetensors")
    t = Trainer(run, "moe", root / "moe", data=data, progress=False)
    assert t.resume() and t.step == 5
    resumed = t.fit()
    straight = Trainer(run, "moe", tmp_path / "straight", data=data, progress=False).fit()
    assert resumed["val_loss"] == straight["val_loss"] and resumed["steps"] == 20
    ma = [r["loss"] for r in read_metrics(root / "moe" / "metrics.jsonl", kind="train")]
    mb = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl", kind="train")]
    assert ma == mb


@pytest.mark.parametrize("damage", ["all_broken", "no_checkpoints", "only_pointer"])
def test_no_usable_checkpoint_stops_with_a_clear_error_and_keeps_everything(run_copy, damage, capsys):
    root, _ = run_copy
    ckdir = root / "moe" / "checkpoints"
    if damage == "all_broken":
        for s in ckdir.glob("step_*"):
            _break(s, "truncate", "model.safetensors")
    else:
        for s in ckdir.glob("step_*"):
            shutil.rmtree(s)
        if damage == "no_checkpoints":
            (ckdir / "latest").unlink()
    before = _tree_bytes(root)
    assert cli.main(["train", "--resume", str(root), "--quiet", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "moekit train: error:" in err and ("no complete checkpoint" in err or "holds no checkpoint" in err)
    after = _tree_bytes(root)
    assert {k: v for k, v in after.items() if not k.startswith("comparison")} == before


def test_stale_temporaries_are_cleaned(run_copy, data):
    root, run = run_copy
    ckdir = root / "moe" / "checkpoints"
    (ckdir / ".tmp-step_000015-4242").mkdir()
    (ckdir / ".tmp-step_000015-4242" / "model.safetensors").write_bytes(b"half")
    (ckdir / ".latest.tmp-4242").write_text("step_000015")
    t = Trainer(run, "moe", root / "moe", data=data, progress=False)
    assert t.resume() and t.step == 10
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("key,value", [("optim.lr", 0.5), ("data.seq_len", 16), ("train.steps", 30),
                                       ("model.d_model", 48), ("optim.warmup_steps", 1), ("train.seed", 3)])
def test_a_changed_config_is_refused_unless_allowed(run_copy, data, key, value):
    from moekit.train import apply_overrides

    root, run = run_copy
    changed = apply_overrides(run, [f"{key}={value}"])
    t = Trainer(changed, "moe", root / "moe", data=data, progress=False)
    with pytest.raises(ck.CheckpointError, match=key.replace(".", r"\.") + ".*allow-config-change"):
        t.resume()
    assert t.step == 0
    t = Trainer(changed, "moe", root / "moe", data=data, progress=False)
    if key == "model.d_model":                                   # other shapes: the weights cannot load
        with pytest.raises(ck.CheckpointError, match="cannot load"):
            t.resume(allow_config_change=True)
    else:
        assert t.resume(allow_config_change=True) and t.step == 10


def test_cli_resume_with_changed_settings_needs_the_flag(run_copy, capsys):
    root, _ = run_copy
    assert cli.main(["train", "--resume", str(root), "--set", "train.steps=12", "--quiet", "--no-report"]) == 2
    assert "--allow-config-change" in capsys.readouterr().err
    cfg = json.loads((root / "config.json").read_text())
    cfg["optim"]["lr"] = 0.123
    (root / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["train", "--resume", str(root), "--quiet", "--no-report"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(root), "--set", "train.steps=12", "--allow-config-change",
                     "--quiet", "--no-report"]) == 0
    assert json.loads((root / "moe" / "result.json").read_text())["steps"] == 12


@pytest.mark.parametrize("fail_at", range(6))
def test_disk_full_names_the_path_and_keeps_the_previous_checkpoint(run_copy, data, monkeypatch, fail_at):
    root, run = run_copy
    ckdir = root / "moe" / "checkpoints"
    t = Trainer(run, "moe", root / "moe", data=data, progress=False)
    assert t.resume()
    calls = {"n": 0}
    real = ck._write_file

    def full(path, data_):
        calls["n"] += 1
        if calls["n"] > fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data_)

    monkeypatch.setattr(ck, "_write_file", full)
    t.step = 11
    with pytest.raises(OSError, match="no space left") as info:
        t.save()
    assert info.value.errno == errno.ENOSPC and str(ckdir) in str(info.value)
    assert "step_000010" in str(info.value)                       # says which checkpoint is intact
    monkeypatch.undo()
    if fail_at < 5:                                              # failed before the rename: nothing new
        assert not (ckdir / "step_000011").exists()
    assert ck.verify_checkpoint(ckdir / "step_000010")
    model = TransformerLM(t.model_config)
    assert ck.load_checkpoint(ckdir / "step_000010", model=model)["step"] == 10
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".")]


def test_disk_full_from_the_cli_is_one_line(run_copy, monkeypatch, capsys):
    root, _ = run_copy

    def full(path, data_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_write_file", full)
    assert cli.main(["train", "--resume", str(root), "--quiet", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "no space left on device writing" in err and "Traceback" not in err


def test_file_permissions_are_uniform(run_copy, data):
    root, run = run_copy
    ckdir = root / "moe" / "checkpoints"
    t = Trainer(run, "moe", root / "moe", data=data, progress=False)
    t.resume()
    t.step = 11
    t.save()
    mask = os.umask(0)
    os.umask(mask)
    for p in ckdir.rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode & 0o777))


# -- state stored without pickle round-trips exactly ------------------------------------------
_leaf = hs.one_of(hs.none(), hs.booleans(), hs.integers(-2**70, 2**70), hs.floats(allow_nan=True),
                  hs.text(max_size=8), hs.builds(lambda n, d: torch.arange(n, dtype=d) * 3 - 1,
                                                 hs.integers(0, 5), hs.sampled_from([torch.float32, torch.int64,
                                                                                     torch.bfloat16, torch.uint8])))
_key = hs.one_of(hs.text(max_size=6), hs.integers(-5, 5))
_tree = hs.recursive(_leaf, lambda c: hs.one_of(hs.lists(c, max_size=4), hs.tuples(c, c),
                                                 hs.dictionaries(_key, c, max_size=4)), max_leaves=20)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=150, deadline=None)
@given(_tree)
def test_tree_codec_round_trips_through_json_and_safetensors(value):
    from safetensors.torch import load, save

    tensors = {}
    text = json.dumps(ck.encode_tree(value, tensors))
    back = ck.decode_tree(json.loads(text), load(save(tensors)) if tensors else {})
    assert _same(value, back)


def test_tree_codec_refuses_objects():
    with pytest.raises(TypeError, match=r"state\['a'\]\[1\].*numpy.ndarray"):
        ck.encode_tree({"a": [1, np.zeros(2)]}, {})


@pytest.mark.parametrize("seed", range(5))
def test_rng_state_round_trips_bit_exactly(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    np.random.standard_normal()          # leaves a cached gaussian in numpy's state
    tensors = {}
    enc = json.loads(json.dumps(ck.encode_tree(ck.rng_state(), tensors)))
    a = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    ck.set_rng_state(ck.decode_tree(enc, tensors))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == a


# -- 8. report details ---------------------------------------------------------------------
def _texts(fig):
    """Every label the figure shows: titles, axis labels and the tick labels within view."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for loc, tick in zip(axis.get_majorticklocs(), axis.get_major_ticks()):
                if lo - 1e-9 <= loc <= hi + 1e-9:
                    texts += [t for t in (tick.label1, tick.label2) if t.get_visible()]
    return [(t.get_text(), t.get_window_extent(r)) for t in texts if t.get_visible() and t.get_text().strip()]


def _no_overlap(fig):
    texts = _texts(fig)
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            (ta, a), (tb, b) = texts[i], texts[j]
            a, b = a.shrunk(0.9, 0.9), b.shrunk(0.9, 0.9)
            assert not a.overlaps(b), f"labels {ta!r} and {tb!r} overlap"


def _integer_expert_ticks(ax, axis):
    ticks = (ax.get_yticks() if axis == "y" else ax.get_xticks())
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    shown = [v for v in ticks if lo - 1e-9 <= v <= hi + 1e-9]
    assert shown and all(float(v).is_integer() for v in shown), shown


@pytest.mark.parametrize("E", [1, 2, 3, 5, 8, 13, 17, 40, 64])
def test_heatmaps_have_integer_expert_ticks_and_no_overlapping_labels(E):
    plots = pytest.importorskip("moekit.analysis.plots")
    plt = plots._plt()
    if plt is None:
        pytest.skip("matplotlib")
    rng = np.random.default_rng(E)
    L, n = 2, 6
    load = {"steps": list(range(5, 5 * n + 1, 5)), "layers": [1, 3],
            "fraction": rng.dirichlet(np.ones(E), size=(n, L)).tolist()}
    fig = plots._load_heatmap_figure(plt, load, "moe: expert load over training")
    for ax in fig.axes[:L]:
        _integer_expert_ticks(ax, "y")
    _no_overlap(fig)
    plt.close(fig)

    names = [f"play-{i} ({'x' * (i % 7)})" for i in range(9)]
    spec = {"doc_share": rng.random((9, E)).tolist(), "layer": 1, "nmi_doc": 0.25}
    fig = plots._doc_specialisation_figure(plt, spec, names)
    _integer_expert_ticks(fig.axes[0], "x")
    _no_overlap(fig)
    plt.close(fig)

    tokens = ["\n", " ", "e", "\x9f", "\\x9f", "'", "ab", "\ufffd", "\t"] + [chr(65 + i) for i in range(40)]
    fig = plots._token_specialisation_figure(plt, rng.integers(0, 50, (E, len(tokens))), tokens, layer=1)
    _integer_expert_ticks(fig.axes[0], "y")
    _no_overlap(fig)
    plt.close(fig)

    coact = [{"joint": rng.integers(0, 9, (E, E)).tolist(), "from_layer": i, "to_layer": i + 1, "nmi": 0.1}
             for i in range(3)]
    fig = plots._coactivation_figure(plt, coact)
    for ax in fig.axes[:3]:
        _integer_expert_ticks(ax, "x")
        _integer_expert_ticks(ax, "y")
    _no_overlap(fig)
    plt.close(fig)


@pytest.mark.parametrize("seed", range(8))
def test_samples_never_hold_the_unknown_character(seed):
    from moekit.train import CharTokenizer
    from moekit.train.sample import suppressed_ids

    tok = CharTokenizer("abc \n")
    torch.manual_seed(seed)
    model = TransformerLM(TransformerConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                            max_seq_len=32, moe=MoEConfig(num_experts=2, top_k=1))).eval()
    bonus = torch.zeros(tok.vocab_size)
    bonus[tok.unknown_id] = 50.0                                  # the model all but insists on it
    model.lm_head.register_forward_hook(lambda m, i, o: o + bonus)
    with torch.no_grad():
        out = model.generate(tok.encode("ab")[None], 60, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                             suppress_ids=suppressed_ids(tok))
    assert tok.unknown_id not in out[0, 2:].tolist()
    assert "\ufffd" not in tok.decode(out[0].tolist())


@settings(max_examples=200, deadline=None)
@given(hs.lists(hs.integers(0, 255), max_size=40))
def test_byte_samples_decode_without_replacement_characters(ids):
    from moekit.train import ByteTokenizer

    text = ByteTokenizer().decode(ids)
    assert "\ufffd" not in text
    if bytes(ids).decode("utf-8", errors="ignore").encode() == bytes(ids):
        assert text == bytes(ids).decode()                          # valid UTF-8 is unchanged


def _result(name, times, steps=None, status="completed"):
    steps = steps or [10 * (i + 1) for i in range(len(times))]
    return {"variant": name, "status": status, "steps": steps[-1] if steps else 3,
            "evals": [{"step": s, "train_time": t, "val_loss": 3.0 - 0.1 * i, "tokens": 0}
                      for i, (s, t) in enumerate(zip(steps, times))]}


@pytest.mark.parametrize("first_slow", [5.0, 12.0, 40.0, 100.0])
def test_equal_time_rows_say_why_a_model_has_no_point(first_slow):
    from moekit.train.compare import comparison_rows, comparison_table

    fast = _result("dense", [1.0, 2.0, 3.0])
    slow = _result("moe", [first_slow, 2 * first_slow])
    none = _result("late", [], status="interrupted")
    rows = {r["variant"]: r for r in comparison_rows([fast, slow, none])["equal_time"]["rows"]}
    assert rows["dense"]["note"] is None and rows["dense"]["val_loss"] is not None
    assert rows["moe"]["val_loss"] is None and f"first evaluation at {first_slow:.1f} s" in rows["moe"]["note"]
    assert "not evaluated yet" in rows["late"]["note"]
    table = comparison_table([fast, slow, none])
    assert "first evaluation at" in table and "not evaluated yet" in table
