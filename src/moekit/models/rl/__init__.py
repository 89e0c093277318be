"""Reinforcement-learning agents with Mixture-of-Experts networks (METHODS.md §10, RL1–RL5).

Value-based (RL1, `moekit.models.rl.dqn`): `QNetwork` — a DQN whose penultimate layer is dense,
Soft MoE or top-k MoE over PerConv tokens (Obando-Ceron et al., ICML 2024) — and `train_dqn`.

Continuous control (RL2, `moekit.models.rl.pmoe`): `MixtureGaussianPolicy` — PMOE's Gaussian
mixture policy (Ren et al. 2021) — trained by `train_sac` (SAC with PMOE's winner-expert and
frequency gate losses, or plain SAC).

Multi-task (RL3–RL5, `moekit.models.rl.multitask`): `OrthogonalExperts` (MOORE: Gram–Schmidt
over the experts' representations, task-weighted), `ContextMixtureEncoders` (CARE: attention
over encoders from an embedding of the task's description, `hashed_bag_of_words`) and
`hard_task_moe` (each task → its own expert); `MultiTaskObsEncoder` puts the shared network,
MOORE or CARE in front of the SAC actor and critics (``encoder=``) for observations that end
with the task's one-hot (MetaWorld MT10); the PPO torsos ``"moore"``, ``"care"``,
``"hard_task_moe"`` and ``"task_moe"`` (learned task-level routing).

Actor-critic (below): PPO agents with MoE torsos.

Legend: T rollout steps, B parallel environments, N = T·B samples (valid ones only after
`flatten_valid`), O observation features, A actions, L tasks, D torso width, F expert hidden
dim, E experts, K experts per sample, M tokens per sample (Soft MoE).

The algorithm is PPO with the clipped surrogate objective (Schulman, Wolski, Dhariwal, Radford
& Klimov 2017, arXiv:1707.06347) and generalised advantage estimation (GAE; Schulman, Moritz,
Levine, Jordan & Abbeel, ICLR 2016), with the usual implementation choices listed by Huang et
al. (2022, "The 37 Implementation Details of PPO"): per-batch advantage normalisation, an
entropy bonus, global gradient clipping, no value clipping. Actor and critic share one torso,
as in the Atari PPO agents of Willi et al. (2024, "Mixture of Experts in a Mixture of RL
settings"), where MoE layers replace the dense ones; Obando-Ceron et al. (ICML 2024, "Mixtures
of Experts Unlock Parameter Scaling for Deep RL") use Soft MoE there. Torsos:

- ``"dense"``: ``x + FFN(LN(x))`` residual blocks; the FFN is a one-expert `MLPExperts` bank,
  the very module an expert is, so the dense twin differs from the MoE only by routing.
- ``"moe"``: the FFN is `moekit.MoE` (top-k router, one token per sample); its balancing loss
  is added to the PPO loss.
- ``"soft_moe"``: `moekit.layers.SoftMoE` over M tokens obtained by splitting the D-vector into
  M chunks of D/M (a per-feature-group tokenisation; a sample's tokens never mix with other
  samples, so each state's action distribution depends on that state alone).

`actor_critic_dense_twin` gives the dense torso whose FFN has the MoE's *active* parameters
and FLOPs per sample (K·F hidden units; for Soft MoE the E·P slot evaluations of D/M-wide
experts, i.e. E·P·F/M hidden units).

Environments follow the gymnasium ≥ 1.0 vector API with its default *next-step* autoreset:
after ``terminated | truncated`` the returned observation is the final one, and the next
``step`` resets that environment (ignoring its action) and returns reward 0. So the value of
the stored next row is the truncation bootstrap, and reset rows are marked invalid and left
out of the loss. `CartPoleVecEnv` (Barto, Sutton & Anderson 1983, gymnasium's constants) and
`ReachVecEnv` are pure-numpy environments with that API for tests; `make_gym_vec_env` builds
gymnasium's (optional extra ``moekit[rl]``).
"""
from moekit.models.rl.dqn import (
                                  Q_HEADS,
                                  DQNConfig,
                                  OffPolicyCollector,
                                  QNetwork,
                                  QNetworkConfig,
                                  ReplayBuffer,
                                  dqn_targets,
                                  linear_epsilon,
                                  perconv_tokens,
                                  train_dqn,
)
from moekit.models.rl.envs import CartPoleVecEnv, MultiTaskVecEnv, ReachVecEnv, make_gym_vec_env
from moekit.models.rl.metrics import late_return, plot_return_curves, return_curve, summarize_runs
from moekit.models.rl.multitask import (
                                        OBS_ENCODERS,
                                        ContextMixtureEncoders,
                                        MultiTaskObsEncoder,
                                        OrthogonalExperts,
                                        gram_schmidt,
                                        gram_schmidt_reference,
                                        hard_task_moe,
                                        hashed_bag_of_words,
)
from moekit.models.rl.network import TORSOS, ActorCritic, ActorCriticConfig, actor_critic_dense_twin
from moekit.models.rl.pmoe import (
                                  MixtureGaussianPolicy,
                                  SACConfig,
                                  TwinQ,
                                  mixture_log_prob,
                                  sac_update,
                                  train_sac,
)
from moekit.models.rl.ppo import (
                                  PPOConfig,
                                  RLTrainResult,
                                  Rollout,
                                  RolloutCollector,
                                  check_next_step_autoreset,
                                  clipped_policy_loss,
                                  expert_usage,
                                  gae_advantages,
                                  ppo_update,
                                  train_ppo,
)

__all__ = ["TORSOS", "ActorCriticConfig", "ActorCritic", "actor_critic_dense_twin", "gae_advantages",
           "clipped_policy_loss", "Rollout", "RolloutCollector", "PPOConfig", "ppo_update", "RLTrainResult",
           "train_ppo", "expert_usage", "CartPoleVecEnv", "ReachVecEnv", "MultiTaskVecEnv", "make_gym_vec_env",
           "check_next_step_autoreset", "Q_HEADS", "QNetworkConfig", "QNetwork", "perconv_tokens", "ReplayBuffer",
           "OffPolicyCollector",
           "dqn_targets", "DQNConfig", "linear_epsilon", "train_dqn", "MixtureGaussianPolicy", "TwinQ",
           "mixture_log_prob", "SACConfig", "sac_update", "train_sac", "return_curve", "late_return",
           "summarize_runs", "plot_return_curves",
           "gram_schmidt", "gram_schmidt_reference", "OrthogonalExperts", "hashed_bag_of_words",
           "ContextMixtureEncoders", "MultiTaskObsEncoder", "OBS_ENCODERS", "hard_task_moe"]
