"""METHODS.md C4: SEED (Rypeść et al. 2024) — per-class Gaussians in each expert's latent space,
the least-overlap selection, one expert fine-tuned per task, the Bayes-posterior ensemble."""
import pytest
import torch

import moekit
from moekit.continual import SEED, class_overlap, fit_gaussian, gaussian_kl, gaussian_log_prob


def _blobs(T=4, n=80, d=8, seed=0):
    """T tasks of 2 classes, each class a Gaussian blob at its own centre."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(T):
        cs = (2 * t, 2 * t + 1)
        centres = 3 * torch.randn(2, d, generator=g)
        y = torch.tensor(cs).repeat_interleave(2 * n)
        x = centres.repeat_interleave(2 * n, 0) + torch.randn(4 * n, d, generator=g)
        perm = torch.randperm(4 * n, generator=g)
        x, y = x[perm], y[perm]
        tasks.append((x[:2 * n], y[:2 * n], x[2 * n:], y[2 * n:], cs))
    return tasks


def test_gaussian_helpers_match_torch_distributions():
    torch.manual_seed(0)
    z = torch.randn(50, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64)
    mu, cov = fit_gaussian(z, eps=1e-3)
    torch.testing.assert_close(mu, z.mean(0))
    torch.testing.assert_close(cov, torch.cov(z.T) + 1e-3 * torch.eye(4, dtype=torch.float64))
    mu2, cov2 = fit_gaussian(z + 1.5, eps=1e-3, covariance="diag")
    assert torch.equal(cov2, torch.diag(cov2.diagonal()))
    N = torch.distributions.MultivariateNormal
    want_kl = torch.distributions.kl_divergence(N(mu, cov), N(mu2, cov2))
    torch.testing.assert_close(gaussian_kl(mu, cov, mu2, cov2), want_kl)
    x = torch.randn(7, 4, dtype=torch.float64)
    want = torch.stack([N(mu, cov).log_prob(x), N(mu2, cov2).log_prob(x)], -1)
    torch.testing.assert_close(gaussian_log_prob(x, torch.stack([mu, mu2]), torch.stack([cov, cov2])), want)
    # class_overlap: the mean of the (C, C) KL matrix, zeros on the diagonal
    mus, covs = torch.stack([mu, mu2]), torch.stack([cov, cov2])
    kl = torch.tensor([[0.0, gaussian_kl(mu2, cov2, mu, cov)], [gaussian_kl(mu, cov, mu2, cov2), 0.0]],
                      dtype=torch.float64)
    torch.testing.assert_close(class_overlap(mus, covs), kl.mean())
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_overlap(mus[:1], covs[:1])
    with pytest.raises(ValueError, match=r"shape \(N >= 2, Z\)"):
        fit_gaussian(z[:1])


def _seed_model(**kw):
    torch.manual_seed(0)
    return SEED(d_in=8, num_experts=2, d_hidden=16, d_latent=4, num_classes=8, d_shared=12, **kw)


def test_exactly_one_expert_changes_per_task_and_the_shared_layer_only_on_task_0():
    tasks = _blobs()
    model = _seed_model()
    kw = dict(epochs=2, batch_size=32, lr=1e-2)
    for t, (x, y, _, _, cs) in enumerate(tasks):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        k = model.learn_task(x, y, cs, seed=t, **kw)
        changed = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("experts") else "")
                   for name, v in model.state_dict().items()
                   if name.split(".")[0] in ("experts", "shared") and not torch.equal(v, before[name])}
        want = {f"experts.{k}"} | ({"shared"} if t == 0 else set())
        assert changed == want, (t, changed)
        assert k == t if t < 2 else k in (0, 1)
    assert model.known.sum() == 2 * 2 + 2 * 2 + 2 * 2 + 2 * 2 - 2       # expert 1 missed task 0's classes
    assert len(model.history) == 4 and "overlap" not in model.history[1] and "overlap" in model.history[2]


def test_selection_is_reproducible_from_stored_gaussians():
    tasks = _blobs()
    model = _seed_model()
    for t, (x, y, _, _, cs) in enumerate(tasks[:3]):
        model.learn_task(x, y, cs, epochs=2, batch_size=32, lr=1e-2, seed=t)
    rec = model.history[2]
    overlap = torch.stack([class_overlap(rec["means"][k], rec["covs"][k]) for k in range(2)])
    assert torch.equal(overlap, rec["overlap"]) and rec["expert"] == int(overlap.argmax())
    # the expert not chosen stayed frozen, so its stored class Gaussians are the selection statistics
    other, cs = 1 - rec["expert"], list(tasks[2][4])
    assert torch.equal(model.means[other, cs], rec["means"][other])
    assert torch.equal(model.covs[other, cs], rec["covs"][other])
    assert model.select_expert(tasks[2][0], tasks[2][1], cs)[1]["overlap"][other] == rec["overlap"][other]


def test_ensemble_posterior_is_the_mean_over_experts_that_know_a_class():
    tasks = _blobs(T=2)
    model = _seed_model(tau=2.0)
    for t, (x, y, _, _, cs) in enumerate(tasks):
        model.learn_task(x, y, cs, epochs=3, batch_size=32, lr=1e-2, seed=t)
    x = torch.cat([t[2] for t in tasks])[:20]
    ll = model.log_likelihoods(x)                         # (B, K, L), −inf where unknown
    assert torch.isinf(ll[:, 1, :2]).all() and torch.isfinite(ll[:, 0, :4]).all()
    p0 = torch.softmax(ll[:, 0, :4] / 2.0, -1)
    p1 = torch.softmax(ll[:, 1, 2:4] / 2.0, -1)
    want = torch.zeros(20, 8, dtype=torch.float64)
    want[:, :2] = p0[:, :2]
    want[:, 2:4] = (p0[:, 2:4] + p1) / 2
    torch.testing.assert_close(model.predict_proba(x), want)
    assert model.predict(x).max() < 4
    acc = (model.predict(torch.cat([t[2] for t in tasks])) == torch.cat([t[3] for t in tasks])).float().mean()
    assert acc > 0.9                                      # class-incremental, no task id
    aware = model.predict(tasks[1][2], classes=tasks[1][4])
    assert set(aware.tolist()) <= {2, 3}


def test_seed_refuses_bad_input():
    model = _seed_model()
    x, y = torch.randn(10, 8), torch.tensor([0, 1] * 5)
    with pytest.raises(ValueError, match=r"x_train must have shape \(any, 8\)"):
        model.learn_task(torch.randn(10, 7), y, (0, 1), epochs=1, batch_size=4, lr=1e-2)
    with pytest.raises(ValueError, match="only the task's classes"):
        model.learn_task(x, y + 2, (0, 1), epochs=1, batch_size=4, lr=1e-2)
    model.learn_task(x, y, (0, 1), epochs=1, batch_size=4, lr=1e-2)
    with pytest.raises(ValueError, match="already learned"):
        model.learn_task(x, y, (0, 1), epochs=1, batch_size=4, lr=1e-2)
    with pytest.raises(ValueError, match="alpha"):
        _seed_model(alpha=2.0)


def test_public_namespace():
    assert moekit.continual.SEED is SEED
    assert moekit.continual.distillation_kl is moekit.models.distillation_kl
