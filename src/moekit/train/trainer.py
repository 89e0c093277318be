"""The language-model trainer: accumulation, checkpoints, resume; each update is `moekit.optim.UpdateStep`
(AdamW, warmup + cosine, clipping, non-finite check, bias update).

One `Trainer` trains one model variant of a `RunConfig` into its own folder:

- loss per optimizer step ``= (1/A) Σ_{a=1..A} (CE_a + aux_a)`` over A micro-batches of equal
  size: both the cross-entropy and the MoE balancing losses are per-micro-batch means, so
  dividing each by A makes the step's gradient the mean over micro-batches — the same
  normalisation for both terms, independent of A;
- the aux-loss-free bias update (`moekit.update_router_biases`) runs right after
  ``optimizer.step()``, on the loads summed over the step's micro-batches;
- bf16 autocast on CUDA (``train.amp="auto"``), optional `torch.compile`;
- every random draw (init, data windows, router noise) comes from seeded generators whose
  states are checkpointed, so ``--resume`` continues bit-exactly;
- active parameters and FLOPs per token come from the routing taken: each MoE layer's mean
  experts per token over the training steps (training FLOPs) and over the last evaluation
  (forward FLOPs, active parameters), so routers that pick their own count (top-p, dense,
  ReLU, null experts …) are charged for what they used, not for a nominal K;
- a non-finite loss or gradient norm stops the run with `NonFiniteLossError` *before* the
  optimizer step, keeping the last good checkpoint; Ctrl-C saves the last completed step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import moekit
from moekit.models.transformer import TransformerLM, flops_per_token, param_counts
from moekit.optim import NonFiniteError, UpdateStep, build_optimizer, lr_at
from moekit.train.allocator import keep_freed_memory
from moekit.train.checkpoint import (
    CheckpointError,
    clean_stale,
    load_checkpoint,
    read_config,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from moekit.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig, variant_model_config
from moekit.train.data import BatchSampler, build_corpus, eval_batches
from moekit.train.distributed import distributed_context
from moekit.train.metrics import MetricsLogger
from moekit.train.progress import Progress
from moekit.validate import check_device

__all__ = ["Trainer", "NonFiniteLossError", "lr_at", "resolve_device", "train_variant", "config_changes"]

# Settings that change neither the numbers a run computes nor what it stores: a resume may
# differ in them without --allow-config-change.
_RESUME_NEUTRAL = {"name", "train.device", "train.threads", "train.keep_freed_memory", "train.log_every",
                   "train.keep_checkpoints", "data.cache_dir"}


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or inf; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    return check_device("train.device", name, allow_auto=True)


def _fused_adamw(device: torch.device, *, distributed: bool) -> Optional[bool]:
    """torch's fused AdamW where it runs: CUDA, and the CPU outside a process group (measured on
    the default preset's MoE model, one thread: 11 ms a step against 36 ms for the per-tensor
    loop, which is what torch picks for CPU tensors by default)."""
    return True if device.type == "cuda" or (device.type == "cpu" and not distributed) else None


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict, *, neutral=frozenset()) -> list:
    """``"key: saved -> current"`` for each setting that differs between two nested config dicts
    (lists and tuples compare equal when their items do), keys in `neutral` excepted."""
    a, b = _flatten(saved), _flatten(current)
    norm = lambda v: [norm(x) for x in v] if isinstance(v, (list, tuple)) else v
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if k not in neutral and norm(a.get(k)) != norm(b.get(k))]


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class _RoutingAccumulator:
    """Sums per-layer MoE statistics over micro-batches and steps (detached, on device)."""

    def __init__(self, model: TransformerLM):
        self.layers = [(i, b.ffn) for i, b in enumerate(model.blocks) if b.is_moe]
        self.reset()

    def reset(self):
        self.counts = [None] * len(self.layers)
        self.dropped = [0.0] * len(self.layers)
        self.entropy = [0.0] * len(self.layers)
        self.experts = [0.0] * len(self.layers)
        self.n = 0

    def add(self):
        for j, (_, moe) in enumerate(self.layers):
            s = moe.last_stats
            if s is None:
                continue
            c = s.tokens_per_expert.detach().float()
            self.counts[j] = c if self.counts[j] is None else self.counts[j] + c
            self.dropped[j] += s.dropped.detach().float()
            if s.router_entropy is not None:
                self.entropy[j] += s.router_entropy.detach().float()
            self.experts[j] += s.experts_per_token.detach().float()
        self.n += 1

    def merge(self, other: "_RoutingAccumulator") -> None:
        """Add `other`'s sums (one step) to this accumulator's (a logging interval)."""
        self.counts = [c if a is None else (a if c is None else a + c) for a, c in zip(self.counts, other.counts)]
        self.dropped = [a + b for a, b in zip(self.dropped, other.dropped)]
        self.entropy = [a + b for a, b in zip(self.entropy, other.entropy)]
        self.experts = [a + b for a, b in zip(self.experts, other.experts)]
        self.n += other.n

    def experts_per_token(self) -> list:
        """Mean kept experts per token of each layer over the added micro-batches (all of one size)."""
        return [float(e) / max(self.n, 1) for e in self.experts]

    def summary(self) -> dict:
        """Per layer: tokens per expert, load imbalance (max/mean), drop fraction, entropy and
        mean experts per token."""
        out = {"layers": [], "tokens_per_expert": [], "load_imbalance": [], "drop_fraction": [],
               "router_entropy": [], "experts_per_token": []}
        for j, (i, _) in enumerate(self.layers):
            c = self.counts[j]
            if c is None:
                continue
            kept = float(c.sum())
            drop = float(self.dropped[j])
            out["layers"].append(i)
            out["tokens_per_expert"].append([int(v) for v in c.tolist()])
            out["load_imbalance"].append(float(c.max() / c.mean().clamp_min(1e-9)))
            out["drop_fraction"].append(drop / max(kept + drop, 1.0))
            out["router_entropy"].append(float(self.entropy[j]) / max(self.n, 1))
            out["experts_per_token"].append(float(self.experts[j]) / max(self.n, 1))
        return out


class Trainer:
    """Train one variant of `run` into `out_dir` (``checkpoints/``, ``metrics.jsonl``, ``result.json``).

    data: optional ``(tokenizer, train Corpus, val Corpus)`` to share between variants.
    """

    def __init__(self, run: RunConfig, variant: str, out_dir: os.PathLike, *, data=None,
                 progress: bool = True):
        if variant not in run.variant_names:
            raise ValueError(f"unknown variant {variant!r}; this run has {run.variant_names}")
        self.run, self.variant, self.out_dir = run, variant, Path(out_dir)
        tc = run.train
        self.dist = distributed_context()
        self.is_main = self.dist is None or self.dist.is_main
        self.device = self.dist.device if self.dist is not None else resolve_device(tc.device)
        if isinstance(self.device, str):
            self.device = torch.device(self.device)
        if tc.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(tc.threads)
        if tc.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        self.tokenizer, self.train_corpus, self.val_corpus = data if data is not None else build_corpus(run.data)
        self.model_config = variant_model_config(run, variant, vocab_size=self.tokenizer.vocab_size)

        _seed_everything(tc.seed)
        self.model = TransformerLM(self.model_config).to(self.device)
        self.lm = self.model                # unwrapped, for parameter and FLOP counts
        # Nominal counts (the router's K, or a nominal count for routers that pick their own);
        # `result` replaces them with counts from the routing measured in training and evaluation.
        self.counts = param_counts(self.model)
        self.flops = flops_per_token(self.model, run.data.seq_len)
        if self.dist is not None:
            self.model = self.dist.prepare_model(self.model, fsdp=tc.fsdp)
        elif tc.fsdp:
            raise ValueError("train.fsdp=true shards parameters over the ranks of a torchrun job; "
                             "this is a single process (WORLD_SIZE=1)")
        oc = run.optim
        self.optimizer = build_optimizer(self.model, name="adamw", lr=oc.lr, weight_decay=oc.weight_decay,
                                         betas=(oc.beta1, oc.beta2), eps=oc.eps,
                                         fused=_fused_adamw(self.device, distributed=self.dist is not None))
        self.update = UpdateStep(self.model, self.optimizer, lr=oc.lr, total_steps=tc.steps,
                                 warmup_steps=oc.warmup_steps, min_lr_ratio=oc.min_lr_ratio,
                                 grad_clip=oc.grad_clip,
                                 clip_fn=None if self.dist is None else self.dist.clip_grad_norm_)
        rank = 0 if self.dist is None else self.dist.rank
        # Data order: its own generator (seed and rank), independent of the model's RNG draws.
        self.sampler = BatchSampler(self.train_corpus, seq_len=run.data.seq_len, batch_size=run.data.batch_size,
                                    seed=tc.seed * 1000003 + 17 + rank)
        self.val_batches = eval_batches(self.val_corpus, seq_len=run.data.seq_len,
                                        batch_size=run.data.batch_size, max_batches=tc.eval_batches)
        amp = tc.amp if tc.amp != "auto" else ("bf16" if self.device.type == "cuda" else "none")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if amp == "bf16" \
            else contextlib.nullcontext
        self.forward = torch.compile(self.model) if tc.compile else self.model
        self.step = 0
        self.train_time = 0.0
        self.tokens_seen = 0
        self.evals: list[dict] = []
        # Sum over training micro-batches of each MoE layer's mean experts per token, and their number.
        self.train_experts_sum = [0.0] * len(self.lm.moe_blocks)
        self.train_micro_batches = 0
        self.eval_experts: Optional[list] = None
        self.progress_enabled = progress and self.is_main
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.last_good: Optional[Path] = None
        self.resumed = False
        self._in_update = False

    # -- state ----------------------------------------------------------------------------
    def checkpoint_config(self) -> dict:
        return {"variant": self.variant, "model": self.model_config.to_dict(),
                "tokenizer": self.tokenizer.to_dict(), "run": self.run.to_dict()}

    def trainer_state(self, sampler_state=None) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "sampler": sampler_state if sampler_state is not None else self.sampler.state_dict(),
                "rng": rng_state(), "train_time": self.train_time, "tokens_seen": self.tokens_seen,
                "evals": list(self.evals), "train_experts_sum": list(self.train_experts_sum),
                "train_micro_batches": self.train_micro_batches}

    def save(self, sampler_state=None) -> Path:
        state = self.trainer_state(sampler_state)
        if self.dist is not None:
            path = self.ckpt_dir / f"step_{self.step:06d}"
            state.pop("optimizer")          # saved (sharded) as an object below
            self.dist.save_checkpoint({"model": self.model, "optimizer": self.optimizer,
                                       "trainer_state": state, "config": self.checkpoint_config()}, path)
            self.last_good = path
            return path
        self.last_good = save_checkpoint(self.ckpt_dir, self.step, model=self.model,
                                         config=self.checkpoint_config(), trainer_state=state,
                                         keep=self.run.train.keep_checkpoints)
        return self.last_good

    def resume(self, path: Optional[os.PathLike] = None, *, allow_config_change: bool = False) -> bool:
        """Restore the newest complete checkpoint under this variant's folder (or `path`).

        Returns False only when this variant has not started (no checkpoint and no metrics):
        a variant with history but no usable checkpoint raises CheckpointError rather than
        start again over it. Newer checkpoints that fail their checksums are skipped, with a
        note on stderr naming them. A checkpoint saved under another config (learning rate,
        sequence length, steps, model sizes …) is refused unless `allow_config_change`."""
        path = Path(path) if path is not None else self.ckpt_dir
        notes: list = []
        try:
            if self.dist is not None:
                found, notes = self.dist.resolve_checkpoint(path)
            else:
                if self.is_main:
                    clean_stale(path)
                found, notes = resolve_checkpoint(path)
        except FileNotFoundError:
            metrics = self.out_dir / "metrics.jsonl"
            if metrics.exists() and metrics.stat().st_size > 0:
                raise CheckpointError(
                    f"cannot resume {self.variant!r}: {metrics} records a run but {path} holds no checkpoint; "
                    f"nothing was changed (move {self.out_dir} away to train this variant from step 0)") from None
            return False
        for note in notes:
            if self.is_main:
                print(f"[{self.variant}] resume: {note}", file=sys.stderr, flush=True)
        saved_cfg = (self.dist.load_checkpoint({"config": {}}, found)["config"] if self.dist is not None
                     else read_config(found))
        changes = config_changes({"model": saved_cfg.get("model", {}), **_sections(saved_cfg.get("run", {}))},
                                 {"model": self.model_config.to_dict(), **_sections(self.run.to_dict())},
                                 neutral=_RESUME_NEUTRAL)
        if changes and not allow_config_change:
            raise CheckpointError(
                f"cannot resume {self.variant!r} from {found}: its config differs from this run's — "
                + "; ".join(changes) + ". Pass --allow-config-change (allow_config_change=True) to continue "
                "with the new settings.")
        if self.dist is not None:
            state = self.dist.load_checkpoint({"model": self.model, "optimizer": self.optimizer,
                                               "trainer_state": {}}, found)
            ts = state["trainer_state"]
        else:
            ts = load_checkpoint(found, model=self.model, map_location=self.device)
            self.optimizer.load_state_dict(ts["optimizer"])
        if self.is_main:
            print(f"[{self.variant}] resuming from {found} (step {int(ts['step'])})"
                  + (f" with changed settings: {'; '.join(changes)}" if changes else ""), file=sys.stderr, flush=True)
        self.last_good = found
        self.step = int(ts["step"])
        self.sampler.load_state_dict(ts["sampler"])
        set_rng_state(ts["rng"])
        self.train_time = float(ts["train_time"])
        self.tokens_seen = int(ts["tokens_seen"])
        self.evals = list(ts["evals"])
        # Checkpoints written before the measured counts existed resume without the earlier steps' sums.
        self.train_experts_sum = [float(v) for v in ts.get("train_experts_sum", self.train_experts_sum)]
        self.train_micro_batches = int(ts.get("train_micro_batches", 0))
        self.eval_experts = self.evals[-1].get("experts_per_token") if self.evals else None
        self.resumed = True
        return True

    # -- loop -----------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean validation cross-entropy (nats per token) over the fixed validation batches."""
        return self.evaluate_domains()[0]

    def evaluate_domains(self) -> tuple:
        """``(mean validation cross-entropy, {domain: its mean cross-entropy} or None)``; the
        per-domain losses exist when the corpus has several domains (each domain's windows
        are an equal share of the batches, so the mean is the mean of the domains' losses).
        Each MoE layer's mean experts per token over these batches is kept in `eval_experts`."""
        self.model.eval()
        routing = _RoutingAccumulator(self.model)
        corpus = self.val_corpus
        G = corpus.num_domains
        total, n = 0.0, 0
        sum_G = torch.zeros(G, dtype=torch.float64)
        cnt_G = torch.zeros(G, dtype=torch.float64)
        with torch.no_grad():
            for x, y, doc in self.val_batches:
                with self.autocast():
                    logits, loss = self.forward(x.to(self.device), y.to(self.device))
                routing.add()
                if G == 1:
                    total += float(loss) * y.numel()
                    n += y.numel()
                    continue
                ce_BS = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten(),
                                                          reduction="none").double().cpu()
                dom_BS = corpus.domain_of_tokens(doc).flatten()
                sum_G += torch.bincount(dom_BS, weights=ce_BS, minlength=G)
                cnt_G += torch.bincount(dom_BS, minlength=G).double()
        self.model.train()
        self.eval_experts = routing.experts_per_token() if routing.layers else None
        if G == 1:
            return total / n, None
        by_domain = {name: float(sum_G[g] / cnt_G[g]) for g, name in enumerate(corpus.domain_names) if cnt_G[g] > 0}
        return float(sum_G.sum() / cnt_G.sum()), by_domain

    def accumulate_gradients(self, batch_fns, routing: Optional[_RoutingAccumulator] = None) -> tuple[float, float]:
        """Forward/backward over A micro-batches (each ``fn() -> (x, y, doc)``), adding
        ``(CE_a + aux_a) / A`` to the gradients; returns the mean CE and mean aux loss."""
        A = len(batch_fns)
        ce_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for fn in batch_fns:
            x, y, _ = fn()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                _, ce = self.forward(x, y)
                aux = moekit.aux_loss(self.model).float()
            ((ce + aux) / A).backward()
            ce_sum += ce.detach()
            aux_sum += aux.detach()
            if routing is not None:
                routing.add()
        return float(ce_sum) / A, float(aux_sum) / A

    def _train_step(self, routing: _RoutingAccumulator) -> dict:
        tc = self.run.train
        self.update.step = self.step
        lr = self.update.set_lr()
        ce_val, aux_val = self.accumulate_gradients([self.sampler.next_batch for _ in range(tc.grad_accum)],
                                                    routing)
        # A Ctrl-C inside the update would leave parameters half-updated: flag the window so
        # the interrupt handler keeps the previous checkpoint instead of saving that state.
        self._in_update = True
        try:
            info = self.update(loss_value=ce_val + aux_val)       # clip, check, step, bias update
        except NonFiniteError as e:
            raise NonFiniteLossError(
                f"{e} (cross-entropy {ce_val}, aux {aux_val}). Last good checkpoint: "
                f"{self.last_good or 'none written yet'}. Try a lower optim.lr, optim.grad_clip > 0, "
                f"or train.amp='none'.") from None
        finally:
            self._in_update = False
        return {"loss": ce_val + aux_val, "ce": ce_val, "aux": aux_val, "lr": lr, "grad_norm": info["grad_norm"]}

    def fit(self, *, stop_at_step: Optional[int] = None) -> dict:
        """Train to ``train.steps`` (or `stop_at_step`); returns the result dict (also in result.json).

        ``status`` is ``"completed"``, ``"stopped"`` (stop_at_step), ``"interrupted"`` (Ctrl-C,
        checkpoint saved) — a non-finite loss raises `NonFiniteLossError` after logging it.
        """
        tc = self.run.train
        end = tc.steps if stop_at_step is None else min(stop_at_step, tc.steps)
        resume_step = self.step if self.resumed or self.step > 0 else None
        log = MetricsLogger(self.out_dir / "metrics.jsonl", resume_step=resume_step,
                            enabled=self.is_main)
        bar = Progress(tc.steps, start=self.step, label=self.variant, every=tc.log_every,
                       enabled=self.progress_enabled)
        routing = _RoutingAccumulator(self.model)
        interval = _RoutingAccumulator(self.model)
        tokens_per_step = self.run.data.batch_size * self.run.data.seq_len * tc.grad_accum
        tps_ema = None
        status = "completed" if end == tc.steps else "stopped"
        self.model.train()
        try:
            if self.step == 0 and self.is_main:
                log.log("event", 0, event="start", variant=self.variant, params=self.counts, flops=self.flops,
                        device=str(self.device))
            while self.step < end:
                sampler_before = self.sampler.state_dict()
                rng_before = rng_state()
                t0 = time.perf_counter()
                routing.reset()
                try:
                    m = self._train_step(routing)
                except KeyboardInterrupt:
                    # Nothing of this step was applied: rewind the data and RNG streams to its start.
                    self.optimizer.zero_grad(set_to_none=True)
                    self.sampler.load_state_dict(sampler_before)
                    set_rng_state(rng_before)
                    raise
                except NonFiniteLossError as e:
                    log.log("event", self.step + 1, event="non_finite", message=str(e))
                    raise
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.step += 1
                self.train_time += dt
                self.tokens_seen += tokens_per_step
                tps = tokens_per_step / dt
                tps_ema = tps if tps_ema is None else 0.9 * tps_ema + 0.1 * tps
                interval.merge(routing)
                self.train_experts_sum = [a + float(b) for a, b in zip(self.train_experts_sum, routing.experts)]
                self.train_micro_batches += routing.n
                rs = routing.summary()
                imb = float(np.mean(rs["load_imbalance"])) if rs["layers"] else None
                drop = float(np.mean(rs["drop_fraction"])) if rs["layers"] else None
                bar.update(self.step, loss=m["loss"], **{"tok/s": round(tps_ema)}, imbalance=imb, drop=drop)
                if self.step % tc.log_every == 0 or self.step == end:
                    log.log("train", self.step, **m, tokens_per_s=tps, train_time=self.train_time,
                            tokens=self.tokens_seen, load_imbalance=imb, drop_fraction=drop)
                    if interval.layers:
                        log.log("routing", self.step, **interval.summary())
                    interval.reset()
                if self.step % tc.eval_every == 0 or self.step == tc.steps:
                    vl, by_domain = self.evaluate_domains()
                    rec = {"step": self.step, "train_time": self.train_time, "val_loss": vl, "tokens": self.tokens_seen}
                    if by_domain is not None:
                        rec["val_loss_by_domain"] = by_domain
                    if self.eval_experts is not None:
                        rec["experts_per_token"] = self.eval_experts
                    self.evals.append(rec)
                    log.log("eval", self.step, **{k: v for k, v in rec.items() if k != "step"})
                    bar.message(f"[{self.variant}] step {self.step}: val loss {vl:.4f}")
                if self.step % tc.ckpt_every == 0 or self.step == end:
                    self.save()
        except KeyboardInterrupt:
            status = "interrupted"
            if self._in_update:
                path = self.last_good
                bar.message(f"[{self.variant}] interrupted inside an optimizer update: the model is "
                            f"half-updated and is not saved; last good checkpoint: {path}")
            else:
                path = self.save()
                bar.message(f"[{self.variant}] interrupted at step {self.step}: saved {path}; "
                            f"continue with --resume")
            log.log("event", self.step, event="interrupted", checkpoint=str(path))
        finally:
            bar.close()
            log.close()
        result = self.result(status)
        if self.is_main:
            import json
            (self.out_dir / "result.json").write_text(json.dumps(result, indent=2))
        return result

    def measured_counts(self) -> dict:
        """Active parameters and FLOPs per token from the routing taken, with each MoE layer's
        mean experts per token: ``experts_per_token`` (``layers``, ``train``: over the training
        micro-batches, ``eval``: over the last evaluation; None when not measured yet). Forward
        FLOPs and active parameters use the evaluation's means, training FLOPs (3 × forward) the
        training means; a count not measured yet is the nominal one."""
        seq = self.run.data.seq_len
        layers = [i for i, b in enumerate(self.lm.blocks) if b.is_moe]
        train = ([s / self.train_micro_batches for s in self.train_experts_sum]
                 if layers and self.train_micro_batches else None)
        ev = self.eval_experts if layers else None
        return {"params_active": param_counts(self.lm, experts=ev)["active"] if ev else self.counts["active"],
                "flops_per_token_forward": flops_per_token(self.lm, seq, experts=ev)["forward"] if ev
                else self.flops["forward"],
                "flops_per_token_train": flops_per_token(self.lm, seq, experts=train)["train"] if train
                else self.flops["train"],
                "experts_per_token": {"layers": layers, "train": train, "eval": ev} if layers else None}

    def result(self, status: str) -> dict:
        final = self.evals[-1]["val_loss"] if self.evals else None
        by_domain = self.evals[-1].get("val_loss_by_domain") if self.evals else None
        measured = self.measured_counts()
        return {"variant": self.variant, "status": status, "steps": self.step,
                "val_loss": final, "val_loss_by_domain": by_domain, "evals": list(self.evals),
                "train_time_s": self.train_time, "tokens_seen": self.tokens_seen,
                "tokens_per_s": self.tokens_seen / self.train_time if self.train_time > 0 else None,
                "params_total": self.counts["total"], "params_active": measured["params_active"],
                "params_embedding": self.counts["embedding"],
                "flops_per_token_forward": measured["flops_per_token_forward"],
                "flops_per_token_train": measured["flops_per_token_train"],
                "experts_per_token": measured["experts_per_token"],
                "params_active_nominal": self.counts["active"],
                "flops_per_token_forward_nominal": self.flops["forward"],
                "flops_per_token_train_nominal": self.flops["train"],
                "model": self.model_config.to_dict(), "device": str(self.device),
                "checkpoint": str(self.last_good) if self.last_good else None}


def _sections(run: dict) -> dict:
    """The data, optim and train sections of a run dict; a key a checkpoint lacks (a setting
    added after it was written: data.domains, data.vocab_size, ...) takes its default, which is
    what that run did."""
    out = {}
    for k, cls in (("data", DataConfig), ("optim", OptimConfig), ("train", TrainConfig)):
        defaults = dataclasses.asdict(cls())
        out[k] = {**defaults, **run.get(k, {})}
    return out


def train_variant(run: RunConfig, variant: str, out_dir: os.PathLike, *, data=None, resume: bool = False,
                  stop_at_step: Optional[int] = None, progress: bool = True,
                  allow_config_change: bool = False) -> dict:
    """Build a `Trainer`, optionally resume from its newest complete checkpoint, and fit."""
    trainer = Trainer(run, variant, out_dir, data=data, progress=progress)
    if resume:
        trainer.resume(allow_config_change=allow_config_change)
    return trainer.fit(stop_at_step=stop_at_step)
