"""The benchmark's peers compute moekit's layer: `benchmarks/bench_cpu.py --quick` equality
checks (outputs and input gradients, no timings). Skips cleanly without the ``bench`` extra."""
import pytest
import torch

P = pytest.importorskip("benchmarks.peers")
bench_cpu = pytest.importorskip("benchmarks.bench_cpu")


def _checks(train: bool, want: str):
    if want == "hf" and P.hf_unavailable():
        pytest.skip(f"transformers peers unavailable ({P.hf_unavailable()}): pip install 'moekit[bench]'")
    if want == "torchtitan" and P.torchtitan_unavailable():
        pytest.skip(f"torchtitan unavailable ({P.torchtitan_unavailable()}): pip install 'moekit[bench]'")
    s = bench_cpu.QUICK["T=256 D=64 F=32 E=32 K=8"] if train else dict(bench_cpu.QUICK_DECODE, T=8)
    moe = bench_cpu.make_layer(s["D"], s["F"], s["E"], s["K"])
    if not train:
        moe.eval()
    impls = bench_cpu.implementations(moe, s["T"], train, max_gib=1.0)
    x = torch.randn(s["T"], s["D"])
    return bench_cpu.check(impls, x, train, torch.randn(s["T"], s["D"]) if train else None)


@pytest.mark.parametrize("train", [True, False], ids=["fwd+bwd", "decode"])
def test_hf_blocks_equal_moekit(train):
    checks = _checks(train, "hf")
    ran = {n: c for n, c in checks.items() if n.startswith("HF") and "unavailable" not in c}
    # eager and grouped_mm run on every machine; batched_mm fits at these sizes.
    for family in ("HF Mixtral", "HF Qwen3-MoE"):
        for impl in ("eager", "grouped_mm", "batched_mm"):
            assert f"{family} {impl}" in ran, sorted(checks)
    for name, c in ran.items():
        assert c["ok"] and c["err_y"] <= 1e-5 and c["err_dx"] <= 1e-5, (name, c)
    # The bench's own baselines and moekit's default path agree too.
    for name in ("moekit (auto)", "per-expert loop", "sort + _grouped_mm"):
        assert checks[name]["ok"], (name, checks[name])


@pytest.mark.parametrize("train", [True, False], ids=["fwd+bwd", "decode"])
def test_torchtitan_moe_equal_moekit(train):
    c = _checks(train, "torchtitan")["torchtitan MoE"]
    assert "unavailable" not in c, c
    # bf16 experts (torchtitan casts inside GroupedExperts): 8 bf16 ulp relative, and not exact.
    assert c["ok"] and c["err_y"] <= 8 * 2.0 ** -8 and c["err_dx"] <= 8 * 2.0 ** -8, c
    assert c["err_y"] > 0


def test_weight_read_floor_reads_exactly_the_active_experts():
    """The floor is one token's Σ over the experts the batch hits of each expert's SwiGLU,
    unweighted: it reads those experts' weights, each once, and no other."""
    s = bench_cpu.QUICK_DECODE
    moe = bench_cpu.make_layer(s["D"], s["F"], s["E"], s["K"]).eval()
    x = torch.randn(5, s["D"])
    fn, A = P.weight_read_floor(moe, x)
    with torch.no_grad():
        hit = torch.unique(moe.router(x).expert_ids).tolist()
        assert A == len(hit) and s["K"] <= A <= min(s["E"], 5 * s["K"])
        want = sum(torch.nn.functional.linear(
            torch.nn.functional.silu(g) * u, moe.experts.down_proj[e])
            for e in hit for g, u in [torch.nn.functional.linear(x, moe.experts.gate_up_proj[e]).chunk(2, -1)])
        torch.testing.assert_close(fn(x), want[:1], rtol=1e-5, atol=1e-5)
