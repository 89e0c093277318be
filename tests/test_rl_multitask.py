"""METHODS.md RL3 (MOORE), RL4 (CARE), RL5 (hard task routing): the invariants of
`moekit.models.rl.multitask` and the multi-task torsos of the PPO agent."""
import zlib

import pytest
import torch

from moekit.layers import MoEConfig
from moekit.models.rl import (
    ActorCriticConfig,
    ContextMixtureEncoders,
    MultiTaskObsEncoder,
    MultiTaskVecEnv,
    OrthogonalExperts,
    PPOConfig,
    ReachVecEnv,
    actor_critic_dense_twin,
    gram_schmidt,
    gram_schmidt_reference,
    hard_task_moe,
    hashed_bag_of_words,
    train_ppo,
)

SHAPES = [(1, 1, 3), (5, 3, 3), (97, 4, 100), (2, 7, 16)]          # (B, E, D), awkward sizes on purpose


@pytest.mark.parametrize("B,E,D", SHAPES)
def test_gram_schmidt_gives_orthonormal_rows_for_every_sample(B, E, D):
    torch.manual_seed(0)
    u_BED = gram_schmidt(torch.randn(B, E, D))
    gram_BEE = u_BED @ u_BED.transpose(1, 2)
    assert torch.allclose(gram_BEE, torch.eye(E).expand(B, E, E), atol=1e-5)


@pytest.mark.parametrize("B,E,D", SHAPES)
def test_batched_gram_schmidt_equals_the_per_sample_loop_outputs_and_grads(B, E, D):
    torch.manual_seed(1)
    v = torch.randn(B, E, D, dtype=torch.float64, requires_grad=True)
    v_ref = v.detach().clone().requires_grad_(True)
    g = torch.randn(B, E, D, dtype=torch.float64)
    out, ref = gram_schmidt(v), gram_schmidt_reference(v_ref)
    assert torch.allclose(out, ref, atol=1e-12)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.allclose(v.grad, v_ref.grad, atol=1e-10)


@pytest.mark.parametrize("B,E,D", SHAPES)
def test_gram_schmidt_equals_sign_fixed_qr(B, E, D):
    torch.manual_seed(2)
    v_BED = torch.randn(B, E, D, dtype=torch.float64)
    q_BDE, r_BEE = torch.linalg.qr(v_BED.transpose(1, 2))           # v_ED^T = Q R, R upper triangular
    sign_BE = torch.sign(torch.diagonal(r_BEE, dim1=1, dim2=2))
    expected = (q_BDE * sign_BE[:, None, :]).transpose(1, 2)        # the GS basis has R's diagonal > 0
    assert torch.allclose(gram_schmidt(v_BED), expected, atol=1e-10)


def test_gradients_flow_through_gram_schmidt():
    torch.manual_seed(3)
    v = torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gram_schmidt, (v,))


def test_gram_schmidt_refuses_more_vectors_than_dimensions():
    with pytest.raises(ValueError, match="E=4"):
        gram_schmidt(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="dimensions"):
        gram_schmidt(torch.randn(4, 3))


def test_moore_basis_is_orthonormal_for_every_state_and_experts_get_gradients():
    torch.manual_seed(4)
    layer = OrthogonalExperts(d_model=16, num_experts=4, num_tasks=3, d_hidden=8)
    h_BD, task_B = torch.randn(33, 16), torch.randint(0, 3, (33,))
    u_BED = layer.basis(h_BD)
    assert torch.allclose(u_BED @ u_BED.transpose(1, 2), torch.eye(4).expand(33, 4, 4), atol=1e-5)
    layer(h_BD, task_B).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_moore_with_one_expert_is_a_normalised_single_encoder():
    torch.manual_seed(5)
    layer = OrthogonalExperts(d_model=6, num_experts=1, num_tasks=2, d_hidden=5)
    h_BD, task_B = torch.randn(9, 6), torch.tensor([0, 1] * 4 + [1])
    f_BD = layer.experts[0](h_BD)                                    # the single encoder alone
    expected = torch.tanh(layer.task_weight[task_B, 0:1] * f_BD / f_BD.norm(dim=-1, keepdim=True))
    assert torch.allclose(layer(h_BD, task_B), expected, atol=1e-6)


def test_moore_mixes_with_the_task_weights():
    torch.manual_seed(6)
    layer = OrthogonalExperts(d_model=8, num_experts=3, num_tasks=2, d_hidden=4)
    h_BD = torch.randn(4, 8)
    u_BED = layer.basis(h_BD)
    for t in range(2):
        expected = torch.tanh(torch.einsum("e,bed->bd", layer.task_weight[t], u_BED))
        assert torch.allclose(layer(h_BD, torch.full((4,), t)), expected, atol=1e-6)


