"""Branch-Train-Merge's ensemble (METHODS.md T7): the branches mixed by the domain posterior,
P(D=j | x_<t) ∝ P(D=j) Π_{s<t} p_j(x_s | x_<s), checked against its one-prefix-at-a-time definition."""
import copy

import pytest
import torch
from torch import nn

from moekit.models.transformer import TransformerConfig, TransformerLM
from moekit.recipes import BTMEnsemble, domain_posterior, domain_posterior_reference

V = 13


def tiny_lm(seed):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, moe_layers="none")
    return TransformerLM(cfg).eval()


class Unigram(nn.Module):
    """A 'domain LM' that ignores context: fixed next-token logits."""

    def __init__(self, logits_V):
        super().__init__()
        self.logits_V = nn.Parameter(logits_V)

    def forward(self, idx_BS):
        return self.logits_V.expand(*idx_BS.shape, -1)


@pytest.fixture(scope="module")
def branches():
    return [tiny_lm(s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("context_tokens", [None, 1, 4, 40])
@pytest.mark.parametrize("prior", [None, [0.2, 0.5, 0.3]])
def test_posterior_equals_its_prefix_by_prefix_definition(branches, idx, context_tokens, prior):
    ens = BTMEnsemble(branches, prior=prior, context_tokens=context_tokens)
    with torch.no_grad():
        got = ens.posterior(idx)
    log_prior = None if prior is None else torch.log(torch.tensor(prior))
    ref = domain_posterior_reference(branches, idx, log_prior, context_tokens=context_tokens)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, 17))
    # Position 0 has no evidence: the prior.
    p0 = torch.full((3,), 1 / 3) if prior is None else torch.tensor(prior)
    torch.testing.assert_close(got[:, 0], p0.expand(3, 3))


def test_mixture_is_the_posterior_weighted_sum_of_branch_probabilities(branches, idx):
    ens = BTMEnsemble(branches, context_tokens=5)
    with torch.no_grad():
        lp, loss = ens(idx[:, :-1], idx[:, 1:])
        post = ens.posterior(idx[:, :-1])
        probs = torch.stack([torch.softmax(b(idx[:, :-1])[0], -1) for b in branches])   # (N, B, S, V)
    expect = (post.permute(2, 0, 1)[..., None] * probs).sum(0)
    torch.testing.assert_close(lp.exp(), expect, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 16))
    torch.testing.assert_close(loss, -lp.gather(-1, idx[:, 1:, None]).mean())


def test_one_branch_or_identical_branches_reproduce_the_branch(branches, idx):
    b = branches[0]
    with torch.no_grad():
        want = torch.log_softmax(b(idx)[0], -1)
        for ens in (BTMEnsemble([b]), BTMEnsemble([b, copy.deepcopy(b), copy.deepcopy(b)], prior=[0.1, 0.1, 0.8])):
            torch.testing.assert_close(ens(idx)[0], want, atol=1e-5, rtol=1e-5)


def test_causal_a_later_token_changes_nothing_before_it(branches, idx):
    ens = BTMEnsemble(branches)
    other = idx.clone()
    other[:, 9] = (other[:, 9] + 1) % V
    with torch.no_grad():
        a, b = ens(idx)[0], ens(other)[0]
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_posterior_finds_the_domain_that_generated_the_text():
    g = torch.Generator().manual_seed(1)
    dom = [Unigram(torch.randn(V, generator=g) * 2) for _ in range(3)]
    ens = BTMEnsemble(dom)
    for j, m in enumerate(dom):
        p = torch.softmax(m.logits_V.detach(), -1)
        idx = torch.multinomial(p, 8 * 40, replacement=True, generator=g).view(8, 40)
        with torch.no_grad():
            post = ens.posterior(idx)
        assert float(post[:, -1, j].mean()) > 0.95
        assert float(post[:, -1, j].mean()) > float(post[:, 1, j].mean())       # evidence accumulates
        # ...and the mixture then predicts like the right domain, better than the uniform mixture.
        with torch.no_grad():
            _, loss = ens(idx[:, :-1], idx[:, 1:])
            _, own = BTMEnsemble([m])(idx[:, :-1], idx[:, 1:])
        assert float(loss) < float(own) + 0.1


