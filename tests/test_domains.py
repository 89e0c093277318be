"""The multi-domain main job: domains split by document, a cached BPE, balanced batches,
per-domain validation loss (checked against a plain per-domain loop) and routing by domain."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moekit.train import BatchSampler, Trainer, build_corpus, config_from_dict, eval_batches
from moekit.train import tokenizer as tok_mod
from moekit.train.compare import comparison_rows, comparison_table
from moekit.train.config import get_preset
from moekit.train.data import cap_documents, load_domain
from moekit.train.tokenizer import BPETokenizer, tokenizer_from_dict

pytest.importorskip("tokenizers")

DATA = Path(__file__).parent / "data"
DOMAINS = [str(DATA / "shakespeare"), str(DATA / "sotu"), str(DATA / "python" / "*.py")]


def tiny_domains(tmp_cache, **over):
    d = {"name": "td",
         "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "top_k": 2, "router": "topk"},
         "data": {"source": "domains", "domains": DOMAINS, "tokenizer": "bpe", "vocab_size": 320,
                  "seq_len": 16, "batch_size": 6, "val_fraction": 0.25, "cache_dir": str(tmp_cache)},
         "optim": {"warmup_steps": 2},
         "train": {"steps": 6, "eval_every": 3, "eval_batches": 2, "log_every": 3, "ckpt_every": 6},
         "variants": {"moe": {}, "dense": {"twin": "dense"}}}
    for k, v in over.items():
        d[k] = {**d[k], **v}
    return config_from_dict(d)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def corpus(cache):
    return build_corpus(tiny_domains(cache).data)


def test_default_preset_is_the_multi_domain_bpe_run():
    run = get_preset("default")
    assert run.data.source == "domains" and run.data.tokenizer == "bpe"
    assert list(run.data.domains) == ["shakespeare", "sotu", "python"]
    assert 4096 <= run.data.vocab_size <= 8192 and run.data.batch_size % 3 == 0
    assert get_preset("shakespeare-char").data.tokenizer == "char"


def test_domain_specs_name_their_domains():
    name, docs = load_domain(DOMAINS[2])
    assert name == "python" and len(docs) == 4
    assert load_domain(str(DATA / "sotu"))[0] == "sotu"


def test_cap_takes_whole_documents_in_a_seeded_order():
    docs = {f"d{i}": "x" * 100 for i in range(10)}
    a = cap_documents(docs, 250, seed=0)
    assert len(a) == 3 and all(docs[n] == a[n] for n in a)
    assert cap_documents(docs, 250, seed=0) == a
    assert len(cap_documents(docs, 1, seed=0)) == 2             # at least two, so the domain can be split


def test_domains_are_split_by_document_each_on_its_own(corpus):
    tok, train, val = corpus
    assert train.domain_names == val.domain_names == ["shakespeare", "sotu", "python"]
    assert not set(train.doc_names) & set(val.doc_names)
    for c in (train, val):
        # each domain has documents on both sides, and a document's domain is its prefix
        for g, name in enumerate(c.domain_names):
            assert [n for n, d in zip(c.doc_names, c.doc_domains.tolist()) if d == g]
        assert all(n.split("/")[0] == c.domain_names[d] for n, d in zip(c.doc_names, c.doc_domains.tolist()))
        bounds = c.domain_bounds()
        assert bounds[0][0] == 0 and bounds[-1][1] == len(c)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_bpe_is_trained_once_and_cached(cache, corpus, monkeypatch):
    tok = corpus[0]
    assert isinstance(tok, BPETokenizer) and 256 < tok.vocab_size <= 320
    files = list((cache / "tokenizers").glob("bpe-*.json"))
    assert len(files) == 1
    monkeypatch.setattr(tok_mod.BPETokenizer, "train", classmethod(lambda *a, **k: pytest.fail("retrained")))
    tok2, train2, _ = build_corpus(tiny_domains(cache).data)
    assert torch.equal(train2.tokens, corpus[1].tokens)
    # another vocabulary is another tokenizer (the settings are part of the key)
    monkeypatch.undo()
    build_corpus(tiny_domains(cache, data={"vocab_size": 300}).data)
    assert len(list((cache / "tokenizers").glob("bpe-*.json"))) == 2


def test_bpe_roundtrips_any_text_and_serialises_as_json(corpus):
    tok = corpus[0]
    text = "def f(x):\n    return x  # naïve — “quotes” ✓ \t\x00 end"
    ids = tok.encode(text)
    assert tok.decode(ids.tolist()) == text
    d = json.loads(json.dumps(tok.to_dict()))
    again = tokenizer_from_dict(d)
    assert again.vocab_size == tok.vocab_size and torch.equal(again.encode(text), ids)
    # our decoder equals the package's on every token of the vocabulary and on valid text
    assert all(tok.decode([i]) == tok.tokenizer.decode([i]) for i in range(tok.vocab_size)
               if "\ufffd" not in tok.tokenizer.decode([i]))
    assert tok.decode(ids.tolist()) == tok.tokenizer.decode(ids.tolist())
    # a lone continuation byte (a sample can hold one) is escaped, never U+FFFD
    import tokenizers
    assert set(BPETokenizer._BYTES) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    c80 = next(c for c, b in BPETokenizer._BYTES.items() if b == 0x80)
    assert c80 == "\u0122"                         # GPT-2's alphabet: the 35th non-printable byte
    lone = [i for i in range(tok.vocab_size) if tok.tokenizer.id_to_token(i) == c80]
    assert lone and tok.decode(lone) == "\\x80"
    # the batch path equals one text at a time
    texts = ["To be, or not to be", "import os\n", ""]
    assert all(np.array_equal(a, tok.encode(t).numpy()) for a, t in zip(tok.encode_many(texts), texts))


def test_batches_hold_the_domains_in_equal_shares(corpus):
    _, train, _ = corpus
    s = BatchSampler(train, seq_len=16, batch_size=6, seed=0)
    for _ in range(5):
        x, y, doc = s.next_batch()
        dom = train.domain_of_tokens(doc)
        assert (dom == (torch.arange(6) % 3)[:, None]).all()           # window i from domain i mod 3
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_eval_batches_give_each_domain_an_equal_share(corpus):
    _, _, val = corpus
    batches = eval_batches(val, seq_len=16, batch_size=6, max_batches=2)
    dom = torch.cat([val.domain_of_tokens(d)[:, 0] for _, _, d in batches])
    assert torch.bincount(dom, minlength=3).tolist() == [4, 4, 4]
    for _, _, d in batches:                                      # no window crosses into another domain
        dd = val.domain_of_tokens(d)
        assert (dd == dd[:, :1]).all()


def test_per_domain_validation_loss_matches_a_plain_loop(corpus, tmp_path, cache):
    run = tiny_domains(cache)
    t = Trainer(run, "moe", tmp_path / "moe", data=corpus, progress=False)
    mean, by_domain = t.evaluate_domains()
    # reference: each domain's windows alone, one loss per token, averaged
    t.model.eval()
    ref = {g: [] for g in range(3)}
    with torch.no_grad():
        for x, y, doc in t.val_batches:
            logits, _ = t.model(x, y)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            dom = t.val_corpus.domain_of_tokens(doc).reshape(-1)
            for g in range(3):
                ref[g].append(ce[dom == g])
    names = t.val_corpus.domain_names
    for g in range(3):
        assert by_domain[names[g]] == pytest.approx(float(torch.cat(ref[g]).double().mean()), rel=1e-5)
    assert mean == pytest.approx(float(torch.cat([torch.cat(v) for v in ref.values()]).double().mean()), rel=1e-5)
    assert t.evaluate() == mean


def test_run_reports_per_domain_losses(corpus, tmp_path, cache):
    from moekit.train import run_experiment

    out = run_experiment(tiny_domains(cache), tmp_path / "r", progress=False, stream=open("/dev/null", "w"))
    res = {r["variant"]: r for r in out["results"]}
    for r in res.values():
        assert set(r["val_loss_by_domain"]) == {"shakespeare", "sotu", "python"}
        assert r["val_loss"] == pytest.approx(np.mean(list(r["val_loss_by_domain"].values())), rel=1e-6)
    c = comparison_rows(out["results"])
    assert c["domains"]["names"] == ["shakespeare", "sotu", "python"]
    row = {r["variant"]: r for r in c["domains"]["equal_steps"]}
    assert row["moe"]["val_loss"] == res["moe"]["val_loss_by_domain"]
    assert "Validation loss per domain, equal steps (step 6)" in out["table"]
    assert "Validation loss per domain, equal wall time" in comparison_table(out["results"])
    # the checkpoint carries the tokenizer as JSON: sampling needs no corpus
    from moekit.train import generate_text

    text = generate_text(tmp_path / "r" / "moe", "def ", max_new_tokens=5)
    assert text.startswith("def ")


@pytest.mark.parametrize("bad, match", [
    ({"domains": []}, "needs data.domains"),
    ({"vocab_size": 100}, "data.vocab_size"),
    ({"domain_chars": 0}, "data.domain_chars"),
])
def test_domain_config_errors(cache, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_domains(cache, data=bad)


def test_a_domain_named_twice_is_refused(cache):
    with pytest.raises(ValueError, match="twice"):
        build_corpus(tiny_domains(cache, data={"domains": [DOMAINS[0], DOMAINS[0]]}).data)


def test_a_checkpoint_written_before_the_domain_settings_resumes_without_a_change():
    # Checkpoints written before data.domains / domain_chars / vocab_size existed lack those keys:
    # they compare as their defaults, so resuming such a run reports no config change.
    from test_train import tiny

    from moekit.train.trainer import _sections, config_changes

    now = tiny().to_dict()                     # a character-level run on files: the new keys at defaults
    old = json.loads(json.dumps(now))
    for key in ("domains", "domain_chars", "vocab_size"):
        del old["data"][key]
    assert config_changes(_sections(old), _sections(now)) == []
    old["data"]["seq_len"] = 99
    assert config_changes(_sections(old), _sections(now)) == ["data.seq_len: 99 -> 32"]
