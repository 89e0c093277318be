"""Hugging Face ecosystem: a converted model trains with `transformers.Trainer` unchanged
(transformers' own balancing loss, computed from moekit's routing, gives the original model's
loss), takes PEFT LoRA adapters on its attention and on its stacked experts (equal to the
same adapters on the original model), and what it saves loads in plain transformers.

Tiny random models built by transformers itself (see test_hf.py); no downloads."""
import copy

import pytest
import torch

tf = pytest.importorskip("transformers")

from test_hf import V, make_model  # noqa: E402

import moekit  # noqa: E402
import moekit.hf  # noqa: E402
from moekit.recipes.hf_convert import converted_layers  # noqa: E402

AUX_COEF = 0.5        # large, so a balancing loss computed wrongly (or not at all) shows in the total


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (2, 13), generator=g)


def with_router_loss(model):
    """`model` set up as a user does for balancing in transformers: output_router_logits and a coefficient."""
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = AUX_COEF
    model.router_aux_loss_coef = AUX_COEF          # the *ForCausalLM reads the config once, at init
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# 1. The loss transformers computes, and Trainer.

@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_router_aux_loss_equals_transformers(family, ids):
    """loss = CE + router_aux_loss_coef · load_balancing_loss_func(router logits): transformers'
    formula, fed by the moekit routers, gives the original model's loss and gradients."""
    ref = with_router_loss(make_model(family)).train()
    model = moekit.hf.from_pretrained(copy.deepcopy(ref))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0                                 # padding: transformers masks it out of the balancing loss
    a = ref(ids, attention_mask=mask, labels=ids)
    b = model(ids, attention_mask=mask, labels=ids)
    assert len(b.router_logits) == len(converted_layers(model)) == len(a.router_logits)
    assert abs(a.aux_loss.item() - b.aux_loss.item()) < 1e-6
    assert abs(a.loss.item() - b.loss.item()) < 1e-6
    # The balancing term is really in the loss (the comparison above is not CE against CE).
    ce = model(ids, attention_mask=mask, labels=ids, output_router_logits=False).loss
    assert abs((b.loss - ce).item() - AUX_COEF * b.aux_loss.item()) < 1e-5 and b.aux_loss.item() > 0.5
    a.loss.backward()
    b.loss.backward()
    for name, moe in converted_layers(model):
        g_ref = ref.get_submodule(name).gate.weight.grad
        assert moe.router.weight.grad.abs().sum() > 0
        assert max_diff(moe.router.weight.grad, g_ref) < 1e-6
        assert max_diff(moe.experts.gate_up_proj.grad, ref.get_submodule(name).experts.gate_up_proj.grad) < 1e-6


def _batches():
    g = torch.Generator().manual_seed(4)
    seqs = torch.randint(0, V, (4, 16), generator=g)        # a few sequences to memorise
    return seqs, [{"input_ids": seqs[i % 4], "labels": seqs[i % 4]} for i in range(16)]