def test_hashed_bag_of_words_is_fixed_unit_norm_and_ignores_case_and_order():
    emb = hashed_bag_of_words(["Open the red door", "door red the OPEN", "reach the green goal", ""], dim=32)
    assert emb.shape == (4, 32)
    assert torch.equal(emb[0], emb[1])
    assert torch.allclose(emb[:3].norm(dim=-1), torch.ones(3)) and torch.equal(emb[3], torch.zeros(32))
    assert not torch.allclose(emb[0], emb[2])
    assert torch.equal(emb, hashed_bag_of_words(["open the red door", "door red the open",
                                                 "reach the green goal", ""], dim=32))
    # The bucket and sign come from CRC-32, fixed across processes (Python's str hash is salted).
    h = zlib.crc32(b"door")
    expected = torch.zeros(1, 8)
    expected[0, h % 8] = 1.0 if (h >> 31) & 1 else -1.0
    assert torch.equal(hashed_bag_of_words(["door"], dim=8), expected)
    with pytest.raises(TypeError, match="texts"):
        hashed_bag_of_words("one string", dim=8)


def _care(metadata):
    torch.manual_seed(7)
    return ContextMixtureEncoders(d_model=12, num_experts=4, d_hidden=6,
                                  metadata_LW=hashed_bag_of_words(metadata, dim=16))


def test_care_weights_sum_to_one_and_depend_on_the_metadata_alone():
    care = _care(["pick up the key and open the door", "cross the lava gap", "cross the lava gap"])
    task_B = torch.tensor([0, 1, 2, 0, 1, 2])
    alpha_BE = care.mixture_weights(task_B)
    assert torch.allclose(alpha_BE.sum(-1), torch.ones(6)) and (alpha_BE >= 0).all()
    assert torch.equal(alpha_BE[1], alpha_BE[2])                    # same description ⇒ same weights
    assert torch.equal(alpha_BE[0], alpha_BE[3])                    # the state does not enter
    assert not torch.allclose(alpha_BE[0], alpha_BE[1])
    # Unchanged metadata ⇒ unchanged weights, whatever the other tasks' descriptions are.
    other = _care(["pick up the key and open the door", "go to the green goal", "avoid the red ball"])
    assert torch.equal(other.mixture_weights(torch.tensor([0])), alpha_BE[:1])


def test_care_output_is_the_weighted_encoder_mixture_joined_with_the_context():
    care = _care(["a b", "c d"])
    h_BD, task_B = torch.randn(5, 12), torch.tensor([0, 1, 1, 0, 1])
    z_BD = care.context_embedding(task_B)
    alpha_BE = care.mixture_weights(task_B)
    mix_BD = sum(alpha_BE[:, e:e + 1] * care.experts[e](h_BD) for e in range(4))
    expected = torch.tanh(care.out(torch.cat([mix_BD, z_BD], dim=-1)))
    assert torch.allclose(care(h_BD, task_B), expected, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_hard_task_routing_sends_each_task_to_its_own_expert(train):
    torch.manual_seed(8)
    moe = hard_task_moe(MoEConfig(num_experts=4, d_hidden=8, expert="mlp"), d_model=6, num_tasks=3)
    moe.train(train)
    x_BD, task_B = torch.randn(10, 6), torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1, 0])
    y_BD = moe(x_BD, token_ids=task_B)
    r = moe.last_routing
    order = torch.argsort(r.token_ids)
    assert torch.equal(r.expert_ids[order], task_B) and torch.equal(r.weights, torch.ones_like(r.weights))
    for t in range(3):
        rows = task_B == t
        assert torch.allclose(y_BD[rows], moe.experts[t](x_BD[rows]), atol=1e-6)
    assert torch.equal(moe(x_BD, token_ids=task_B), y_BD)             # deterministic
    with pytest.raises(ValueError, match="num_experts >= num_tasks=3"):
        hard_task_moe(MoEConfig(num_experts=2), d_model=6, num_tasks=3)


def test_learned_task_routing_gives_every_sample_of_a_task_the_same_experts():
    torch.manual_seed(9)
    cfg = ActorCriticConfig(torso="task_moe", d_model=16, num_layers=1, d_hidden=8,
                            moe=MoEConfig(num_experts=4, top_k=2))
    agent = cfg.build(obs_dim=3, num_actions=2, num_tasks=3)
    obs_BO, task_B = torch.randn(12, 3), torch.arange(12) % 3
    agent(obs_BO, task_B)
    r = agent.blocks[0].ffn.last_routing
    for t in range(3):
        sets = {tuple(sorted(r.expert_ids[r.token_ids == i].tolist())) for i in range(12) if task_B[i] == t}
        assert len(sets) == 1


