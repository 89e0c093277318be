"""The conditional-computation study (projects/conditional_compute): FLOP counts of per-token LM
exits and ViT exits tied to the library's, the threshold extremes, and the run end to end on a
tiny synthetic corpus."""
import json

import pytest
import torch

from moekit.models.transformer import TransformerConfig, TransformerLM, flops_per_token
from moekit.models.vision import ViTConfig
from moekit.train.data import Corpus, eval_batches
from moekit.train.tokenizer import build_tokenizer
from projects.conditional_compute import run as cc_run
from projects.conditional_compute.lm import ExitLM, exit_flops, exit_sweep
from projects.conditional_compute.vit import build_exit_vit, vit_costs, vit_sweep

CFG = TransformerConfig(vocab_size=30, d_model=32, n_layers=3, n_heads=2, max_seq_len=16, moe_layers="none")


def test_exit_flops_at_full_depth_are_the_dense_models_plus_the_extra_heads():
    S = 16
    dense = flops_per_token(TransformerLM(CFG), S)["forward"]
    last = torch.full((50,), CFG.n_layers - 1)
    head = 2 * CFG.vocab_size * CFG.d_model
    assert exit_flops(CFG, S, last) == dense + (CFG.n_layers - 1) * head
    first = exit_flops(CFG, S, torch.zeros(50, dtype=torch.long))
    mixed = exit_flops(CFG, S, torch.tensor([0, 2]))
    assert first < mixed < exit_flops(CFG, S, last)
    assert mixed == (first + exit_flops(CFG, S, last)) / 2


def test_lm_exit_sweep_extremes_and_last_exit_is_the_plain_lm():
    torch.manual_seed(0)
    model = ExitLM(CFG).eval()
    x = torch.randint(0, 30, (2, 16))
    y = torch.randint(0, 30, (2, 16))
    zs = model.forward_exits(x)
    torch.testing.assert_close(zs[-1], model.lm(x)[0])
    lo, hi = exit_sweep(model, [(x, y, None)], 16, (0.0, 1.01))
    assert lo["mean_blocks"] == 1 and lo["exit_share"][0] == 1
    assert hi["mean_blocks"] == 3 and hi["exit_share"][-1] == 1
    torch.testing.assert_close(torch.tensor(hi["val_loss"]), model.lm(x, y)[1], atol=1e-5, rtol=1e-5)
    first = torch.nn.functional.cross_entropy(zs[0].flatten(0, 1), y.reshape(-1))
    torch.testing.assert_close(torch.tensor(lo["val_loss"]), first, atol=1e-5, rtol=1e-5)


def test_vit_exit_sweep_counts_the_blocks_run():
    torch.manual_seed(1)
    cfg = ViTConfig(image_size=8, patch_size=4, d_model=16, n_heads=2, n_layers=3, num_classes=4, moe_every=0)
    model = build_exit_vit(cfg)
    for h in model.heads:               # non-zero heads, so confidences differ between images
        torch.nn.init.normal_(h.head.weight, std=3.0)
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 4, (40,))
    block, head = vit_costs(cfg)
    lo, mid, hi = vit_sweep(model, x, y, (0.0, 0.5, 1.01), config=cfg, batch_size=16)
    assert lo["mean_blocks"] == 1 and abs(lo["flops_forward"] - (block + head)) < 1e-6
    assert hi["mean_blocks"] == 3 and abs(hi["flops_forward"] - 3 * (block + head)) < 1e-6
    assert lo["flops_forward"] <= mid["flops_forward"] <= hi["flops_forward"]
    assert abs(sum(mid["exit_share"]) - 1) < 1e-9
    # The exits' stack is the ViT: at threshold > 1 the answer is the last head's on the full stack.
    model.eval()
    torch.testing.assert_close(model(x, threshold=1.01), model.forward_all(x)[-1])


def test_run_end_to_end_on_a_tiny_corpus(tmp_path):
    text = "".join(chr(97 + (i * 7 + i // 5) % 26) for i in range(6000))
    docs = {f"d{i}": text[i * 1000:(i + 1) * 1000] for i in range(6)}
    tok = build_tokenizer("char", docs.values())
    train = Corpus.from_docs(docs, ["d0", "d1", "d2", "d3"], tok)
    val = Corpus.from_docs(docs, ["d4", "d5"], tok)
    assert len(eval_batches(val, seq_len=32, batch_size=4, max_batches=1)) == 1
    both = cc_run.main(["--quick", "--threads", "1", "--seeds", "0", "1", "--out", str(tmp_path)],
                       lm_inputs=(tok.vocab_size, train, val), lm_shape={"d_model": 32, "n_heads": 2, "n_layers": 2})
    res = both[0]["lm"]
    assert set(res) == {"dense", "mod_c50", "mod_c12.5", "moe_top1", "moe_top2", "moe_top_p0.4", "early_exit"}
    # isoFLOP: the MoD models buy more steps with the dense model's training FLOPs.
    assert res["mod_c12.5"]["steps"] > res["mod_c50"]["steps"] > res["dense"]["steps"]
    for name in ("mod_c50", "mod_c12.5"):
        r = res[name]
        assert abs(r["train_flops_total"] - res["dense"]["train_flops_total"]) < 0.2 * res["dense"]["train_flops_total"]
    assert res["moe_top2"]["experts_per_token_last_batch"] == 2.0
    assert 1.0 <= res["moe_top_p0.4"]["experts_per_token_last_batch"] <= 8.0
    assert res["moe_top1"]["flops_forward"] < res["moe_top2"]["flops_forward"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"]["0"]["lm"]["dense"]["steps"] == 4
    assert (tmp_path / "compute.png").stat().st_size > 0
    # mean and sample sd over the two seeds, number by number
    mean, sd = saved["summary"]["mean"]["lm"], saved["summary"]["sd"]["lm"]
    a, b = res["dense"]["val_loss"], both[1]["lm"]["dense"]["val_loss"]
    assert a != b and mean["dense"]["val_loss"] == pytest.approx((a + b) / 2)
    assert sd["dense"]["val_loss"] == pytest.approx(abs(a - b) / 2 ** 0.5)
    assert mean["early_exit"]["sweep"][0]["threshold"] == 0.0 and sd["dense"]["steps"] == 0.0
    # --from-results redraws the summary without training
    (tmp_path / "compute.png").unlink()
    again = cc_run.main(["--from-results", str(tmp_path / "results.json"), "--out", str(tmp_path)])
    assert again["1"]["lm"]["dense"]["val_loss"] == b and (tmp_path / "compute.png").stat().st_size > 0
    assert "± " in cc_run.table(saved["summary"]["mean"], saved["summary"]["sd"])