def _train(model, tmp_path, *, steps=12, lr=5e-3, callbacks=()):
    pytest.importorskip("accelerate")                        # transformers.Trainer needs it
    _, data = _batches()
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                                learning_rate=lr, report_to=[], use_cpu=True, save_strategy="no",
                                logging_steps=1, seed=0, disable_tqdm=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def router_grads_callback():
    """A Trainer callback noting the moekit routers' gradient norms just before each optimizer step.

    Built at call time: importing transformers' trainer imports triton, which must not happen
    while tests are collected (test_triton_kernels imports it first, in interpreter mode)."""

    class RouterGrads(tf.TrainerCallback):
        def __init__(self):
            self.norms = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.norms.append([m.router.weight.grad.norm().item() for _, m in converted_layers(model)])

    return RouterGrads()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_trainer_unchanged_same_run_as_transformers(family, ids, tmp_path):
    """Trainer on the converted model runs step for step as Trainer on the original model
    (losses and final weights), the loss goes down, the routers get gradients, and what the
    converted model saves — by Trainer itself and by moekit.hf — loads in plain transformers."""
    ref = with_router_loss(make_model(family)).train()
    model = moekit.hf.from_pretrained(copy.deepcopy(ref))
    seqs, _ = _batches()
    router_before = {n: m.router.weight.detach().clone() for n, m in converted_layers(model)}
    grads = router_grads_callback()
    _, ref_losses = _train(ref, tmp_path / "ref")
    trainer, losses = _train(model, tmp_path / "moekit", callbacks=[grads])

    assert len(losses) == len(ref_losses) == 12
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-4
    assert losses[-1] < losses[0] - 0.5
    assert len(grads.norms) == 12 and all(g > 0 for step in grads.norms for g in step)
    for name, moe in converted_layers(model):
        assert max_diff(moe.router.weight, router_before[name]) > 1e-3
    ref_params = dict(ref.named_parameters())
    for name, p in model.state_dict().items():    # the converted model's state dict uses transformers' names
        assert max_diff(p, ref_params[name] if name in ref_params else ref.state_dict()[name]) < 1e-4, name

    model.eval()
    with torch.no_grad():
        out = model(seqs).logits
    trainer.save_model(str(tmp_path / "trainer_out"))
    moekit.hf.save_pretrained(model, tmp_path / "moekit_out")
    for folder in ("trainer_out", "moekit_out"):
        plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        assert type(plain) is type(ref)
        with torch.no_grad():
            assert max_diff(plain(seqs).logits, out) < 1e-5, folder


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_state_dict_uses_transformers_names(family, ids):
    """A converted model and its original have the same state-dict keys and load each other's."""
    ref = make_model(family)
    model = moekit.hf.from_pretrained(copy.deepcopy(ref))
    sd = model.state_dict()
    assert set(sd) == set(ref.state_dict())
    with torch.no_grad():
        out = model(ids).logits
    # A fresh original loads the converted model's state dict and gives its logits ...
    other = make_model(family)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert max_diff(other(ids).logits, out) < 1e-6
    # ... and a converted model loads the original's, as well as moekit's own key names.
    for source in (ref, model):
        fresh = moekit.hf.from_pretrained(make_model(family))
        with torch.no_grad():
            for p in fresh.parameters():
                p.add_(0.01)
        if source is ref:
            fresh.load_state_dict(ref.state_dict(), strict=True)
        else:
            own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            assert converted_layers(model)[0][0] + ".router.weight" in own
            res = fresh.load_state_dict(own, strict=False)
            transient = {f"{mn}.{b}" for mn, m in model.named_modules() for b in m._non_persistent_buffers_set}
            assert not res.missing_keys and set(res.unexpected_keys) <= transient, res
        with torch.no_grad():
            assert max_diff(fresh(ids).logits, out) < 1e-6


# ---------------------------------------------------------------------------------------------
# 2. PEFT LoRA on attention and on the stacked experts.

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = {"mixtral": ["q_proj", "v_proj"], "qwen2_moe": ["q_proj", "v_proj"], "qwen3_moe": ["q_proj", "v_proj"],
             "deepseek_v3": ["q_b_proj", "kv_b_proj"]}


def lora_config(family, **kw):
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION[family], target_parameters=EXPERT_PARAMS, **kw)


