"""STAR (Sheng et al. 2021), M3oE's multi-domain baseline: W_shared ⊙ W_d per domain, partitioned
normalisation, an auxiliary domain network; and the ple / star architectures of MultiDomainConfig."""
import pytest
import torch
import torch.nn.functional as F

from moekit.layers import STAR, StarLinear
from moekit.models import MultiDomainConfig


def test_star_linear_batched_equals_the_per_domain_reference():
    torch.manual_seed(0)
    layer = StarLinear(7, 5, 3)
    with torch.no_grad():
        for p in (layer.domain_gamma, layer.domain_beta, layer.domain_bias):
            p.add_(torch.randn_like(p))
    x = torch.randn(11, 7)
    dom = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 2])
    y = layer(x, dom)
    for t in range(11):
        torch.testing.assert_close(y[t], layer.domain_forward(int(dom[t]), x[t:t + 1])[0])
    # The reference is the formula: ReLU(PN_d((W_s ⊙ W_d) x + b_s + b_d)).
    d = 2
    u = x @ (layer.shared_weight * layer.domain_weight[d]).T + layer.shared_bias + layer.domain_bias[d]
    u = F.layer_norm(u, (5,)) * (layer.gamma * layer.domain_gamma[d]) + layer.beta + layer.domain_beta[d]
    torch.testing.assert_close(layer.domain_forward(d, x), torch.relu(u))


def test_a_row_only_trains_its_own_domain():
    torch.manual_seed(1)
    star = STAR(d_model=6, num_domains=3, num_tasks=2, dims=(8, 4))
    x = torch.randn(5, 6)
    dom = torch.full((5,), 1)
    star(x, dom).sum().backward()
    for layer in star.layers:
        for p in (layer.domain_weight, layer.domain_bias, layer.domain_gamma, layer.domain_beta):
            assert p.grad[1].abs().sum() > 0
            assert p.grad[0].abs().sum() == 0 and p.grad[2].abs().sum() == 0
    assert star.layers[0].shared_weight.grad.abs().sum() > 0


def test_one_domain_with_unit_domain_factors_is_a_plain_network():
    torch.manual_seed(2)
    star = STAR(d_model=4, num_domains=1, num_tasks=1, dims=(6,))
    layer = star.layers[0]
    with torch.no_grad():
        layer.domain_weight.fill_(1.0)
    x = torch.randn(9, 4)
    h = torch.relu(F.layer_norm(F.linear(x, layer.shared_weight, layer.shared_bias), (6,)))
    want = star.towers[0](h) + star.aux(torch.zeros(9, dtype=torch.long))
    torch.testing.assert_close(star(x, torch.zeros(9, dtype=torch.long)), want)


def test_star_refuses_bad_domain_ids():
    star = STAR(d_model=4, num_domains=2, num_tasks=1)
    with pytest.raises(ValueError, match="domain_ids"):
        star(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="domain_ids"):
        star(torch.randn(3, 4), torch.zeros(3))


@pytest.mark.parametrize("arch", ["ple", "star"])
def test_multidomain_config_builds_ple_and_star(arch):
    torch.manual_seed(3)
    model = MultiDomainConfig(arch=arch, width=8).build(vocab_sizes=[5, 7], num_continuous=2, num_domains=3,
                                                        num_tasks=2)
    cat = torch.randint(0, 5, (10, 2))
    dom = torch.randint(0, 3, (10,))
    out = model(cat, torch.randn(10, 2), dom)
    assert out.shape == (10, 2)
    out.sum().backward()
    assert model.structure_parameters() == []
    if arch == "star":                 # domain-aware: changing only the domain changes the output
        with torch.no_grad():
            other = model(cat, torch.randn(10, 2) * 0 + 1, (dom + 1) % 3)
            same = model(cat, torch.randn(10, 2) * 0 + 1, dom)
        assert not torch.allclose(other, same)
