"""torch.compile and torch.export of the layer on the CPU (trust issue, class 6): the compiled
layer equals the eager one in outputs and gradients, the sync-free layer compiles with
fullgraph=True, export round-trips, and the main job trains with train.compile=true."""
import pytest
import torch

import moekit

pytestmark = pytest.mark.filterwarnings("ignore")


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    return moekit.MoE(d_model=32, num_experts=4, top_k=2, **kw)


@pytest.mark.parametrize("kw, fullgraph", [({"num_shared_experts": 1}, False),
                                           ({"sync_free": True, "capacity_factor": 1.0}, True)])
def test_compiled_layer_equals_eager(kw, fullgraph):
    torch._dynamo.reset()
    eager, comp = _layer(**kw), _layer(**kw)
    compiled = torch.compile(comp, fullgraph=fullgraph)
    x = torch.randn(2, 12, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = eager(xa), compiled(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    (ya.square().sum() + eager.aux_loss).backward()
    (yb.square().sum() + comp.aux_loss).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    for (n, pa), (_, pb) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("kw", [{}, {"sync_free": True}])
def test_export_round_trips(kw):
    m = _layer(**kw).eval()
    x = torch.randn(3, 7, 32)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x), rtol=0, atol=0)


def test_main_job_trains_compiled(tmp_path):
    from moekit import cli

    rc = cli.main(["train", "--preset", "tiny", "--set", "train.compile=true", "--set", "train.steps=4",
                   "--set", "train.eval_every=4", "--out", str(tmp_path / "run"), "--quiet", "--no-report"])
    assert rc == 0
    from moekit.train import load_results

    results = load_results(tmp_path / "run")
    assert {r["variant"] for r in results} == {"moe", "dense"}
    assert all(r["status"] == "completed" and r["steps"] == 4 and r["val_loss"] < 10 for r in results)