def randomise_adapters(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_lora_equals_lora_on_transformers(family, ids, tmp_path):
    """get_peft_model on the converted model: base output at init (B = 0), gradients only into the
    adapters, the same function and gradients as the same adapters on the original model, adapter
    files that load onto the original, and merge_and_unload = base + delta, saved for plain transformers."""
    peft = pytest.importorskip("peft")
    ref = make_model(family)
    model = moekit.hf.from_pretrained(copy.deepcopy(ref))
    with torch.no_grad():
        base_out = model(ids).logits
    base_experts = {n: (m.experts.gate_up_proj.detach().clone(), m.experts.down_proj.detach().clone())
                    for n, m in converted_layers(model)}
    pm = peft.get_peft_model(model, lora_config(family))
    pr = peft.get_peft_model(ref, lora_config(family))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in pr.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert sum(".mlp.experts." in n for n in trainable) == 4 * len(converted_layers(model))   # A, B × 2 params
    assert any(ATTENTION[family][0] in n for n in trainable)

    out = pm(ids, labels=ids)
    assert max_diff(out.logits, base_out) < 1e-6
    out.loss.backward()
    for n, p in pm.named_parameters():
        if n in trainable:
            assert "lora_A" in n or p.grad.abs().sum() > 0, n      # A gets no gradient while B = 0
        else:
            assert p.grad is None, n

    randomise_adapters(pr, seed=5)
    peft.set_peft_model_state_dict(pm, peft.get_peft_model_state_dict(pr))
    pm.zero_grad()
    a, b = pr(ids, labels=ids), pm(ids, labels=ids)
    assert max_diff(a.logits, b.logits) < 1e-5 and max_diff(b.logits, base_out) > 1e-2
    a.loss.backward()
    b.loss.backward()
    ref_params = dict(pr.named_parameters())
    for n in trainable:
        grad = dict(pm.named_parameters())[n].grad
        assert grad.abs().sum() > 0 and max_diff(grad, ref_params[n].grad) < 1e-6, n

    # Adapter files name the original model's modules: they load onto plain transformers.
    pm.save_pretrained(tmp_path / "adapter")
    on_plain = peft.PeftModel.from_pretrained(make_model(family), tmp_path / "adapter").eval()
    pm.eval()
    with torch.no_grad():
        lora_out = pm(ids).logits
        assert max_diff(on_plain(ids).logits, lora_out) < 1e-5

    with pytest.raises(ValueError, match="PEFT adapters"):
        moekit.hf.save_pretrained(pm, tmp_path / "unmerged")
    deltas = {}
    for n, moe in converted_layers(pm.base_model.model):
        down = moe.experts                                  # ParamWrapper(down_proj) around ParamWrapper(gate_up_proj)
        deltas[n] = (down.base_layer.get_delta_weight("default"), down.get_delta_weight("default"))
    merged = pm.merge_and_unload()
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    for n, moe in converted_layers(merged):
        assert isinstance(moe.experts, moekit.experts.GLUExperts)
        for w, w0, dw in zip((moe.experts.gate_up_proj, moe.experts.down_proj), base_experts[n], deltas[n]):
            assert dw.shape == w.shape and dw.abs().max() > 1e-3
            assert max_diff(w, w0 + dw) < 1e-6
    with torch.no_grad():
        assert max_diff(merged(ids).logits, lora_out) < 1e-5
    moekit.hf.save_pretrained(merged, tmp_path / "merged")
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert max_diff(plain(ids).logits, lora_out) < 1e-5


def test_lora_on_shared_expert_merges_and_saves(ids, tmp_path):
    """LoRA on the Qwen2-MoE shared expert (re-packed gate_up in moekit) merges into weights
    that moekit.hf.save_pretrained splits back into transformers' gate_proj / up_proj."""
    peft = pytest.importorskip("peft")
    model = moekit.hf.from_pretrained(make_model("qwen2_moe"))
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["shared_experts.ffn.gate_up_proj",
                                                             "shared_experts.ffn.down_proj"])
    pm = peft.get_peft_model(model, cfg)
    randomise_adapters(pm, seed=6)
    pm.eval()
    with torch.no_grad():
        lora_out = pm(ids).logits
    merged = pm.merge_and_unload()
    with torch.no_grad():
        assert max_diff(merged(ids).logits, lora_out) < 1e-5
    moekit.hf.save_pretrained(merged, tmp_path)
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(plain(ids).logits, lora_out) < 1e-5
        assert max_diff(plain(ids).logits, make_model("qwen2_moe")(ids).logits) > 1e-3


def test_trainer_trains_lora_adapters_only(tmp_path):
    """Trainer on a PeftModel of a converted model: the loss goes down, the adapters move, the
    base weights (routers and experts included) stay as they were."""
    peft = pytest.importorskip("peft")
    model = with_router_loss(moekit.hf.from_pretrained(make_model("mixtral")))
    pm = peft.get_peft_model(model, lora_config("mixtral"))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    _, losses = _train(pm, tmp_path, steps=16, lr=5e-2)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1
    for n, p in pm.named_parameters():
        moved = max_diff(p, before[n]) > 0
        assert moved == ("lora_B" in n or "lora_A" in n), n


def test_lora_experts_never_take_the_fused_kernel(ids, monkeypatch):
    """The fused Triton kernel reads the bank's weights itself, so it would skip an adapter. On a
    device where the kernel runs (asked here with the device check faked, the kernel not run), the
    bare bank would take it and a LoRA-wrapped bank does not: it takes the grouped path, adapter included."""
    peft = pytest.importorskip("peft")
    tb = pytest.importorskip("moekit.ops.triton_backend")
    real = tb.fused_moe_applicable
    answers = []

    def spy(x_TD, bank):
        with monkeypatch.context() as m:
            m.setattr(tb, "triton_device_supported", lambda device, dtype: True)
            answers.append(real(x_TD, bank))
        return False                                   # the CPU run goes on without the kernel

    monkeypatch.setattr(tb, "fused_moe_applicable", spy)
    ref = make_model("mixtral")
    model = moekit.hf.from_pretrained(copy.deepcopy(ref))
    with torch.no_grad():
        model(ids)
    assert answers == [True, True]
    pm = peft.get_peft_model(model, lora_config("mixtral"))
    pr = peft.get_peft_model(ref, lora_config("mixtral"))
    randomise_adapters(pr, seed=7)
    peft.set_peft_model_state_dict(pm, peft.get_peft_model_state_dict(pr))
    answers.clear()
    with torch.no_grad():
        assert max_diff(pm(ids).logits, pr(ids).logits) < 1e-5
    assert answers == [False, False]
