"""Kill-and-resume under `torchrun --max-restarts`: a rank dies mid-step, torchrun restarts the
group, which resumes from the last distributed checkpoint; the final weights equal those of an
uninterrupted run. Slow (three torchrun group starts), so marked ``slow``.

This file is also the training script torchrun runs (``python -m torch.distributed.run ...
tests/test_parallel_resume.py CKPT_DIR KILL_AT OUT``).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 5


def main(ckpt_dir: str, kill_at: int, out: str) -> None:
    import moekit
    from moekit import parallel

    sys.path.insert(0, os.path.dirname(__file__))
    from test_parallel import TwoLayer, _full_state

    rank, world, device = parallel.init_from_env(timeout_s=60)
    torch.manual_seed(0)
    model = TwoLayer(num_experts=4, top_k=2, d_hidden=12, router="sigmoid", num_shared_experts=1)
    parallel.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    state = {"model": model, "optimizer": opt, "step": 0}
    if parallel.latest_checkpoint(ckpt_dir) is not None:
        parallel.load_checkpoint(state, ckpt_dir)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for step in range(state["step"], STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)     # this rank's batch of this step
        x = torch.randn(2, 3, 8, generator=g)
        loss = model(x).square().mean() + moekit.aux_loss(model)
        loss.backward()
        if step == kill_at and rank == 1 and attempt == 0:
            os._exit(17)                                           # dies mid-step, before saving it
        opt.step()
        opt.zero_grad()
        moekit.update_router_biases(model)
        parallel.save_checkpoint({"model": model, "optimizer": opt, "step": step + 1},
                                 os.path.join(ckpt_dir, f"step_{step + 1:04d}"))
    full = _full_state(model, opt)
    if rank == 0:
        torch.save({"state": full, "attempt": attempt}, out)
    torch.distributed.destroy_process_group()


def _torchrun(tmp, name, kill_at):
    ck, out = str(tmp / f"{name}_ck"), str(tmp / f"{name}.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", __file__, ck, str(kill_at), out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False), ck


def test_killed_rank_restarts_and_resumes_without_losing_a_step(tmp_path):
    ref, _ = _torchrun(tmp_path, "ref", kill_at=-1)
    got, ck = _torchrun(tmp_path, "killed", kill_at=3)
    assert ref["attempt"] == 0 and got["attempt"] == 1, "the kill did not trigger a restart"
    assert sorted(os.listdir(ck)) == [f"step_{s:04d}" for s in range(1, STEPS + 1)]
    assert ref["state"].keys() == got["state"].keys()
    for k in ref["state"]:
        assert torch.equal(ref["state"][k], got["state"][k]), k


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
