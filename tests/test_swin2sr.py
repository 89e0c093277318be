"""Swin V2 window attention / blocks and Swin2-MoSE (moekit.models.swin2sr), METHODS.md CV2.

The block is checked against transformers' independent Swin V2 layer with copied weights, in
regular and shifted windows."""
import pytest
import torch

import moekit
from moekit.layers import MoESM
from moekit.models import Swin2MoSE, SwinMLP, SwinV2Block, WindowAttentionV2, shifted_window_mask, swin_param_counts
from moekit.models.swin2sr import window_partition, window_reverse


def official_mask(H, W, w, s):
    """The mask as Swin / Swin2SR build it: nine slice regions labelled 0..8."""
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = window_partition(img, w).squeeze(-1)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


@pytest.mark.parametrize("H,W,w,s", [(8, 8, 4, 2), (12, 8, 4, 1), (16, 24, 8, 4)])
def test_shifted_window_mask_matches_the_slice_construction(H, W, w, s):
    assert torch.equal(shifted_window_mask(H, W, w, s), official_mask(H, W, w, s))


def test_window_partition_round_trip_and_order():
    x = torch.arange(2 * 8 * 12 * 3, dtype=torch.float32).view(2, 8, 12, 3)
    win = window_partition(x, 4)
    assert win.shape == (2 * 2 * 3, 16, 3)
    assert torch.equal(win[1].view(4, 4, 3), x[0, 0:4, 4:8])            # second window: row 0, column 1
    assert torch.equal(window_reverse(win, 4, 8, 12), x)


