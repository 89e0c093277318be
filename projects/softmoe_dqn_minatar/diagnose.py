"""Why the Soft MoE head does not learn MinAtar Breakout here: token and routing statistics.

    python -m projects.softmoe_dqn_minatar.diagnose [--steps 20000] [--seed 0] [--quick]

1. Tokens: on frames of a uniformly random policy, the share of the 64 PerConv tokens that are
   the background token (the conv output of an all-zero 3×3 patch), i.e. carry no object.
2. Routing of a `softmoe_4` Q-network at initialisation and after `--steps` of DQN (seed
   `--seed`): the entropy of each slot's dispatch weights over the 64 tokens as a share of
   ln 64 (1 = the slot is the plain mean of the tokens), the dispatch mass that falls on object
   tokens (against their share of the tokens), and how much of the tokens' spread survives the
   layer — the variance across the tokens of a frame of the Soft MoE outputs over that of a
   token-wise MLP of the same experts (top-1 MoE's path), averaged over frames.
3. Learning-rate sensitivity: `softmoe_4` trained at lr 1e-4, 3e-4 (the table's), 1e-3; and
   sharper routing: the slot parameters Φ multiplied by 10 at initialisation (lr 3e-4), which
   scales the dispatch / combine logits by 10.
Each training is one thread; the printed table goes to the README.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import numpy as np
import torch

from moekit.models.rl import DQNConfig, late_return, make_gym_vec_env, perconv_tokens, train_dqn
from projects.softmoe_dqn_minatar.run import METHODS


def random_frames(game: str, n: int, seed: int) -> torch.Tensor:
    envs = make_gym_vec_env(f"MinAtar/{game}-v1", 4, vectorization_mode="sync")
    obs, _ = envs.reset(seed=seed)
    rng, frames = np.random.default_rng(seed), []
    while len(frames) * 4 < n:
        obs, *_ = envs.step(rng.integers(0, envs.single_action_space.n, 4))
        frames.append(np.asarray(obs))
    envs.close()
    return torch.from_numpy(np.concatenate(frames)[:n])


@torch.no_grad()
def routing_stats(qnet, frames: torch.Tensor) -> dict:
    """Dispatch entropy share, dispatch mass on object tokens, share of object tokens, and the
    across-token variance of the Soft MoE outputs relative to the token-wise expert outputs."""
    x = frames.float().permute(0, 3, 1, 2)
    tok_BMC = perconv_tokens(torch.relu(qnet.conv(x)).permute(0, 2, 3, 1))
    background_C = torch.relu(qnet.conv.bias)                        # an all-zero patch
    obj_BM = (tok_BMC - background_C).abs().amax(-1) > 1e-6
    layer = qnet.penultimate
    dispatch_BMS, _ = layer.dispatch_combine(tok_BMC)
    M = tok_BMC.shape[1]
    ent_BS = -(dispatch_BMS.clamp_min(1e-30).log() * dispatch_BMS).sum(1)
    mass_BS = (dispatch_BMS * obj_BM[..., None]).sum(1)
    out_BMC = layer(tok_BMC)
    B, _, C = tok_BMC.shape
    # the same experts applied token by token: expert 0 on every token (what a token-wise path sees)
    rows = tok_BMC.reshape(-1, C)
    tokwise = layer.experts(rows, torch.tensor([rows.shape[0]] + [0] * (layer.num_experts - 1)))
    spread = out_BMC.var(1).sum(-1) / tokwise.reshape(B, M, C).var(1).sum(-1).clamp_min(1e-12)
    return dict(entropy_share=float(ent_BS.mean() / math.log(M)), object_mass=float(mass_BS.mean()),
                object_share=float(obj_BM.float().mean()), spread=float(spread.median()))


def train(method: str, seed: int, steps: int, lr: float, game: str, phi_scale: float = 1.0):
    torch.manual_seed(seed)
    envs = make_gym_vec_env(f"MinAtar/{game}-v1", 4, vectorization_mode="sync")
    qnet = METHODS[method].build(obs_shape=envs.single_observation_space.shape,
                                 num_actions=int(envs.single_action_space.n))
    with torch.no_grad():
        qnet.penultimate.phi_DS.mul_(phi_scale)
    init = {k: v.clone() for k, v in qnet.state_dict().items()}
    res = train_dqn(qnet, envs, total_steps=steps, config=replace(DQNConfig(), lr=lr), seed=seed)
    envs.close()
    return qnet, init, res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--game", default="Breakout")
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["1e-4:1", "3e-4:1", "1e-3:1", "3e-4:10"],
                    help="lr:phi_scale pairs of the softmoe_4 trainings")
    ap.add_argument("--quick", action="store_true", help="1,000 steps, lr 3e-4 with Φ ×1 and ×10 (a smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.variants = 1000, ["3e-4:1", "3e-4:10"]
    frames = random_frames(args.game, 512, args.seed)
    out = {"runs": {}}
    for v in args.variants:
        lr, phi_scale = (float(x) for x in v.split(":"))
        t0 = time.perf_counter()
        qnet, init, res = train("softmoe_4", args.seed, args.steps, lr, args.game, phi_scale)
        final = late_return(res.episodes, args.steps, 0.1)
        trained = routing_stats(qnet, frames)
        qnet.load_state_dict(init)
        out["runs"][v] = dict(lr=lr, phi_scale=phi_scale, final=final, wall=time.perf_counter() - t0,
                              init=routing_stats(qnet, frames), trained=trained)
        print(f"softmoe_4 lr {lr:g}, Φ ×{phi_scale:g}: last-10% return {final:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    s = next(iter(out["runs"].values()))["init"]
    print(f"\n{args.game}, seed {args.seed}, {args.steps} steps; {len(frames)} random-policy frames: object tokens "
          f"{100 * s['object_share']:.1f} % of the 64\n")
    print("| softmoe_4 | lr | Φ scale | last-10 % return | dispatch entropy / ln 64 | dispatch mass on object tokens | "
          "output spread / token-wise | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["runs"].values():
        for name, st, final in (("init", r["init"], math.nan), ("trained", r["trained"], r["final"])):
            print(f"| {name} | {r['lr']:g} | ×{r['phi_scale']:g} | {final:.2f} | {st['entropy_share']:.3f} | "
                  f"{100 * st['object_mass']:.1f} % | {st['spread']:.2e} | {r['wall']:.0f} |")
    return out


if __name__ == "__main__":
    main()