def test_top_k_keeps_the_k_most_probable_branches(branches, idx):
    ens = BTMEnsemble(branches, top_k=1)
    with torch.no_grad():
        post = ens.posterior(idx)
        full = BTMEnsemble(branches).posterior(idx)
        lp = ens(idx)[0]
    assert bool(((post == 0) | (post == 1)).all())
    assert torch.equal(post[:, 1:].argmax(-1), full[:, 1:].argmax(-1))
    best = full.argmax(-1)                          # (B, S)
    one = torch.stack([torch.log_softmax(b(idx)[0], -1) for b in branches])
    want = one.permute(1, 2, 0, 3).gather(2, best[..., None, None].expand(-1, -1, 1, V))[:, :, 0]
    torch.testing.assert_close(lp[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)


def test_cached_prior_moves_toward_the_held_out_domain():
    g = torch.Generator().manual_seed(2)
    dom = [Unigram(torch.randn(V, generator=g) * 2) for _ in range(2)]
    ens = BTMEnsemble(dom)
    idx = torch.multinomial(torch.softmax(dom[1].logits_V.detach(), -1), 4 * 30, replacement=True,
                            generator=g).view(4, 30)
    p1 = ens.update_prior(idx, momentum=0.5)
    assert 0.5 < float(p1[1]) <= 1.0 and abs(float(p1.sum()) - 1) < 1e-6
    torch.testing.assert_close(ens.log_prior.exp(), p1)
    p2 = ens.update_prior(idx, momentum=0.5)
    assert float(p2[1]) > float(p1[1])


def test_domain_posterior_function_shapes_and_uniform_prior():
    tok = torch.randn(2, 4, 6)
    post = domain_posterior(tok)
    assert post.shape == (4, 6, 2)
    torch.testing.assert_close(post[:, 0], torch.full((4, 2), 0.5))
    torch.testing.assert_close(post[:, 2], torch.softmax(tok[:, :, :2].sum(-1), 0).T)


@pytest.mark.parametrize("kw,arg", [({"context_tokens": 0}, "context_tokens"), ({"top_k": 4}, "top_k"),
                                    ({"top_k": 1.0}, "top_k"), ({"prior": [1, 2]}, "prior"),
                                    ({"prior": [-1, 1, 1]}, "prior"), ({"prior": [float("nan"), 1, 1]}, "prior")])
def test_bad_settings_name_the_argument(branches, kw, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        BTMEnsemble(branches, **kw)


def test_refuses_no_branches_and_non_modules():
    with pytest.raises(ValueError, match="at least one"):
        BTMEnsemble([])
    with pytest.raises(TypeError, match="models\\[0\\]"):
        BTMEnsemble([lambda x: x])


@pytest.mark.parametrize("context_tokens", [None, 3])
@pytest.mark.parametrize("top_k", [None, 2])
def test_posterior_is_a_distribution_even_for_extreme_likelihoods(context_tokens, top_k):
    """METHODS T7: P(D | x_<t) sums to 1 over the branches at every position, stays finite when
    one branch's evidence is thousands of nats below another's, and gives the better branch ~1."""
    g = torch.Generator().manual_seed(3)
    N, B, S = 4, 2, 50
    tok = -1 - torch.rand(N, B, S, generator=g) * 5      # ≥ 1 nat per token worse than branch 2
    tok[1] -= 200.0                                       # branch 1 is hopeless: ~10^4 nats behind
    tok[2] = -1e-4                                        # branch 2 predicts every token almost surely
    post = domain_posterior(tok, torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1])), context_tokens=context_tokens)
    assert bool(torch.isfinite(post).all()) and bool((post >= 0).all())
    torch.testing.assert_close(post.sum(-1), torch.ones(B, S))
    assert bool((post[:, 1:, 1] < 1e-30).all())
    if context_tokens is None:
        assert bool((post[:, 20:, 2] > 0.99).all())
    else:                                                 # the evidence stops growing after the prefix
        torch.testing.assert_close(post[:, context_tokens:], post[:, context_tokens:context_tokens + 1].expand(
            B, S - context_tokens, N))
    if top_k is not None:
        ens = BTMEnsemble([Unigram(torch.zeros(V)) for _ in range(N)], top_k=top_k)
        sparse = ens._mix_weights(tok)
        torch.testing.assert_close(sparse.sum(-1), torch.ones(B, S))
        assert int((sparse > 0).sum(-1).max()) <= top_k