def _hf_layer(dim, heads, w, res, shift, mlp_ratio):
    transformers = pytest.importorskip("transformers")
    from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer
    cfg = transformers.Swinv2Config(embed_dim=dim, depths=[2], num_heads=[heads], window_size=w, mlp_ratio=mlp_ratio,
                                    qkv_bias=True, hidden_act="gelu", layer_norm_eps=1e-5,
                                    attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    layer = Swinv2Layer(cfg, dim=dim, input_resolution=res, num_heads=heads, shift_size=shift).eval()
    with torch.no_grad():                          # move every parameter away from its default
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _copy_from_hf(block: SwinV2Block, layer) -> None:
    a, sa = block.attn, layer.attention.self
    with torch.no_grad():
        a.qkv.weight.copy_(torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]))
        a.q_bias.copy_(sa.query.bias)
        a.v_bias.copy_(sa.value.bias)
        a.logit_scale.copy_(sa.logit_scale)
        a.proj.load_state_dict(layer.attention.output.dense.state_dict())
        if a.position_bias == "cpb":
            a.cpb_mlp.load_state_dict(sa.continuous_position_bias_mlp.state_dict())
        else:                                      # the table holding the values HF's MLP produces
            a.bias_table.copy_(16 * torch.sigmoid(sa.continuous_position_bias_mlp(sa.relative_coords_table)).view(
                -1, sa.num_attention_heads))
        block.norm1.load_state_dict(layer.layernorm_before.state_dict())
        block.norm2.load_state_dict(layer.layernorm_after.state_dict())
        block.ffn.fc1.load_state_dict(layer.intermediate.dense.state_dict())
        block.ffn.fc2.load_state_dict(layer.output.dense.state_dict())


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("position_bias", ["cpb", "table"])
def test_block_equals_transformers_swinv2_layer(shift, position_bias):
    dim, heads, w, H, W = 24, 3, 4, 8, 12
    layer = _hf_layer(dim, heads, w, (H, W), shift, 2.0)
    block = SwinV2Block(dim=dim, num_heads=heads, window_size=w, shift_size=shift, mlp_ratio=2.0,
                        position_bias=position_bias).eval()
    _copy_from_hf(block, layer)
    x = torch.randn(2, H * W, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = layer(x, (H, W))[0]
        got = block(x, (H, W))
    # HF 5.x adds the shift mask twice (−200 instead of −100): both underflow to 0 after softmax.
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (got - want).abs().max()


def test_shift_changes_the_output_and_masks_wrapped_neighbours():
    torch.manual_seed(0)
    b0 = SwinV2Block(dim=8, num_heads=2, window_size=4, shift_size=0).eval()
    b2 = SwinV2Block(dim=8, num_heads=2, window_size=4, shift_size=2).eval()
    b2.load_state_dict(b0.state_dict())
    x = torch.randn(1, 64, 8)
    assert not torch.allclose(b0(x, (8, 8)), b2(x, (8, 8)))
    # a token in the top-left corner must not see the bottom-right corner, its wrap-around window mate
    y = x.clone()
    y.view(1, 8, 8, 8)[0, 7, 7] += 5.0
    with torch.no_grad():
        d = (b2(y, (8, 8)) - b2(x, (8, 8))).view(8, 8, 8).abs().amax(-1)
    assert float(d[0, 0]) < 1e-4 and float(d[7, 7]) > 1e-3


def test_lepe_adds_the_convolved_values():
    """With a centred-delta depthwise kernel, LePE adds each token's value, so the difference from
    the same attention without LePE is proj.weight · v."""
    torch.manual_seed(0)
    plain = WindowAttentionV2(dim=12, num_heads=3, window_size=4, position_bias="table")
    lepe = WindowAttentionV2(dim=12, num_heads=3, window_size=4, position_bias="table", lepe=True)
    lepe.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        lepe.lepe.weight.zero_()
        lepe.lepe.weight[:, 0, 1, 1] = 1.0
        lepe.lepe.bias.zero_()
        plain.v_bias.normal_()
        lepe.v_bias.copy_(plain.v_bias)
    x = torch.randn(5, 16, 12)
    v = x @ plain.qkv.weight[24:].T + plain.v_bias
    with torch.no_grad():
        assert torch.allclose(lepe(x) - plain(x), v @ plain.proj.weight.T, atol=1e-5)
    # a kernel that reads the left neighbour sees zero padding at each window's left edge
    with torch.no_grad():
        lepe.lepe.weight.zero_()
        lepe.lepe.weight[:, 0, 1, 0] = 1.0
        shifted = torch.zeros_like(v).view(5, 4, 4, 12)
        shifted[:, :, 1:] = v.view(5, 4, 4, 12)[:, :, :-1]
        assert torch.allclose(lepe(x) - plain(x), shifted.view(5, 16, 12) @ plain.proj.weight.T, atol=1e-5)


@pytest.mark.parametrize("ffn", ["mlp", "moe", "moe_sm"])
def test_swin2mose_shapes_padding_and_aux_loss(ffn):
    torch.manual_seed(0)
    net = Swin2MoSE(in_channels=3, scale=2, embed_dim=16, depths=(2, 1), num_heads=(2, 4), window_size=4, ffn=ffn,
                    num_experts=4, top_k=2)
    x = torch.rand(3, 3, 10, 7)                     # not a multiple of the window: reflect-padded, then cropped
    y = net(x)
    assert y.shape == (3, 3, 20, 14)
    aux = moekit.aux_loss(net)
    kinds = {type(m.ffn) for g in net.groups for m in g.blocks}
    if ffn == "mlp":
        assert kinds == {SwinMLP} and float(aux) == 0.0
    else:
        assert kinds == {MoESM} and aux.requires_grad
        assert {m.ffn.merger_kind for g in net.groups for m in g.blocks} == {"smart" if ffn == "moe_sm" else "sum"}
    (y.square().mean() + 0.2 * aux).backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "noise" not in n)


