"""Mixture-of-Depths blocks in the transformer LM (METHODS.md CC1): exactly ⌈c·S⌉ tokens run each
MoD block at their own rotary positions, the rest are unchanged; c = 1 is the plain block up to
the router-score scaling; eval decides per token by the causal predictor (prefixes agree)."""
import dataclasses

import pytest
import torch

import moekit
from moekit.layers import MixtureOfDepths
from moekit.layers.depths import capacity_tokens
from moekit.models.transformer import DepthRoutedBlock, TransformerConfig, TransformerLM, flops_per_token
from moekit.train.config import apply_overrides, get_preset, variant_model_config


def small(**kw):
    base = dict(vocab_size=40, d_model=32, n_layers=4, n_heads=2, max_seq_len=64, moe_layers="none",
                mod_layers="every_other", mod_capacity=0.25)
    return TransformerConfig(**{**base, **kw})


def capture_inputs(model):
    """{block index: input of that MoD block's last call}."""
    seen = {}
    for i, b in enumerate(model.blocks):
        if isinstance(b, DepthRoutedBlock):
            b.mod.register_forward_pre_hook(lambda m, args, kw=None, i=i: seen.__setitem__(i, args[0].detach()))
    return seen


def reference_update(block: DepthRoutedBlock, model: TransformerLM, x_BSD, idx_BS):
    """Per sequence: the selected positions (top ⌈c·S⌉ router logits, ascending) through the inner
    block alone, rotated by the rotary angles of those positions; others untouched."""
    B, S, _ = x_BSD.shape
    K = capacity_tokens(block.mod.capacity, S)
    r_BS = block.mod.router_logits(x_BSD)
    y = x_BSD.clone()
    for b in range(B):
        pos = torch.sort(r_BS[b], descending=True, stable=True).indices[:K].sort().values
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]
        upd = block.inner.update(x_BSD[b, pos][None], cos, sin, idx_BS[b, pos][None])[0]
        y[b, pos] = x_BSD[b, pos] + torch.sigmoid(r_BS[b, pos])[:, None] * upd
    return y


def test_config_places_mod_blocks_and_checks_its_fields():
    m = TransformerLM(small())
    assert [isinstance(b, DepthRoutedBlock) for b in m.blocks] == [False, True, False, True]
    assert all(isinstance(b, DepthRoutedBlock) for b in TransformerLM(small(mod_layers="every")).blocks)
    assert not any(isinstance(b, DepthRoutedBlock) for b in TransformerLM(small(mod_layers="none")).blocks)
    with pytest.raises(ValueError, match="mod_layers"):
        small(mod_layers="odd")
    with pytest.raises(ValueError, match="mod_capacity"):
        small(mod_capacity=0.0)
    with pytest.raises(ValueError, match="mod_capacity"):
        small(mod_capacity=1.5)
    # Round trip through the run config's spelling (`moekit train --set model.mod_layers=...`).
    assert TransformerConfig.from_dict(small().to_dict()) == small()
    run = apply_overrides(get_preset("tiny"), ["model.mod_layers=every_other", "model.mod_capacity=0.5"])
    cfg = variant_model_config(run, "moe", vocab_size=40)
    assert cfg.mod_layers == "every_other" and cfg.mod_capacity == 0.5
    assert [b.is_moe for b in TransformerLM(cfg).moe_blocks] == [True, True]


@pytest.mark.parametrize("S", [16, 13, 1])
def test_training_pass_processes_exactly_ceil_cS_tokens_at_their_positions(S):
    torch.manual_seed(0)
    model = TransformerLM(small()).train()
    seen = capture_inputs(model)
    idx = torch.randint(0, 40, (3, S))
    model(idx)
    for i in (1, 3):
        blk = model.blocks[i]
        sel = blk.mod.last_selected
        assert sel.sum(1).tolist() == [capacity_tokens(0.25, S)] * 3
        x = seen[i]
        y_ref = reference_update(blk, model, x, idx)
        cos, sin = model.rope_cos[:S], model.rope_sin[:S]
        blk.mod.block.context = (cos, sin, idx)
        y = blk.mod(x)
        blk.mod.block.context = None
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(y[~sel], x[~sel], rtol=0, atol=0)        # skipped tokens unchanged


def test_capacity_one_is_the_plain_block_with_score_scaling():
    torch.manual_seed(1)
    cfg = small(mod_capacity=1.0)
    model = TransformerLM(cfg).train()
    blk = model.blocks[1]
    x = torch.randn(2, 11, 32)
    idx = torch.randint(0, 40, (2, 11))
    cos, sin = model.rope_cos[:11], model.rope_sin[:11]
    y = blk(x, cos, sin, idx)
    plain = blk.inner(x, cos, sin, idx)           # the Block's own forward: x + attn + ffn
    g = torch.sigmoid(blk.mod.router_logits(x))[..., None]
    torch.testing.assert_close(y, x + g * (plain - x), atol=1e-5, rtol=1e-4)
    assert blk.mod.last_selected.all()


