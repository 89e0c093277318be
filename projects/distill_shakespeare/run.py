"""Distil a sparse MoE language model into a dense one on Shakespeare (Switch Transformer §5).

    python -m projects.distill_shakespeare.run [--quick] [--seeds 0 1] [--ablations]

About 11 minutes on 2 shared CPU cores for one seed (three models of 300 steps; 18 with
``--ablations``); ``--quick`` takes well under a minute (the "tiny" preset, 60 steps).

1. Teacher and dense baseline: the `moekit train` main job — the "default" preset's MoE
   (8 experts of hidden 176, top-2, every layer) and its dense twin (FFN hidden 352: the same
   active work per token), each trained by `moekit.train.Trainer` for ``--steps`` steps on the
   Shakespeare corpus (characters; plays split whole between training and validation).
2. Student: `moekit.recipes.dense_student_from_moe(teacher)` — the dense twin holding the
   teacher's embeddings, attention, norms and head, its FFNs freshly initialised (Switch) —
   trained by `moekit.recipes.distill` on ``0.75 · CE(labels) + 0.25 · CE(teacher probs)``
   for the same steps, on the baseline's batches with the baseline's optimizer and schedule.
3. Validation nats/char of all three, the KL from the teacher, and the fraction of the MoE's
   gain over the baseline that the student keeps, ``(L_dense − L_student) / (L_dense − L_MoE)``
   (Switch: about 30 %).

The student's non-expert weights were already trained with the teacher, so it has seen more
updates than the baseline. ``--ablations`` separates the two ingredients with two more dense
models on the same batches: the student's initialisation trained on hard labels only
(α = 0, the control for the soft targets), and the baseline's fresh initialisation trained
with the distillation loss (soft targets without the teacher's weights).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.recipes import dense_student_from_moe, distill, expert_usage, teacher_kl
from moekit.train.config import apply_overrides, get_preset
from moekit.train.data import build_corpus, eval_batches
from moekit.train.trainer import Trainer


@torch.no_grad()
def nats_per_char(model, batches) -> float:
    """Mean validation cross-entropy per character (the tokens are characters)."""
    model.eval()
    dev = next(model.parameters()).device
    total, n = 0.0, 0
    for x, y, _ in batches:
        logits = model(x.to(dev))[0].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), y.to(dev).flatten(), reduction="sum"))
        n += y.numel()
    model.train()
    return total / n


def train_student(label, teacher, student, batches, run, alpha, temperature, quiet):
    steps = run.train.steps
    every = max(1, steps // 8)

    def report(step, loss):
        if not quiet and (step % every == 0 or step == steps):
            print(f"  [{label}] step {step}/{steps}: loss {loss:.4f}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if run.train.grad_accum != 1:      # distill() takes one micro-batch per step, like the Trainer at 1
        raise SystemExit(f"this example needs train.grad_accum = 1, got {run.train.grad_accum}")
    distill(teacher if alpha > 0 else None, student, copy.deepcopy(batches).next_batch, steps=steps,
            alpha=alpha, temperature=temperature, callback=report, **dataclasses.asdict(run.optim))
    return time.perf_counter() - t0


def one_seed(seed, args, data, val, out: Path) -> dict:
    run = apply_overrides(get_preset(args.preset), [f"train.steps={args.steps}", f"train.seed={seed}",
                                                    "variants=moe,dense"])
    progress = not args.quiet
    rows = {}

    t = Trainer(run, "moe", out / "moe", data=data, progress=progress)
    res = t.fit()
    teacher = t.model.eval()
    rows["MoE teacher"] = dict(model=teacher, train_s=res["train_time_s"])

    t = Trainer(run, "dense", out / "dense", data=data, progress=progress)
    batches = copy.deepcopy(t.sampler)            # the baseline's batch stream, replayed for each student
    dense_init = copy.deepcopy(t.model)           # the baseline's initialisation
    res = t.fit()
    rows["dense baseline (hard labels)"] = dict(model=t.model, train_s=res["train_time_s"])

    usage = None
    if args.ffn_init == "top":
        probe = copy.deepcopy(batches)
        usage = expert_usage(teacher, [probe.next_batch()[0] for _ in range(8)])
    student = dense_student_from_moe(teacher, ffn_init=args.ffn_init, usage=usage, seed=seed)
    label = f"distilled (teacher init, α={args.alpha:g}, τ={args.temperature:g})"
    secs = train_student("distilled", teacher, student, batches, run, args.alpha, args.temperature, args.quiet)
    rows[label] = dict(model=student, train_s=secs)

    if args.ablations:
        # Control: the student's initialisation on hard labels only, isolating the soft targets.
        s = dense_student_from_moe(teacher, ffn_init=args.ffn_init, usage=usage, seed=seed)
        secs = train_student("init only", teacher, s, batches, run, 0.0, args.temperature, args.quiet)
        rows["control: teacher init, hard labels only (α=0)"] = dict(model=s, train_s=secs)
        secs = train_student("KD only", teacher, dense_init, batches, run, args.alpha, args.temperature, args.quiet)
        rows[f"ablation: fresh init + distillation (α={args.alpha:g})"] = dict(model=dense_init, train_s=secs)

    out_rows = {}
    for name, r in rows.items():
        m = r["model"]
        out_rows[name] = {"val_nats_per_char": nats_per_char(m, val),
                          "kl_from_teacher": None if m is teacher else teacher_kl(teacher, m, val),
                          "params": sum(p.numel() for p in m.parameters()), "train_s": r["train_s"]}
    names = list(out_rows)
    L_moe, L_dense, L_student = (out_rows[n]["val_nats_per_char"] for n in names[:3])
    gain = L_dense - L_moe
    kept = (L_dense - L_student) / gain if gain > 0 else float("nan")
    result = {"seed": seed, "steps": run.train.steps, "rows": out_rows, "moe_gain": gain, "fraction_kept": kept}
    if args.ablations:
        result["soft_target_effect"] = L_student - out_rows[names[3]]["val_nats_per_char"]
        result["fresh_init_kd_vs_baseline"] = out_rows[names[4]]["val_nats_per_char"] - L_dense
    return result


def print_table(result, file=sys.stdout):
    print(f"\nseed {result['seed']}, {result['steps']} steps each:", file=file)
    print("| model | parameters | val nats/char | KL(teacher ‖ model) nats/char | train s |", file=file)
    print("|---|---|---|---|---|", file=file)
    for name, r in result["rows"].items():
        kl = "—" if r["kl_from_teacher"] is None else f"{r['kl_from_teacher']:.4f}"
        print(f"| {name} | {r['params'] / 1e6:.3f} M | {r['val_nats_per_char']:.4f} | {kl} | {r['train_s']:.0f} |",
              file=file)
    print(f"MoE gain over the dense baseline: {result['moe_gain']:.4f} nats/char; the distilled student keeps "
          f"{100 * result['fraction_kept']:.0f} % of it (Switch Transformer: ≈ 30 %)", file=file)
    if "soft_target_effect" not in result:
        print("(the student's non-expert weights were trained with the teacher: --ablations separates that "
              "head start from the soft targets)", file=file)
        return
    d, f = result["soft_target_effect"], result["fresh_init_kd_vs_baseline"]
    print(f"soft targets, same initialisation: {d:+.4f} nats/char against hard labels only; "
          f"from a fresh initialisation: {f:+.4f} against the baseline (negative: distillation helps)", file=file)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 'tiny' preset for 60 steps (a smoke run, < 1 min)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of every model (default 300)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--alpha", type=float, default=0.25, help="teacher-probability weight (Switch: 0.25)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ffn-init", default="random", choices=["random", "mean", "top"],
                    help="the student's FFNs where the teacher has MoE layers (see dense_student_from_moe)")
    ap.add_argument("--ablations", action="store_true",
                    help="also train the two single-ingredient students (teacher init only; soft targets only)")
    ap.add_argument("--eval-batches", type=int, default=40, help="validation batches of 32 × 128 characters")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a small, shared CPU: no spinning; 0: torch's choice)")
    ap.add_argument("--out", default=None, help="run folder (default: runs/distill-<time>)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    args.preset = "default"
    if args.quick:
        args.preset, args.steps, args.eval_batches = "tiny", 60, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/distill-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    run = get_preset(args.preset)
    data = build_corpus(run.data)
    tok, train, val_corpus = data
    val = eval_batches(val_corpus, seq_len=run.data.seq_len, batch_size=run.data.batch_size,
                       max_batches=args.eval_batches)
    print(f"Shakespeare: {len(train):,} / {len(val_corpus):,} training / validation characters, vocabulary "
          f"{tok.vocab_size}; evaluating on {sum(y.numel() for _, y, _ in val):,} validation characters")
    results = []
    for seed in args.seeds:
        results.append(one_seed(seed, args, data, val, out / f"seed{seed}"))
        print_table(results[-1])
    if len(results) > 1:
        kept = [r["fraction_kept"] for r in results]
        print(f"\nfraction of the MoE gain kept, per seed: {', '.join(f'{100 * k:.0f} %' for k in kept)}; "
              f"mean {100 * sum(kept) / len(kept):.0f} %")
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.0f} s; results in {out / 'distill.json'}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill.json").write_text(json.dumps({"args": vars(args), "results": results, "wall_s": wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
