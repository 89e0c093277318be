"""``moekit convert | upcycle | merge`` end to end on tiny checkpoints written by transformers."""
import copy

import pytest
import torch

tf = pytest.importorskip("transformers")

import moekit  # noqa: E402
from moekit.cli import main  # noqa: E402
from moekit.recipes.io import load_surgery  # noqa: E402


def llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def test_convert(tmp_path, capsys):
    torch.manual_seed(0)
    m = tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=24,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               num_local_experts=4, num_experts_per_tok=2))
    m.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "converted 2 MoE blocks (mixtral)" in capsys.readouterr().out
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, m.eval()(ids).logits, atol=1e-5)


def test_upcycle_and_reload(tmp_path, capsys):
    dense = llama().eval()
    dense.save_pretrained(tmp_path / "dense")
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "up"), "-E", "4", "-k", "1",
                 "--granularity", "2"]) == 0
    assert "upcycled 2 of 2 FFNs into 8 experts (top-2)" in capsys.readouterr().out
    up = load_surgery(tmp_path / "up")
    assert len(moekit.moe_layers(up)) == 2
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert (up(ids).logits - dense(ids).logits).abs().max().item() < 1e-5


def test_merge(tmp_path):
    base = llama().eval()
    base.save_pretrained(tmp_path / "base")
    paths = []
    for s in (1, 2):
        b = copy.deepcopy(base)
        with torch.no_grad():
            for p in b.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(s)) * 0.02)
        b.save_pretrained(tmp_path / f"b{s}")
        paths.append(str(tmp_path / f"b{s}"))
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "mix"), "--experts", *paths, "-k", "2"]) == 0
    mix = load_surgery(tmp_path / "mix")
    moe = moekit.moe_layers(mix)[0]
    b1 = tf.AutoModelForCausalLM.from_pretrained(paths[0])
    assert torch.equal(moe.experts.down_proj[0], b1.model.layers[0].mlp.down_proj.weight)


def test_errors(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["convert", str(tmp_path / "x"), str(tmp_path / "o")]) == 2
    assert "safetensors" in capsys.readouterr().err
