"""``moekit convert | upcycle | merge``: thin CLI wrappers over `moekit.hf` and `moekit.recipes`.

- ``convert SRC OUT``: load a transformers MoE checkpoint (Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V3) into moekit layers, check its logits against plain transformers on a probe
  batch, and write it back as a transformers checkpoint.
- ``upcycle SRC OUT -E 8 -k 2``: sparse-upcycle a dense transformers checkpoint, check the
  upcycled model reproduces the dense logits, save (see `moekit.recipes.io`).
- ``merge BASE OUT --experts A B …``: Branch-Train-MiX merge of branches trained from BASE.
"""
from __future__ import annotations

__all__ = ["register"]


def _probe_ids(model, seq_len: int = 16):
    import torch

    vocab = int(getattr(model.config, "vocab_size", 100))
    return torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))


def _out(model, ids):
    import torch

    with torch.no_grad():
        o = model(ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _load_dense(path: str, auto_class: str):
    from pathlib import Path

    import transformers

    if not any(Path(path).glob("*.safetensors")):
        raise ValueError(f"{path!r} holds no *.safetensors file; moekit loads safetensors only")
    return getattr(transformers, auto_class).from_pretrained(path, use_safetensors=True,
                                                             local_files_only=True).eval()


def _convert(args) -> int:
    import moekit.hf
    from moekit.recipes.hf_convert import converted_layers

    plain = _load_dense(args.src, "AutoModelForCausalLM")
    ids = _probe_ids(plain)
    ref = _out(plain, ids)
    model = moekit.hf.from_pretrained(plain, backend=args.backend).eval()
    diff = (_out(model, ids) - ref).abs().max().item()
    layers = converted_layers(model)
    print(f"converted {len(layers)} MoE blocks ({layers[0][1].hf_origin.family}); "
          f"max |logit difference| vs transformers = {diff:.3g}")
    moekit.hf.save_pretrained(model, args.out)
    print(f"wrote {args.out}")
    return 0 if diff < 1e-3 else 1


def _recipe(args, layers, num_experts, top_k, granularity):
    return dict(num_experts=num_experts, top_k=top_k, granularity=granularity, layers=layers,
                router="topk", router_kwargs=None)


def _check_upcycle_flags(args) -> None:
    """The flags as typed, before any checkpoint is read (argparse already made them numbers)."""
    from moekit.validate import check_int, check_number, check_probability

    check_int("-E/--num-experts", args.num_experts, min=1)
    check_int("-k/--top-k", args.top_k, min=1)
    if args.top_k > args.num_experts:
        raise ValueError(f"-k/--top-k must be <= -E/--num-experts={args.num_experts}, got {args.top_k}")
    check_int("--granularity", args.granularity, min=1)
    check_number("--noise", args.noise, min=0)
    check_probability("--reinit-fraction", args.reinit_fraction)
    check_int("--every", args.every, min=1)


def _upcycle(args) -> int:
    from moekit.recipes import find_dense_ffns, upcycle
    from moekit.recipes.io import save_surgery
    from moekit.recipes.upcycle import select_sites

    _check_upcycle_flags(args)
    dense = _load_dense(args.src, args.auto_class)
    ids = _probe_ids(dense)
    ref = _out(dense, ids)
    sites = find_dense_ffns(dense)
    chosen = select_sites(sites, None, args.every)
    layers = [sites.index(s) for s in chosen]
    model = upcycle(dense, args.num_experts, args.top_k, granularity=args.granularity, noise=args.noise,
                    reinit_fraction=args.reinit_fraction, every=args.every, seed=args.seed).eval()
    diff = (_out(model, ids) - ref).abs().max().item()
    print(f"upcycled {len(layers)} of {len(sites)} FFNs into {args.num_experts * args.granularity} experts "
          f"(top-{args.top_k * args.granularity}); max |output difference| vs dense = {diff:.3g}")
    save_surgery(model, args.out, _recipe(args, layers, args.num_experts, args.top_k, args.granularity),
                 auto_class=args.auto_class)
    print(f"wrote {args.out}")
    return 0


def _merge(args) -> int:
    from moekit.recipes import btx, find_dense_ffns
    from moekit.recipes.io import save_surgery
    from moekit.validate import check_int

    check_int("-k/--top-k", args.top_k, min=1)
    base = _load_dense(args.base, args.auto_class)
    branches = [_load_dense(p, args.auto_class) for p in args.experts]
    merged = btx(base, branches, top_k=args.top_k, include_base=args.include_base, seed=args.seed).eval()
    n = len(branches) + int(args.include_base)
    layers = list(range(len(find_dense_ffns(base))))
    save_surgery(merged, args.out, _recipe(args, layers, n, args.top_k, 1), auto_class=args.auto_class)
    print(f"merged {n} branches into {len(layers)} MoE layers (top-{args.top_k}); wrote {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="transformers MoE checkpoint -> moekit layers -> checked and saved")
    p.add_argument("src", help="local folder with a transformers MoE checkpoint (safetensors)")
    p.add_argument("out", help="output folder (a transformers checkpoint)")
    p.add_argument("--backend", default="auto")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser("upcycle", help="sparse-upcycle a dense transformers checkpoint")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("-E", "--num-experts", type=int, default=8)
    p.add_argument("-k", "--top-k", type=int, default=2)
    p.add_argument("--granularity", type=int, default=1)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--reinit-fraction", type=float, default=0.0)
    p.add_argument("--every", type=int, default=1, help="upcycle every n-th FFN (2: every other layer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auto-class", default="AutoModelForCausalLM")
    p.set_defaults(func=_upcycle)

    p = subparsers.add_parser("merge", help="Branch-Train-MiX: merge dense branches into one MoE")
    p.add_argument("base", help="the seed model's folder")
    p.add_argument("out")
    p.add_argument("--experts", nargs="+", required=True, help="the trained branches' folders")
    p.add_argument("-k", "--top-k", type=int, default=2)
    p.add_argument("--include-base", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auto-class", default="AutoModelForCausalLM")
    p.set_defaults(func=_merge)