MULTITASK_TORSOS = ["task_moe", "hard_task_moe", "moore", "care"]
META = ["reach the goal on the left", "reach the goal on the right"]


@pytest.mark.parametrize("torso", MULTITASK_TORSOS)
def test_multitask_torsos_train_with_ppo(torso):
    cfg = ActorCriticConfig(torso=torso, d_model=16, num_layers=1, d_hidden=8, moe=MoEConfig(num_experts=2, top_k=1))
    agent = cfg.build(obs_dim=2, num_actions=3, num_tasks=2, task_metadata=META)
    before = [p.detach().clone() for p in agent.parameters()]
    envs = MultiTaskVecEnv([ReachVecEnv(2), ReachVecEnv(2)])
    res = train_ppo(agent, envs, total_steps=200, config=PPOConfig(num_steps=16), seed=0)
    assert res.env_steps >= 200 and res.episodes and {t for _, t, _ in res.episodes} == {0, 1}
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.parameters()))


def test_multitask_torsos_check_their_arguments():
    with pytest.raises(ValueError, match="task_metadata"):
        ActorCriticConfig(torso="care").build(obs_dim=2, num_actions=3, num_tasks=2)
    with pytest.raises(ValueError, match="task_metadata"):
        ActorCriticConfig(torso="care").build(obs_dim=2, num_actions=3, num_tasks=2, task_metadata=["one"])
    with pytest.raises(ValueError, match="num_experts <= d_model=4"):
        ActorCriticConfig(torso="moore", d_model=4, moe=MoEConfig(num_experts=5))
    with pytest.raises(ValueError, match="num_layers"):
        ActorCriticConfig(torso="moe", num_layers=0)
    with pytest.raises(ValueError, match="dense_twin"):
        actor_critic_dense_twin(ActorCriticConfig(torso="moore"))
    agent = ActorCriticConfig(torso="moore", num_layers=0, d_model=8, moe=MoEConfig(num_experts=3)).build(
        obs_dim=2, num_actions=3, num_tasks=2)
    assert len(agent.blocks) == 0 and agent.task_embed is None
    assert agent(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))[0].shape == (4, 3)


# -- observations that end with the task's one-hot (MetaWorld MT10) --------------------------------
def _one_hot_obs(B=6, S=5, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    task_B = torch.randint(0, L, (B,), generator=g)
    return torch.cat([torch.randn(B, S, generator=g), torch.nn.functional.one_hot(task_B, L).float()], 1), task_B


@pytest.mark.parametrize("kind", ["shared", "moore", "care"])
def test_obs_encoder_splits_the_one_hot_and_applies_its_mixture(kind):
    torch.manual_seed(0)
    enc = MultiTaskObsEncoder(kind, obs_dim=8, num_tasks=3, d_model=6, num_experts=2, d_hidden=5,
                              task_metadata=["reach the goal", "push the puck", "open the door"], metadata_dim=8)
    obs_BO, task_B = _one_hot_obs()
    state_BS, t_B = enc.split(obs_BO)
    assert torch.equal(t_B, task_B) and torch.equal(state_BS, obs_BO[:, :5])
    h_BD = enc.embed(obs_BO[:, :5])
    if kind == "shared":                                # by hand: embed + task row, ReLU, MLP, tanh
        m = enc.mixture
        x = torch.relu(h_BD + enc.task_embed.weight[task_B])
        ref = torch.tanh(m[3](torch.relu(m[1](x))))
    else:
        ref = enc.mixture(h_BD, task_B)
        assert isinstance(enc.mixture, OrthogonalExperts if kind == "moore" else ContextMixtureEncoders)
    out = enc(obs_BO)
    assert out.shape == (6, enc.out_dim) and torch.allclose(out, ref, atol=1e-6)
    same_state = obs_BO.clone()
    same_state[:, :5] = obs_BO[0, :5]                   # equal states, different tasks → different outputs
    rows = enc(same_state)
    assert not torch.allclose(rows[task_B == task_B[0]][0], rows[task_B != task_B[0]][0])


def test_obs_encoder_checks_its_arguments():
    with pytest.raises(ValueError, match="kind"):
        MultiTaskObsEncoder("lstm", obs_dim=8, num_tasks=3)
    with pytest.raises(ValueError, match="obs_dim"):
        MultiTaskObsEncoder("shared", obs_dim=3, num_tasks=3)
    with pytest.raises(ValueError, match="task_metadata"):
        MultiTaskObsEncoder("care", obs_dim=8, num_tasks=3, task_metadata=["one"])
    enc = MultiTaskObsEncoder("moore", obs_dim=8, num_tasks=3, d_model=4, num_experts=2)
    with pytest.raises(ValueError, match=r"obs must have shape \(B, 8\)"):
        enc(torch.randn(2, 7))
