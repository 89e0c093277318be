"""Run every variant of a `RunConfig` into one run folder and compare them.

Layout of a run folder::

    RUN/config.json            the resolved RunConfig
    RUN/<variant>/             metrics.jsonl, result.json, checkpoints/step_*/
    RUN/comparison.txt         the equal-steps / equal-time tables
    RUN/summary.json, report.html, plots/   (written by moekit.analysis.write_report)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from moekit.train.checkpoint import read_json
from moekit.train.compare import comparison_table
from moekit.train.config import RunConfig, apply_overrides, config_from_dict
from moekit.train.data import build_corpus
from moekit.train.sample import load_model
from moekit.train.trainer import train_variant

__all__ = ["run_experiment", "train_seeds", "validation_corpus", "load_run_config", "load_results",
           "default_run_dir"]


def default_run_dir(run: RunConfig, root: os.PathLike = "runs") -> Path:
    return Path(root) / f"{run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_run_config(run_dir: os.PathLike) -> RunConfig:
    path = Path(run_dir) / "config.json"
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a {type(d).__name__}, not a run config")
    return config_from_dict(d)


def load_results(run_dir: os.PathLike) -> list[dict]:
    """result.json of every variant of a run folder, in the run's variant order."""
    run_dir = Path(run_dir)
    names = load_run_config(run_dir).variant_names if (run_dir / "config.json").exists() else \
        sorted(p.parent.name for p in run_dir.glob("*/result.json"))
    out = []
    for n in names:
        p = run_dir / n / "result.json"
        if p.exists():
            out.append(read_json(p))
    return out


def run_experiment(run: RunConfig, run_dir: os.PathLike, *, resume=False, progress: bool = True,
                   stream=None, allow_config_change: bool = False) -> dict:
    """Train each variant in turn (sharing one tokenised corpus); returns
    ``{"results": [...], "status": "completed" | "interrupted", "table": str}``.

    `resume` (True, or "auto" for ``--auto-resume``) continues each variant from its newest
    complete checkpoint; a checkpoint saved under other settings is refused unless
    `allow_config_change`."""
    stream = stream or sys.stdout
    run_dir = Path(run_dir)
    # Under torchrun only rank 0 owns the run folder: the other ranks would otherwise see the
    # config.json rank 0 just wrote and stop.
    is_main = int(os.environ.get("RANK", "0")) == 0
    cfg_path = run_dir / "config.json"
    # resume="auto" (`--auto-resume`, what `torchrun --max-restarts` re-runs): every rank takes
    # the same path whatever it sees on disk — each variant resumes from its latest checkpoint
    # if there is one, else starts — so no rank decides from a file another rank just wrote.
    auto = resume == "auto"
    if auto:
        if is_main and cfg_path.exists() and load_run_config(run_dir).to_json() != run.to_json() \
                and not allow_config_change:
            raise ValueError(f"{run_dir} holds a run with another config; use another --out or the same options")
    elif resume:
        if not cfg_path.exists():
            raise FileNotFoundError(f"--resume: {run_dir} has no config.json (not a run folder)")
    elif is_main and cfg_path.exists():
        raise FileExistsError(f"{run_dir} already holds a run; use --resume or another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main and not (auto and cfg_path.exists()):
        cfg_path.write_text(run.to_json())
    resume = bool(resume)
    data = build_corpus(run.data)
    tok, train, val = data
    print(f"data: {run.data.source}, {len(train.doc_names)} train / {len(val.doc_names)} val documents, "
          f"{len(train):,} / {len(val):,} tokens, vocabulary {tok.vocab_size}", file=stream, flush=True)
    results, status = [], "completed"
    for name in run.variant_names:
        res = train_variant(run, name, run_dir / name, data=data, resume=resume, progress=progress,
                            allow_config_change=allow_config_change)
        results.append(res)
        if res["status"] == "interrupted":
            status = "interrupted"
            break
    table = comparison_table(results)
    (run_dir / "comparison.txt").write_text(table + "\n")
    return {"results": results, "status": status, "table": table}


def train_seeds(run: RunConfig, jobs, out: os.PathLike, *, progress: bool = False, stream=None):
    """Train the variants of `run` job by job — each job ``(seed, variant names, folder)`` runs
    those variants with ``train.seed=seed`` in ``out/folder`` (finished variants are resumed, not
    retrained; a job with no names is skipped) — and yield ``(seed, result, checkpoint dir)`` for
    every trained variant. The studies of `projects/` that sweep seeds and variant sets use it."""
    out = Path(out)
    for seed, names, folder in jobs:
        if not names:
            continue
        r = apply_overrides(run, [f"train.seed={seed}", "variants=" + ",".join(names)])
        t0 = time.time()
        res = run_experiment(r, out / folder, resume="auto", progress=progress, stream=stream)
        print(f"{folder} ({', '.join(names)}): trained in {time.time() - t0:.0f} s", file=stream or sys.stdout,
              flush=True)
        for result in res["results"]:
            yield seed, result, out / folder / result["variant"] / "checkpoints"


def validation_corpus(run: RunConfig, checkpoints: os.PathLike):
    """The validation split of ``run.data`` in the tokens of the model saved in `checkpoints`
    (a checkpoint folder `train_seeds` yields): what the studies analyse their models on."""
    _, tokenizer, _ = load_model(checkpoints)
    return build_corpus(run.data, tokenizer=tokenizer)[2]
