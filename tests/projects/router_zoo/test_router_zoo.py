"""projects/router_zoo: the zoo covers the registry, its variants are FLOP-matched, the study loop."""
import json
from pathlib import Path

import pytest

import moekit
from moekit.train.config import apply_overrides, config_from_dict, get_preset, variant_model_config
from projects.router_zoo.run import markdown, plot, study, study_config, summarise
from projects.router_zoo.zoo import DESCRIPTIONS, EXCLUDED, PART, F, part_names

DATA = Path(__file__).parents[2] / "data" / "shakespeare"


def _router_of(run, name):
    cfg = variant_model_config(run, name, vocab_size=64)
    return None if not cfg.moe_layer_ids else cfg.moe.router


def test_every_registered_router_is_in_the_zoo_or_excluded_with_a_reason():
    run = get_preset("routers")
    assert list(DESCRIPTIONS) == run.variant_names
    used = {_router_of(run, n) for n in run.variant_names} - {None}
    assert used | set(EXCLUDED) >= set(moekit.available_routers())
    # "dense" is excluded as a router (the zoo's dense model is the FLOP-matched twin)
    assert not used & (set(EXCLUDED) - {"multihash"}) and all(len(why) > 20 for why in EXCLUDED.values())
    assert part_names(1) + part_names(2) == run.variant_names and set(PART.values()) == {1, 2}


def test_the_non_causal_router_is_refused_by_the_lm():
    run = get_preset("routers")
    with pytest.raises(ValueError, match="causal_safe=False"):
        variant_model_config(apply_overrides(run, ["variants.topk2.router=expert_choice", "variants.topk2.top_k=none"]),
                             "topk2", vocab_size=64)


def test_fixed_count_variants_run_the_dense_twins_ffn_width():
    run = get_preset("routers")
    for name in run.variant_names:
        cfg = variant_model_config(run, name, vocab_size=64)
        if not cfg.moe_layer_ids:
            assert cfg.dense_hidden == F
            continue
        k = cfg.moe.top_k if cfg.moe.top_k is not None else 2      # own-count routers: nominal K = 2
        assert k * cfg.expert_d_hidden + cfg.moe.num_shared_experts * cfg.shared_d_hidden == F, name


def test_summarise_gives_mean_and_sample_sd():
    rows = {"a": [{"seed": s, "val_loss": v, "params_total": 10, "params_active": 5, "flops_per_token_forward": 2e6,
                   "flops_per_token_train": 6e6, "experts_eval": e, "experts_train": e, "train_time_s": 1.0}
                  for s, v, e in [(0, 1.0, 1.0), (1, 2.0, 2.0), (2, 3.0, 3.0)]]}
    t = summarise(rows)["a"]
    assert t["val_loss"] == pytest.approx((2.0, 1.0)) and t["experts_eval"] == pytest.approx(2.0)
    assert "| a | 3 | 2.0000 ± 1.0000 | 2.000 | 2.00 (2.00) |" in markdown(summarise(rows))


def test_study_trains_every_part_and_tabulates(tmp_path):
    base = study_config(quick=True).to_dict()
    base["data"] = {"source": "files", "paths": [str(DATA)], "seq_len": 16, "batch_size": 4, "val_fraction": 0.25}
    base["train"].update({"steps": 2, "eval_every": 2, "eval_batches": 1, "ckpt_every": 2, "threads": 1})
    base["model"].update({"d_model": 16, "expert_hidden": 16})
    names = ["dense", "switch", "top_p0.4", "hash"]
    base["variants"] = {n: v for n, v in base["variants"].items() if n in names}
    run = config_from_dict(base)
    log = open("/dev/null", "w")
    first = study(run, tmp_path / "z", [0], parts=[1], log=log)
    assert set(first["variants"]) == {"dense", "switch"}
    out = study(run, tmp_path / "z", [0, 1], parts=[1, 2], log=log)
    t = out["table"]
    assert set(t) == set(names) and all(t[n]["seeds"] == [0, 1] for n in names)
    assert t["dense"]["experts_eval"] is None
    assert t["switch"]["experts_eval"] == 1.0 and t["hash"]["experts_eval"] == 1.0
    assert t["top_p0.4"]["experts_eval"] >= 1.0 and t["switch"]["val_loss"][1] >= 0
    # the seed-0 part-1 models were kept, not retrained
    assert out["variants"]["switch"][0]["val_loss"] == first["variants"]["switch"][0]["val_loss"]
    assert json.loads((tmp_path / "z" / "results.json").read_text())["table"]["hash"]["seeds"] == [0, 1]
    assert markdown(t).count("\n") == len(names) + 1
    plot(t, tmp_path / "zoo.png")
    assert (tmp_path / "zoo.png").stat().st_size > 1000
