"""projects/balance_study: the variants, the training MaxVio reader and the study loop on tiny inputs."""
import json
from pathlib import Path

import numpy as np
import pytest

from moekit.train.config import config_from_dict, variant_model_config
from projects.balance_study.run import EXTRAS, markdown, study, study_config, train_max_vio, variants

DATA = Path(__file__).parents[2] / "data" / "shakespeare"


def test_the_full_study_is_r8():
    run = study_config()
    assert run.variant_names == ["switch_a0", "switch_a0.001", "switch_a0.01", "switch_a0.1", "bias", *EXTRAS]
    for v in run.variant_names:
        c = variant_model_config(run, v, vocab_size=run.data.vocab_size)
        assert c.moe.num_experts == 16 and c.moe.top_k == 2 and c.n_layers == 4 and c.moe_layers == "every"
    alphas = [variant_model_config(run, f"switch_a{a:g}", vocab_size=50).moe.aux_loss_coef
              for a in (0, 1e-3, 1e-2, 1e-1)]
    assert alphas == [0.0, 1e-3, 1e-2, 1e-1]
    bias = variant_model_config(run, "bias", vocab_size=50).moe
    assert bias.router == "sigmoid" and bias.aux_loss_coef == 0.0
    assert dict(bias.router_kwargs) == {"bias_update_rate": 1e-3}
    glob = variant_model_config(run, "global_a0.01", vocab_size=50).moe
    assert glob.balance_scope == "global_batch" and run.train.grad_accum == 2
    assert variant_model_config(run, "device4_a0.01", vocab_size=50).moe.balance_devices == 4
    assert run.data.source == "domains" and run.train.log_every == 1


def test_train_max_vio_reads_every_step(tmp_path):
    recs = [{"kind": "routing", "step": s, "layers": [0, 1], "tokens_per_expert": [[10, 10], [20, 0]]}
            for s in range(1, 5)]
    recs[0]["tokens_per_expert"] = [[20, 0], [10, 10]]
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    out = train_max_vio(p)
    assert out["steps"] == [3, 4] and out["batch"] == [0.0, 1.0] and out["global"] == [0.0, 1.0]
    assert out["curve"] == [0.5, 0.5, 0.5, 0.5]
    assert train_max_vio(p, from_fraction=0.0)["batch"] == [0.25, 0.75]


def test_study_trains_measures_and_tabulates(tmp_path):
    d = {"name": "t", "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 16,
                                "router": "topk", "top_k": 2},
         "data": {"source": "files", "paths": [str(DATA)], "seq_len": 16, "batch_size": 4, "val_fraction": 0.25},
         "optim": {"warmup_steps": 1},
         "train": {"steps": 3, "grad_accum": 2, "eval_every": 3, "eval_batches": 2, "log_every": 1, "ckpt_every": 3},
         "variants": variants((0.0, 0.1), num_experts=4)}
    run = config_from_dict(d)
    out = study(run, tmp_path / "s", [0], extra_seeds=[], log=open("/dev/null", "w"))
    v, t = out["variants"], out["table"]
    assert [r["seed"] for r in v["switch_a0"]] == [0] and v["gshard_a0.01"] == []
    r = v["bias"][0]
    assert len(r["val_max_vio"]["global"]) == 2 and len(r["train_max_vio"]["curve"]) == 3
    assert all(x >= 0 for x in r["val_max_vio"]["batch"] + r["train_max_vio"]["batch"])
    assert r["val_max_vio"]["global"][0] <= r["val_max_vio"]["batch"][0] + 1e-12
    assert set(t) == {"switch_a0", "switch_a0.1", "bias"} and np.isfinite(t["bias"]["val_loss"][0])
    md = markdown(t)
    assert md.count("| bias |") == 2 and "MaxVio global" in md
    assert json.loads((tmp_path / "s" / "results.json").read_text())["extra_seeds"] == []
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no routing records"):
        train_max_vio(tmp_path / "empty.jsonl")