def test_eval_decides_per_token_by_the_predictor_and_prefixes_agree():
    torch.manual_seed(2)
    model = TransformerLM(small(mod_capacity=0.5))
    with torch.no_grad():               # a predictor that processes the tokens whose x_0 > 0
        for b in model.blocks:
            if isinstance(b, DepthRoutedBlock):
                lin0, lin2 = b.mod.predictor[0], b.mod.predictor[2]
                lin0.weight.copy_(50 * torch.eye(32))
                lin2.weight.zero_()
                lin2.weight[0, 0] = 1.0
                lin0.bias.zero_()
                lin2.bias.zero_()
    model.eval()
    seen = capture_inputs(model)
    idx = torch.randint(0, 40, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        for i in (1, 3):
            sel = model.blocks[i].mod.last_selected
            torch.testing.assert_close(sel, model.blocks[i].mod.decision_logits(seen[i]) > 0)
            assert 0 < sel.sum() < sel.numel()
        for t in (1, 7, 15):
            part, _ = model(idx[:, :t])
            torch.testing.assert_close(part, full[:, :t], atol=1e-5, rtol=1e-4)
        # causal_eval=False keeps training's top-K: exactly ⌈c·S⌉ again (and looks ahead).
        for b in model.blocks:
            if isinstance(b, DepthRoutedBlock):
                b.causal_eval = False
        model(idx)
        assert model.blocks[1].mod.last_selected.sum(1).tolist() == [10, 10]


def test_generate_without_cache_and_cache_refused():
    torch.manual_seed(3)
    model = TransformerLM(small()).eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 4, temperature=0)
    assert out.shape == (2, 7)
    with pytest.raises(ValueError, match="KV cache"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, use_cache=True)


def test_mode_with_moe_ffns_collects_every_aux_loss():
    torch.manual_seed(4)
    cfg = dataclasses.replace(small(), moe_layers="every", moe={"num_experts": 4, "top_k": 2})
    model = TransformerLM(cfg).train()
    assert len(model.moe_blocks) == 4
    model(torch.randint(0, 40, (2, 16)))
    mods = [b.mod for b in model.blocks if isinstance(b, DepthRoutedBlock)]
    total = sum(b.ffn.aux_loss for b in model.moe_blocks) + sum(m.aux_loss for m in mods)
    torch.testing.assert_close(moekit.aux_loss(model), total)
    # In the MoD blocks only the selected tokens reach the experts: B·K tokens, top-2 each.
    assert int(model.blocks[1].ffn.last_stats.tokens_per_expert.sum()) == 2 * 4 * 2
    assert int(model.blocks[0].ffn.last_stats.tokens_per_expert.sum()) == 2 * 16 * 2


def test_flops_count_only_the_processed_share():
    S = 32
    base = TransformerLM(small(mod_layers="none"))
    full = TransformerLM(small(mod_capacity=1.0))
    extra = sum(p.numel() for b in full.blocks if isinstance(b, DepthRoutedBlock)
                for n, p in b.mod.named_parameters() if not n.startswith("block."))
    # c = 1: the plain model plus the routers' and predictors' matmuls.
    assert flops_per_token(full, S)["forward"] == flops_per_token(base, S)["forward"] + 2 * extra
    f = [flops_per_token(TransformerLM(small(mod_capacity=c)), S)["forward"] for c in (1.0, 0.5, 0.125)]
    assert f[0] > f[1] > f[2]
    # c = 1/8 of S = 32: 4 tokens; two of four blocks at 1/8 cost, attention at 1/64.
    blk = full.blocks[1].inner
    per_block = 2 * sum(p.numel() for n, p in blk.named_parameters() if "norm" not in n) + 2 * S * 32
    per_block_c = 2 * sum(p.numel() for n, p in blk.named_parameters() if "norm" not in n) / 8 + 2 * S * 32 / 64
    assert f[2] == pytest.approx(f[0] - 2 * (per_block - per_block_c), abs=1)
    # measured: the fraction of the last pass (eval, causal rule).
    model = TransformerLM(small(mod_capacity=0.5)).eval()
    with torch.no_grad():
        model(torch.randint(0, 40, (2, S)))
    fr = [b.processed_fraction(S, measured=True) for b in model.blocks if isinstance(b, DepthRoutedBlock)]
    assert all(0 <= x <= 1 for x in fr)


def test_mod_positions_flag_passes_ascending_positions():
    torch.manual_seed(5)

    class PosBlock(torch.nn.Module):
        def forward(self, x_BKD, pos_BK):
            self.pos = pos_BK
            return x_BKD * pos_BK[..., None].to(x_BKD.dtype)

    layer = MixtureOfDepths(PosBlock(), d_model=8, capacity=0.3, positions=True)
    x = torch.randn(3, 10, 8)
    y = layer(x)
    pos = layer.block.pos
    assert pos.shape == (3, 3) and (pos.diff(dim=1) > 0).all()
    assert torch.equal(torch.zeros_like(layer.last_selected).scatter(1, pos, True), layer.last_selected)
    g = torch.sigmoid(layer.router_logits(x))
    ref = x + (layer.last_selected * g * torch.arange(10.0))[..., None] * x
    torch.testing.assert_close(y, ref)
    with pytest.raises(TypeError, match="positions"):
        MixtureOfDepths(PosBlock(), d_model=8, capacity=0.3, positions="yes")
