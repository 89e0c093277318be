"""R6 (pMoE): the data's spurious patches follow their split, each expert takes exactly l patches
of every example, the pMoE is the library's MoE, and --quick runs."""
import torch

import moekit
from moekit.routing import ExpertChoiceRouter
from projects.patch_moe_sample_complexity import run as R
from projects.patch_moe_sample_complexity.data import make_task, sample
from projects.patch_moe_sample_complexity.models import PatchCNN, PatchMoE, selected_patches
from projects.patch_moe_sample_complexity.train import accuracy, train


def _task(**kw):
    return make_task(generator=torch.Generator().manual_seed(0), **kw)


def test_data_places_one_signal_patch_and_the_spurious_sign_follows_the_split():
    task = _task(noise=0.0, spurious_corr=0.8)
    assert abs(float(task.v @ task.u)) < 1e-6 and abs(float(task.v.norm()) - 1) < 1e-6
    g = torch.Generator().manual_seed(1)
    for split, agree in (("train", 0.8), ("test", 0.5), ("flipped", 0.0)):
        d = sample(task, 4000, split=split, generator=g)
        proj_v = d.x @ task.v                                         # (B, P): ±1 at the signal patch only
        assert torch.equal(proj_v.abs().argmax(1), d.signal_pos)
        torch.testing.assert_close(proj_v[torch.arange(4000), d.signal_pos], d.y)
        assert d.spurious_BP.sum(1).eq(2).all() and not d.spurious_BP[torch.arange(4000), d.signal_pos].any()
        s = (d.x @ task.u)[d.spurious_BP].view(4000, 2).sign()
        assert torch.equal(s[:, 0], s[:, 1])
        assert abs(float((s[:, 0] == d.y).float().mean()) - agree) < 0.03


def test_each_expert_takes_its_top_l_patches_of_every_example():
    torch.manual_seed(0)
    for l in (1, 2, 4):
        m = PatchMoE(dim=32, num_patches=16, num_experts=4, patches_per_expert=l, hidden=8).eval()
        assert isinstance(m.moe, moekit.MoE) and isinstance(m.moe.router, ExpertChoiceRouter)
        x = torch.randn(5, 16, 32)
        m(x)
        r = m.moe.last_routing
        per_example_expert = torch.zeros(5, 4, dtype=torch.long).index_put_(
            (r.token_ids // 16, r.expert_ids), torch.ones_like(r.token_ids), accumulate=True)
        assert per_example_expert.eq(l).all()
        # The chosen patches are the expert's l highest-scoring ones of that example.
        probs = torch.softmax(x.view(-1, 32) @ m.moe.router.weight.t(), -1).view(5, 16, 4)
        for e in range(4):
            picked = r.token_ids[r.expert_ids == e].view(5, l) % 16
            top = probs[:, :, e].topk(l, dim=1).indices
            assert torch.equal(picked.sort(1).values, top.sort(1).values)
        assert selected_patches(m, x).sum(1).le(4 * l).all()


def test_pmoe_learns_a_clean_task_and_the_cnn_is_the_sum_of_its_patches():
    task = _task(noise=0.5, spurious_corr=0.5)
    g = torch.Generator().manual_seed(2)
    tr, te = sample(task, 300, split="train", generator=g), sample(task, 500, split="test", generator=g)
    torch.manual_seed(0)
    m = PatchMoE(dim=32, num_patches=16, num_experts=4, patches_per_expert=2, hidden=8)
    train(m, tr, steps=80, lr=0.02)
    assert accuracy(m, te) > 0.9
    cnn = PatchCNN(dim=32, hidden=8)
    x = torch.randn(3, 16, 32)
    per_patch = torch.stack([cnn.readout(torch.relu(cnn.filters(x[:, j]))).squeeze(-1) - cnn.readout.bias
                             for j in range(16)]).sum(0) + cnn.readout.bias
    torch.testing.assert_close(cnn(x), per_patch)


def test_quick_run():
    out = R.main(["--quick"])
    s = out["summary"]
    assert set(s) == set(R.MODELS)
    for name in R.MODELS:
        assert all(0.0 <= m <= 1.0 for m, _ in s[name]["test_acc"])
        assert ("signal_kept" in s[name]) == name.startswith("pmoe")
