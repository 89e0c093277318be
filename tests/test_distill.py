"""MoE → dense distillation (Switch Transformer §5; METHODS.md T9): the loss, the student, the loop."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.models.transformer import TransformerConfig, TransformerLM, dense_twin
from moekit.recipes import dense_student_from_moe, distill, distillation_loss, expert_usage, teacher_kl, upcycle


def _logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# ---------------------------------------------------------------------------------------------
# The loss.

@pytest.mark.parametrize("shape", [(2, 7, 11), (1, 1, 3), (97, 5)])
def test_alpha_zero_is_plain_cross_entropy(shape):
    s, t = _logits(*shape), _logits(*shape, seed=1)
    y = torch.randint(0, shape[-1], shape[:-1])
    got = distillation_loss(s, t, y, alpha=0.0, temperature=3.0)
    want = F.cross_entropy(s.reshape(-1, shape[-1]), y.reshape(-1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # The teacher plays no part: any teacher, or none, gives the same value.
    assert torch.equal(got, distillation_loss(s, None, y, alpha=0.0))


def test_alpha_one_soft_gradient_vanishes_at_the_teacher():
    t = _logits(3, 5, 13)
    y = torch.randint(0, 13, (3, 5))
    for T in (0.5, 1.0, 4.0):
        s = t.clone().requires_grad_(True)
        distillation_loss(s, t, y, alpha=1.0, temperature=T).backward()
        assert s.grad.abs().max() < 1e-7
    # ... and does not vanish elsewhere (the test would be empty if the term were constant).
    s = (t + _logits(3, 5, 13, scale=1.0, seed=2)).requires_grad_(True)
    distillation_loss(s, t, y, alpha=1.0).backward()
    assert s.grad.abs().max() > 1e-3


def test_teacher_logits_are_constants():
    s = _logits(4, 6).requires_grad_(True)
    t = _logits(4, 6, seed=1).requires_grad_(True)
    distillation_loss(s, t, torch.randint(0, 6, (4,)), alpha=0.5).backward()
    assert t.grad is None and s.grad is not None


def test_temperature_against_hand_computation():
    # One position, V = 3: soft = τ² · H(softmax(t/τ), softmax(s/τ)), hard = -log softmax(s)[y].
    s, t, y, T, a = [2.0, -1.0, 0.5], [0.0, 1.0, 3.0], 2, 2.0, 0.25

    def softmax(v):
        m = max(v)
        e = [math.exp(x - m) for x in v]
        return [x / sum(e) for x in e]

    p = softmax([x / T for x in t])
    q = softmax([x / T for x in s])
    soft = T * T * -sum(pi * math.log(qi) for pi, qi in zip(p, q))
    hard = -math.log(softmax(s)[y])
    want = (1 - a) * hard + a * soft
    got = distillation_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), alpha=a, temperature=T)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # τ = 1, any α: the cross-entropy against the mixed target (1 - α)·onehot(y) + α·p_T (Switch).
    target = (1 - a) * F.one_hot(torch.tensor([y]), 3) + a * torch.softmax(torch.tensor([t]), -1)
    mixed = -(target * torch.log_softmax(torch.tensor([s]), -1)).sum()
    torch.testing.assert_close(distillation_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), alpha=a),
                               mixed)


def test_ignore_index_masks_both_terms():
    s, t = _logits(2, 9, 7).requires_grad_(True), _logits(2, 9, 7, seed=1)
    y = torch.randint(0, 7, (2, 9))
    y[0, 3:] = -1
    y[1, 0] = -1
    keep = y != -1
    got = distillation_loss(s, t, y, alpha=0.4, temperature=2.0, ignore_index=-1)
    want = distillation_loss(s[keep], t[keep], y[keep], alpha=0.4, temperature=2.0, ignore_index=-1)
    torch.testing.assert_close(got, want)
    got.backward()
    assert s.grad[~keep].abs().max() == 0 and s.grad[keep].abs().max() > 0
    # Every position ignored: a zero-weight batch, not NaN.
    all_out = distillation_loss(s, t, torch.full((2, 9), -100), alpha=0.4)
    assert all_out.item() == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(teacher_logits=torch.zeros(2, 5, 8)), r"shape \(2, 5, 7\), got \(2, 5, 8\)"),
    (dict(labels=torch.zeros(2, 6, dtype=torch.long)), r"shape \(2, 5\) .* got \(2, 6\)"),
    (dict(labels=torch.zeros(2, 5)), r"integer class ids, got torch.float32"),
    (dict(alpha=-0.1), r"alpha .* \[0, 1\], got -0.1"),
    (dict(alpha=1.5), r"alpha .* \[0, 1\], got 1.5"),
    (dict(temperature=0.0), r"temperature must be .* > 0, got 0.0"),
    (dict(temperature=-2), r"temperature must be .* > 0, got -2"),
    (dict(teacher_logits=None), r"None only with alpha=0, got alpha=0.25"),
])
def test_bad_inputs_name_expected_and_actual(kwargs, match):
    args = dict(student_logits=torch.zeros(2, 5, 7), teacher_logits=torch.zeros(2, 5, 7),
                labels=torch.zeros(2, 5, dtype=torch.long))
    args.update(kwargs)
    s, t, y = args.pop("student_logits"), args.pop("teacher_logits"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        distillation_loss(s, t, y, **args)


# ---------------------------------------------------------------------------------------------
# The student.

V = 19
CONFIGS = {
    # top-2 of 4 experts every other layer after a dense one; dense FFNs as wide as 2 experts.
    "topk2_dense_layers": dict(vocab_size=V, d_model=32, n_layers=3, n_heads=2, max_seq_len=16,
                               moe_layers="every_other", num_experts=4, top_k=2, expert_hidden=24, ffn_hidden=48),
    # Switch top-1 with a shared expert in every layer, untied head, MLP experts.
    "switch_shared_mlp": dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, ffn="mlp",
                              num_experts=3, top_k=1, router="switch", expert_hidden=20, num_shared_experts=1,
                              shared_hidden=12, tie_embeddings=False),
}


def _teacher(name):
    torch.manual_seed(1)
    return TransformerLM(TransformerConfig.from_dict(CONFIGS[name]))


def _is_expert(name: str, teacher) -> bool:
    moe_names = [n for n, m in teacher.named_modules() if isinstance(m, moekit.MoE)]
    return any(name.startswith(n + ".") for n in moe_names)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("ffn_init", ["random", "mean"])
def test_student_is_dense_and_copies_every_non_expert_weight(name, ffn_init):
    teacher = _teacher(name)
    student = dense_student_from_moe(teacher, ffn_init=ffn_init)
    assert moekit.moe_layers(student) == [] and moekit.moe_layers(teacher)
    assert student.config == dense_twin(teacher.config)
    s_params = dict(student.named_parameters())
    copied = 0
    for n, p in teacher.named_parameters():
        if _is_expert(n, teacher):
            continue
        assert torch.equal(s_params[n], p), n
        assert s_params[n].data_ptr() != p.data_ptr(), f"{n} is shared, not copied"
        copied += 1
    assert copied >= 2 + 4 * teacher.config.n_layers        # embeddings, head/norm, attention, norms …
    for b_t, b_s in zip(teacher.blocks, student.blocks):     # shared experts: always-on, copied in every mode
        sh = getattr(b_t.ffn, "shared_experts", None)
        if sh is not None:
            Fs = sh.ffn.down_proj.weight.shape[1]
            assert torch.equal(b_s.ffn.down_proj.weight[:, -Fs:], sh.ffn.down_proj.weight)
            assert torch.equal(b_s.ffn.up_proj.weight[-Fs:], sh.ffn.up_proj.weight)
    # Same sizes of everything a token uses: the active parameter count of the twin.
    n_active = moekit.models.param_counts(teacher)["active"]
    n_router = sum(p.numel() for n, p in teacher.named_parameters() if ".router." in n)
    assert sum(p.numel() for p in student.parameters()) == n_active - n_router


def test_shared_experts_and_top_experts_are_copied_into_the_dense_ffn():
    teacher = _teacher("switch_shared_mlp")
    usage = {"blocks.0.ffn": torch.tensor([5, 9, 1]), "blocks.1.ffn": torch.tensor([7, 0, 2])}
    student = dense_student_from_moe(teacher, ffn_init="top", usage=usage)
    for i, busiest in ((0, 1), (1, 0)):
        moe, ffn = teacher.blocks[i].ffn, student.blocks[i].ffn
        KF = moe.top_k * moe.experts.d_hidden
        assert torch.equal(ffn.up_proj.weight[:KF], moe.experts.up_proj[busiest])
        assert torch.equal(ffn.down_proj.weight[:, :KF], moe.experts.down_proj[busiest])      # K = 1: scale 1
        assert torch.equal(ffn.up_proj.weight[KF:], moe.shared_experts.ffn.up_proj.weight)
        assert torch.equal(ffn.down_proj.weight[:, KF:], moe.shared_experts.ffn.down_proj.weight)
    # usage counted by moekit.recipes.expert_usage has the names dense_student_from_moe reads.
    counted = expert_usage(teacher, [torch.randint(0, V, (2, 8))])
    assert moekit.moe_layers(dense_student_from_moe(teacher, ffn_init="top", usage=counted)) == []


@pytest.mark.parametrize("ffn", ["swiglu", "mlp"])
def test_one_expert_plus_shared_becomes_the_same_function(ffn):
    # E = K = 1 with a renormalised gate: the MoE is expert 0 + the shared expert, exactly what
    # the student's FFN holds (routed units first, shared last) — checks the weight layout.
    torch.manual_seed(0)
    teacher = TransformerLM(TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                                              ffn=ffn, moe=moekit.MoEConfig(num_experts=1, top_k=1, router="topk",
                                                                            d_hidden=24, num_shared_experts=2,
                                                                            shared_d_hidden=8))).eval()
    student = dense_student_from_moe(teacher, ffn_init="mean")
    x = torch.randint(0, V, (3, 16))
    torch.testing.assert_close(student(x)[0], teacher(x)[0], rtol=1e-5, atol=1e-6)


def test_mean_init_inverts_sparse_upcycling():
    # Dense seed → upcycle (every expert a copy) → student with ffn_init="mean": the seed's function.
    torch.manual_seed(0)
    seed = TransformerLM(TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                                           moe_layers="none", ffn_hidden=40))
    moe = upcycle(copy.deepcopy(seed), num_experts=4, top_k=2)        # renormalised top-2: exact
    student = dense_student_from_moe(moe, ffn_init="mean").eval()
    x = torch.randint(0, V, (2, 16))
    torch.testing.assert_close(student(x)[0], seed.eval()(x)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student(x)[0], moe.eval()(x)[0], rtol=1e-5, atol=1e-5)


def test_student_init_is_seeded_and_leaves_the_global_rng_alone():
    teacher = _teacher("topk2_dense_layers")
    before = torch.random.get_rng_state()
    a, b = dense_student_from_moe(teacher, seed=3), dense_student_from_moe(teacher, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = dense_student_from_moe(teacher, seed=4)
    assert not torch.equal(a.blocks[1].ffn.down_proj.weight, c.blocks[1].ffn.down_proj.weight)


def test_student_bad_inputs():
    teacher = _teacher("topk2_dense_layers")
    with pytest.raises(ValueError, match=r"ffn_init must be one of .* got 'median'"):
        dense_student_from_moe(teacher, ffn_init="median")
    with pytest.raises(ValueError, match=r"needs usage"):
        dense_student_from_moe(teacher, ffn_init="top")
    with pytest.raises(ValueError, match=r"no counts for MoE layer\(s\) \['blocks.1.ffn'\]"):
        dense_student_from_moe(teacher, ffn_init="top", usage={"blocks.0.ffn": torch.ones(4)})
    with pytest.raises(ValueError, match=r"must have shape \(4,\), got \(3,\)"):
        dense_student_from_moe(teacher, ffn_init="top", usage={"blocks.1.ffn": torch.ones(3)})
    with pytest.raises(ValueError, match=r"no MoE layer"):
        dense_student_from_moe(dense_student_from_moe(teacher))
    with pytest.raises(ValueError, match=r"dense layers have hidden sizes \{0: 40, 2: 40\}"):
        dense_student_from_moe(TransformerLM(TransformerConfig.from_dict({**CONFIGS["topk2_dense_layers"],
                                                                          "ffn_hidden": 40})))
    with pytest.raises(TypeError, match=r"TransformerLM, got MoE"):
        dense_student_from_moe(moekit.MoE(d_model=8, num_experts=2))


# ---------------------------------------------------------------------------------------------
# The loop.

def _markov_batches(n, *, B=8, S=16, seed=0):
    """Tokens from a fixed random first-order Markov chain: learnable, unlike uniform noise."""
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(99)) * 2.5, -1)
    out = []
    for _ in range(n):
        x = torch.empty(B, S + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (B,), generator=g)
        for s in range(S):
            x[:, s + 1] = torch.multinomial(P[x[:, s]], 1, generator=g)[:, 0]
        out.append((x[:, :-1], x[:, 1:]))
    return out


def test_distillation_lowers_the_kl_to_the_teacher():
    teacher = _teacher("topk2_dense_layers")
    distill(None, teacher, _markov_batches(40, seed=1), steps=40, lr=1e-2, alpha=0.0, warmup_steps=5)
    student = dense_student_from_moe(teacher)
    val = _markov_batches(4, seed=2)
    before = teacher_kl(teacher, student, val)
    teacher_mode = teacher.training
    losses = distill(teacher, student, _markov_batches(40, seed=3), steps=40, lr=1e-2, alpha=0.25,
                     temperature=2.0, warmup_steps=5)
    after = teacher_kl(teacher, student, val)
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert after < 0.5 * before, (before, after)
    assert teacher.training == teacher_mode and not any(p.grad is not None for p in teacher.parameters())


def test_distill_with_alpha_zero_is_the_trainer_step_for_step(tmp_path):
    # distill() copies moekit.train.Trainer's update (recipes may not import train); pin them together.
    from moekit.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig
    from moekit.train.data import Corpus
    from moekit.train.tokenizer import CharTokenizer
    from moekit.train.trainer import Trainer

    tok = CharTokenizer("abcdefghijklmnopq")
    gen = torch.Generator().manual_seed(0)
    corpus = Corpus(torch.randint(0, tok.vocab_size, (3000,), generator=gen), torch.zeros(3000, dtype=torch.long),
                    ["doc"])
    model = {k: v for k, v in CONFIGS["topk2_dense_layers"].items() if k not in ("vocab_size", "max_seq_len")}
    run = RunConfig(model=model, data=DataConfig(seq_len=16, batch_size=4),
                    optim=OptimConfig(lr=5e-3, warmup_steps=3), variants={"moe": {}},
                    train=TrainConfig(steps=8, device="cpu", eval_every=8, eval_batches=1, ckpt_every=8, seed=5))
    trainer = Trainer(run, "moe", tmp_path, data=(tok, corpus, corpus), progress=False)
    batches = trainer.sampler.__class__(corpus, seq_len=16, batch_size=4, seed=0)
    batches.load_state_dict(trainer.sampler.state_dict())
    torch.manual_seed(run.train.seed)
    mine = TransformerLM(trainer.model_config)
    assert all(torch.equal(p, q) for p, q in zip(mine.parameters(), trainer.model.parameters()))
    trainer.fit()
    distill(None, mine, batches.next_batch, steps=run.train.steps, alpha=0.0, **dataclasses.asdict(run.optim))
    for (n, p), q in zip(mine.named_parameters(), trainer.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)      # bit-equal on CPU today


def test_distill_bad_inputs():
    student = dense_student_from_moe(_teacher("topk2_dense_layers"))
    batches = _markov_batches(1)
    with pytest.raises(ValueError, match=r"teacher=None is only plain training .* alpha=0.25"):
        distill(None, student, batches, steps=1)
    with pytest.raises(ValueError, match=r"steps must be a positive int, got 0"):
        distill(None, student, batches, steps=0, alpha=0.0)
    with pytest.raises(ValueError, match=r"temperature must be .* > 0, got 0"):
        distill(_teacher("topk2_dense_layers"), student, batches, steps=1, temperature=0)
    with pytest.raises(ValueError, match=r"batches ran out"):
        distill(None, student, batches, steps=2, alpha=0.0)


def test_review_fixes_refuse_bad_ignore_index_and_optimizer_settings():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    with pytest.raises(TypeError, match=r"ignore_index must be an int, got None \(NoneType\)"):
        distillation_loss(s, t, y, ignore_index=None)
    student = TransformerLM(TransformerConfig(vocab_size=5, d_model=8, n_layers=1, n_heads=2, max_seq_len=8,
                                              moe_layers="none", ffn_hidden=8))
    batches = [(y, y)]
    with pytest.raises(ValueError, match="grad_clip must be a finite number >= 0, got -1"):
        distill(None, student, batches, steps=1, alpha=0.0, grad_clip=-1)
    with pytest.raises(ValueError, match=r"beta2 must be a finite number in \[0, 1\), got 1.0"):
        distill(None, student, batches, steps=1, alpha=0.0, beta2=1.0)