def test_every_token_of_an_image_goes_to_the_same_experts():
    torch.manual_seed(0)
    net = Swin2MoSE(in_channels=2, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, num_experts=4, top_k=2)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, MoESM):
                m.router.weight.normal_(std=10.0)   # the official gate starts at zero: make it route
        x = torch.randn(5, 2, 8, 8) * torch.arange(1.0, 6.0).view(5, 1, 1, 1) + torch.randn(5, 2, 1, 1)
        net(x)
    sets = set()
    for m in net.modules():
        if isinstance(m, MoESM):
            ids = m.last_routing.expert_ids.view(5, 64, 2)        # token b·N + n, K slots
            assert torch.equal(ids, ids[:, :1].expand_as(ids))
            sets |= {tuple(row) for row in ids[:, 0].tolist()}
    assert len(sets) > 1                                            # and images do differ


def test_smart_merger_with_a_delta_kernel_and_k1_equals_the_plain_moe():
    """k = 1 and a centred-delta merger kernel: Swin2-MoSE computes exactly the MoE-without-merger net."""
    torch.manual_seed(0)
    kw = dict(in_channels=2, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, num_experts=4, top_k=1)
    sm, plain = Swin2MoSE(ffn="moe_sm", **kw), Swin2MoSE(ffn="moe", **kw)
    with torch.no_grad():
        for m in sm.modules():
            if isinstance(m, MoESM):
                m.merger.weight.zero_()
                m.merger.weight[0, 0, 1, 1] = 1.0
                m.merger.bias.zero_()
                m.router.weight.normal_()
    plain.load_state_dict({k: v for k, v in sm.state_dict().items() if ".merger." not in k})
    x = torch.rand(3, 2, 8, 8)
    assert torch.allclose(sm(x), plain(x), atol=1e-5)


def test_bicubic_residual_starts_at_bicubic_and_learns():
    torch.manual_seed(0)
    net = Swin2MoSE(in_channels=2, embed_dim=8, depths=(1,), num_heads=(2,), window_size=4, residual="bicubic")
    x = torch.rand(2, 2, 8, 8)
    bicubic = torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    assert torch.equal(net(x), bicubic)
    net(x).square().mean().backward()
    assert net.upsample[0].weight.grad.abs().sum() > 0


def test_param_counts_match_the_papers_table3():
    """One MoE-SM 8/2 FFN at D = 90 holds 132 480 parameters without the merger (the paper's Table 3)."""
    layer = MoESM(d_model=90, num_experts=8, top_k=2, merger="sum")
    assert sum(p.numel() for p in layer.parameters()) == 132480
    mlp_net = Swin2MoSE(embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, ffn="mlp")
    total, active = swin_param_counts(mlp_net)
    assert total == active == sum(p.numel() for p in mlp_net.parameters())
    moe_net = Swin2MoSE(embed_dim=16, depths=(2,), num_heads=(2,), window_size=4, ffn="moe", num_experts=8, top_k=2)
    total, active = swin_param_counts(moe_net)
    per_expert = 2 * 16 * 16 + 16 + 16                   # fc1, fc2 with biases, hidden = D (mlp_ratio 1)
    assert total - active == 2 * 6 * per_expert          # two blocks, six idle experts each


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="ffn"):
        Swin2MoSE(ffn="dense")
    with pytest.raises(ValueError, match="residual"):
        Swin2MoSE(residual="nearest")
    with pytest.raises(ValueError, match="num_heads"):
        Swin2MoSE(depths=(2, 2), num_heads=(2,))
    with pytest.raises(ValueError, match="position_bias"):
        WindowAttentionV2(dim=8, num_heads=2, window_size=4, position_bias="rope")
    with pytest.raises(ValueError, match="divisible"):
        WindowAttentionV2(dim=10, num_heads=3, window_size=4)
    with pytest.raises(ValueError, match="shift_size"):
        SwinV2Block(dim=8, num_heads=2, window_size=4, shift_size=4)
    net = Swin2MoSE(in_channels=4, embed_dim=8, depths=(1,), num_heads=(2,), window_size=4)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        net(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="window_size=4"):
        net.groups[0].blocks[0](torch.rand(1, 30, 8), (5, 6))
