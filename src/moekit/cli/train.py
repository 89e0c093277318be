"""``moekit train | compare | report | generate | presets`` — argument parsing only; the work is in
`moekit.train` and `moekit.analysis`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["register", "resolve_config"]


def register(subparsers) -> None:
    p = subparsers.add_parser("train",
                              help="train and compare MoE models (default: MoE vs dense twin on three domains)",
                              description="Train every variant of a preset or config file and compare them. "
                                          "With no arguments: the default MoE-vs-dense comparison on three "
                                          "domains (Shakespeare, State of the Union addresses, Django's Python "
                                          "source) with a BPE tokenizer.")
    p.add_argument("--preset", default=None, help="preset name (see `moekit presets`; default: 'default')")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="TOML config (applied over the preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. train.steps=100, model.num_experts=16, variants.moe.top_k=2, "
                        "variants=moe,dense (repeatable)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="train on your own text: files, folders of *.txt or globs (one file = one document)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<name>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in folder RUN bit-exactly, from each variant's newest complete checkpoint")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the settings differ from the checkpoint's (e.g. --resume RUN "
                        "--set train.steps=2000); without it a changed config is refused")
    p.add_argument("--auto-resume", action="store_true",
                   help="with --out: continue the run there if one exists (same config), else start it; "
                        "for `torchrun --max-restarts`, which re-runs the same command after a failure")
    p.add_argument("--no-report", action="store_true", help="skip plots and the HTML report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("compare", help="compare finished runs (equal steps and equal time)")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("report", help="(re)write plots, report.html and summary.json of a run")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder, a variant folder or a run/variant")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--offload-cache", type=int, default=None, metavar="S",
                   help="keep experts in host memory with S per layer cached on the device; print cache statistics")
    p.add_argument("--prefetch", action="store_true",
                   help="with --offload-cache: prefetch the experts the next layer's router picks")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("presets", help="list the training presets")
    p.set_defaults(func=cmd_presets)


def resolve_config(preset, config, overrides):
    """Preset (default 'default') → TOML file → --set overrides, validated at each stage."""
    from moekit.train.config import apply_overrides, config_from_dict, get_preset, load_toml

    if config is not None:
        d = load_toml(config)
        base = get_preset(preset or "default").to_dict()
        for sec, val in d.items():
            if sec in ("model", "data", "optim", "train") and isinstance(val, dict):
                base.setdefault(sec, {}).update(val)
            else:
                base[sec] = val
        run = config_from_dict(base)
    else:
        run = get_preset(preset or "default")
    return apply_overrides(run, list(overrides))


def cmd_train(args) -> int:
    from moekit.train.experiment import default_run_dir, load_run_config, run_experiment

    if args.resume:
        if args.preset or args.config or args.data:
            raise ValueError("--resume continues a run with its saved config; drop --preset/--config/--data")
        if args.overrides and not args.allow_config_change:
            raise ValueError("--resume with --set changes the run's config: add --allow-config-change to do so")
        run_dir = Path(args.resume)
        run = load_run_config(run_dir)
        if args.overrides:
            from moekit.train.config import apply_overrides

            run = apply_overrides(run, list(args.overrides))
    else:
        overrides = list(args.overrides)
        if args.data:
            overrides = ["data.source=files", "data.paths=" + json.dumps(args.data)] + overrides
        run = resolve_config(args.preset, args.config, overrides)
        run_dir = Path(args.out) if args.out else default_run_dir(run)
    resume = bool(args.resume)
    if args.auto_resume:
        if args.resume or not args.out:
            raise ValueError("--auto-resume needs --out RUN (and no --resume)")
        resume = "auto"
    print(f"run folder: {run_dir}{' (resumes where it holds checkpoints)' if resume == 'auto' else ''}",
          flush=True)
    out = run_experiment(run, run_dir, resume=resume, progress=not args.quiet,
                         allow_config_change=args.allow_config_change)
    print()
    print(out["table"])
    if out["status"] == "interrupted":
        print(f"\ninterrupted; continue with: moekit train --resume {run_dir}")
        return 130
    if not args.no_report:
        from moekit.analysis.report import write_report

        paths = write_report(run_dir)
        print(f"\nreport: {paths['html']}\nsummary: {paths['summary']}")
    return 0


def cmd_compare(args) -> int:
    from moekit.train.compare import comparison_rows, comparison_table
    from moekit.train.experiment import load_results

    results = []
    for r in args.runs:
        res = load_results(r)
        if not res:
            raise FileNotFoundError(f"{r}: no finished variants (no */result.json)")
        if len(args.runs) > 1:       # several runs: name variants by run
            for x in res:
                x["variant"] = f"{Path(r).name}/{x['variant']}"
        results += res
    if args.json:
        print(json.dumps(comparison_rows(results), indent=2))
    else:
        print(comparison_table(results))
    return 0


def cmd_report(args) -> int:
    from moekit.analysis.report import write_report

    paths = write_report(args.run)
    print(f"report: {paths['html']}\nsummary: {paths['summary']}")
    return 0


def cmd_generate(args) -> int:
    from moekit.train.sample import generate_text
    from moekit.validate import check_device, check_int, check_number

    if args.prefetch and args.offload_cache is None:
        raise ValueError("--prefetch needs --offload-cache S")
    check_int("--offload-cache", args.offload_cache, min=1, allow_none=True)
    # The flags as the user typed them (argparse already made them ints / floats).
    check_int("--max-new-tokens", args.max_new_tokens, min=0)
    check_number("--temperature", args.temperature, min=0)
    check_int("--top-k", args.top_k, min=1, allow_none=True)
    check_device("--device", args.device)
    stats = {} if args.offload_cache is not None else None
    text = generate_text(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed, device=args.device,
                         offload_cache=args.offload_cache, prefetch=args.prefetch, offload_stats=stats)
    sys.stdout.write(text + "\n")
    if stats is not None:
        t = stats["total"]
        sys.stderr.write(f"offloaded experts, {args.offload_cache} cached per layer: {t['requests']} expert reads, "
                         f"hit rate {t['hit_rate']:.1%}, {t['misses']} misses, {t['prefetched']} prefetched "
                         f"(precision {t['prefetch_precision']:.1%}), {t['bytes_copied'] / 2**20:.1f} MiB copied\n")
    return 0


def cmd_presets(args) -> int:
    from moekit.train.config import PRESETS

    width = max(map(len, PRESETS))
    for name, p in PRESETS.items():
        variants = ", ".join(p.get("variants", {}))
        steps = p.get("train", {}).get("steps", "default")
        data = p.get("data", {})
        source = data.get("source", "shakespeare")
        what = "+".join(data.get("domains", [])) if source == "domains" else source
        print(f"{name:{width}s} steps={steps}  data: {what} ({data.get('tokenizer', 'char')})  variants: {variants}")
    return 0
