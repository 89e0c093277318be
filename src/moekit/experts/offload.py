"""Experts kept in host memory, computed from a small cache of expert slots on the compute device.

Legend: N rows grouped by expert, D model dim, E experts, S cache slots (``cache_size``).

Inference-time expert offloading (METHODS.md S4; Eliseev & Mazur 2023, "Fast Inference of
Mixture-of-Experts Language Models with Offloading"; Hwang et al. 2024, "Pre-gated MoE"):
a model whose experts do not fit in GPU memory keeps them in (pinned) host memory and holds
only S of each layer's E experts on the GPU, evicting the least recently used. A forward pass
reads the experts its tokens were routed to, computes the ones already cached first while the
missing ones are copied in on a side stream, then computes those. `prefetch` starts copies
before they are needed — `moekit.layers.offload.offload_experts(prefetch=True)` calls it with
the experts the next layer's router picks on the current layer's input.

`OffloadedExperts` wraps a `StackedFFNExperts` bank (MLP / GLU experts; their weights have a
leading expert dimension) and runs the matmuls that bank runs with ``backend="eager"``, on the
same rows; only the elementwise activation is applied one expert's rows at a time, which CPU
vector code may round differently in the last bit (so outputs equal the eager backend's to
float rounding, and exactly where the activation rounds per element alike). The wrapped bank
stays on the host with its parameters frozen; gradients still flow to the layer's input. The
state dict keeps the resident bank's keys. Reading the counts on the host is inherent here
(which experts to load), so an offloaded layer is never sync-free and cannot be captured in a
CUDA graph. `cache_stats` counts hits, misses, prefetches and bytes copied.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

import torch

from moekit.experts.base import ExpertBank, StackedFFNExperts
from moekit.validate import check_bool, check_int

__all__ = ["OffloadedExperts", "CacheStats"]


@dataclass
class CacheStats:
    """Counters of one offloaded bank since the last `reset`.

    requests: expert reads (one per distinct expert a forward pass computes); hits + misses.
    prefetched: copies started by `prefetch`; prefetch_hits: requests served by such a copy
    (counted once, also as hits); prefetch_wasted: prefetched experts evicted unread.
    bytes_copied: host → device bytes for misses and prefetches.
    """

    requests: int = 0
    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    bytes_copied: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Fraction of finished prefetches that were read (prefetched experts still cached and
        unread count as neither)."""
        done = self.prefetch_hits + self.prefetch_wasted
        return self.prefetch_hits / done if done else 0.0

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)

    def as_dict(self) -> dict:
        return dict(asdict(self), hit_rate=self.hit_rate, prefetch_precision=self.prefetch_precision)

    def __iadd__(self, other: "CacheStats") -> "CacheStats":
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self


def check_offloadable(bank, cache_size) -> None:
    """TypeError / ValueError unless `bank` can be offloaded with `cache_size` slots (changes nothing)."""
    if not isinstance(bank, StackedFFNExperts):
        raise TypeError(f"OffloadedExperts wraps an MLP / GLU bank (StackedFFNExperts), got {type(bank).__name__}")
    E = bank.num_experts
    check_int("cache_size", cache_size)
    if not 1 <= cache_size <= E:
        raise ValueError(f"cache_size must be an int in [1, num_experts={E}], got {cache_size!r}")
    for name, p in bank.named_parameters():
        if p.dim() == 0 or p.shape[0] != E:
            raise ValueError(f"every parameter of an offloaded bank needs a leading expert dim of {E}; "
                             f"{name!r} has shape {tuple(p.shape)}")


def _strip_bank_prefix(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix + "bank.")]:
        state_dict[prefix + k[len(prefix) + 5:]] = state_dict.pop(k)


def _add_bank_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for n, _ in module.bank.named_parameters():
        if prefix + n in state_dict:
            state_dict[prefix + "bank." + n] = state_dict.pop(prefix + n)


def _after_load(module, incompatible_keys):
    module._to_host()
    module.clear_cache()


class OffloadedExperts(ExpertBank):
    """A `StackedFFNExperts` bank in host memory behind an LRU cache of ``cache_size`` experts on `device`.

    Args:
        bank: the MLP / GLU bank to offload (moved to the host, parameters frozen).
        device: where experts are computed (the layer's input device).
        cache_size: S, experts of this bank held on `device` at once (1 ≤ S ≤ E).
        pin_memory: pin the host weights so copies to a CUDA device run asynchronously
            (default: True when `device` is CUDA).

    Call it after moving and casting the model: ``.to()`` on the model leaves the host
    weights and the cache where they are. `unwrap` returns the bank.
    """

    supports_static_layout = False

    def __init__(self, bank: StackedFFNExperts, *, device, cache_size: int, pin_memory: Optional[bool] = None):
        check_offloadable(bank, cache_size)
        super().__init__(bank.num_experts, bank.d_model)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cache_size = cache_size
        self.d_hidden, self.activation = bank.d_hidden, bank.activation
        self.pin = self.device.type == "cuda" if pin_memory is None else check_bool("pin_memory", pin_memory)
        self.bank_requires_grad = {n: p.requires_grad for n, p in bank.named_parameters()}   # for unwrap

        self.bank = bank.requires_grad_(False)
        self._to_host()
        names = {id(p): n for n, p in bank.named_parameters()}
        # (w_in, b_in, w_out, b_out) as parameter names (None where the bank has no bias).
        self._proj_names = [None if t is None else names[id(t)] for t in bank.projections()]
        self._slots = {n: torch.empty((cache_size,) + p.shape[1:], dtype=p.dtype, device=self.device)
                       for n, p in bank.named_parameters()}
        self.bytes_per_expert = sum(p[0].numel() * p.element_size() for p in bank.parameters())
        self.cache_stats = CacheStats()
        self._reset_streams()
        self.clear_cache()
        # The state dict keeps the resident bank's keys (no "bank." level), so checkpoints load
        # either way; loading new weights empties the cache (its slots hold the old ones).
        self.register_state_dict_post_hook(_strip_bank_prefix)
        self.register_load_state_dict_pre_hook(_add_bank_prefix)
        self.register_load_state_dict_post_hook(_after_load)

    def _to_host(self) -> None:
        """Keep the bank's weights on the host (pinned if asked), e.g. after a load with ``assign=True``."""
        for p in self.bank.parameters():
            if p.device.type != "cpu":
                p.data = p.data.to("cpu")
            if self.pin and not p.is_pinned():
                p.data = p.data.pin_memory()

    def _reset_streams(self) -> None:
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        if cuda:
            # Slots are written on the copy stream: the allocator must not reuse their memory
            # (after this bank is dropped) before those copies are done.
            for t in self._slots.values():
                t.record_stream(self._copy_stream)
        self._loaded: List[Optional[torch.cuda.Event]] = [None] * self.cache_size     # copy into slot done
        self._released: List[Optional[torch.cuda.Event]] = [None] * self.cache_size   # last read of slot done
        # Called once per forward pass right after this bank has started its own copies (so
        # they are not queued behind another layer's prefetch); set by `offload_experts`.
        self.pending_prefetch = None

    def __getstate__(self):
        # Streams and events cannot be copied or pickled; a copy starts with an empty cache.
        self.synchronize()
        state = self.__dict__.copy()
        state.update(_copy_stream=None, _loaded=None, _released=None, pending_prefetch=None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._reset_streams()
        self._lru, self._free, self._unread_prefetch = OrderedDict(), list(range(self.cache_size)), set()

    # -- the cache ----------------------------------------------------------------------
    def cached_experts(self) -> List[int]:
        """Experts on the device now, least recently used first."""
        return list(self._lru)

    def _evict(self, protected) -> int:
        for e in self._lru:
            if e not in protected:
                slot = self._lru.pop(e)
                if e in self._unread_prefetch:
                    self._unread_prefetch.discard(e)
                    self.cache_stats.prefetch_wasted += 1
                return slot
        raise RuntimeError("no evictable cache slot (internal error: more protected experts than slots)")

    def _load(self, e: int, protected) -> int:
        """Start copying expert e into a slot (free, else the least recently used one outside
        `protected`); returns the slot. On CUDA the copy runs on the side stream."""
        slot = self._free.pop() if self._free else self._evict(protected)
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                if self._released[slot] is not None:
                    self._copy_stream.wait_event(self._released[slot])     # old contents no longer read
                for n, p in self.bank.named_parameters():
                    self._slots[n][slot].copy_(p.detach()[e], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._copy_stream)
                self._loaded[slot] = ev
        else:
            for n, p in self.bank.named_parameters():
                self._slots[n][slot].copy_(p.detach()[e])
        self._lru[e] = slot
        self.cache_stats.bytes_copied += self.bytes_per_expert
        return slot

    def _request(self, experts: List[int]) -> Dict[int, int]:
        """Slots of `experts` (distinct, at most S), loading the missing ones; counts hits and misses."""
        protected = set(experts)
        slots = {}
        for e in experts:                                   # hits first: they must not be evicted
            if e in self._lru:
                self._lru.move_to_end(e)
                slots[e] = self._lru[e]
                self.cache_stats.hits += 1
                if e in self._unread_prefetch:
                    self._unread_prefetch.discard(e)
                    self.cache_stats.prefetch_hits += 1
        for e in experts:
            if e not in slots:
                slots[e] = self._load(e, protected)
                self.cache_stats.misses += 1
        self.cache_stats.requests += len(experts)
        return slots

    def prefetch(self, experts: Iterable[int]) -> List[int]:
        """Start copying `experts` (most wanted first; at most S) into the cache; returns those copied."""
        started = []
        wanted = []
        for e in experts:
            e = int(e)
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert ids must lie in [0, {self.num_experts}), got {e}")
            if e not in wanted:
                wanted.append(e)
        wanted = wanted[:self.cache_size]
        protected = set(wanted)
        for e in wanted:
            if e in self._lru:
                self._lru.move_to_end(e)
            else:
                self._load(e, protected)
                self._unread_prefetch.add(e)
                self.cache_stats.prefetched += 1
                started.append(e)
        return started

    def clear_cache(self) -> None:
        """Empty the cache (statistics are kept; `cache_stats.reset()` clears them)."""
        self.synchronize()
        self._lru: "OrderedDict[int, int]" = OrderedDict()       # expert -> slot, least recent first
        self._free: List[int] = list(range(self.cache_size))
        self._unread_prefetch: set = set()

    def synchronize(self) -> None:
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    # -- computing ----------------------------------------------------------------------
    def _run(self, slot: int, x_nD: torch.Tensor) -> torch.Tensor:
        """Expert in `slot` on rows `x_nD`: the ops `StackedFFNExperts.forward` runs with the eager backend."""
        if self._loaded[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._loaded[slot])
        w_in, b_in, w_out, b_out = (None if n is None else self._slots[n][slot] for n in self._proj_names)
        if torch.is_grad_enabled() and x_nD.requires_grad:
            # Autograd keeps the weights for the input gradient; the slot may be refilled first.
            w_in, w_out = w_in.clone(), w_out.clone()
        h = x_nD @ w_in.to(x_nD.dtype).t()
        if b_in is not None:
            h = h + b_in.to(h.dtype)
        y = self.bank.hidden(h) @ w_out.to(x_nD.dtype).t()
        if b_out is not None:
            y = y + b_out.to(y.dtype)
        if self._copy_stream is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._released[slot] = ev
        return y

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        # `backend` is accepted for the bank interface; offloaded experts always run the
        # per-expert loop (only cached experts exist on the device to run).
        if x_ND.device != self.device:
            raise ValueError(f"offloaded experts compute on {self.device}, got input on {x_ND.device}")
        self._check_runnable(x_ND)
        counts = [int(c) for c in counts_E.tolist()]       # which experts to load: a host read by nature
        if len(counts) != self.num_experts or sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts_E must have {self.num_experts} entries summing to the {x_ND.shape[0]} "
                             f"rows, got {len(counts)} entries summing to {sum(counts)}")
        starts, s = [], 0
        for c in counts:
            starts.append(s)
            s += c
        active = [e for e, c in enumerate(counts) if c]
        cached_first = [e for e in active if e in self._lru] + [e for e in active if e not in self._lru]
        outs: Dict[int, torch.Tensor] = {}
        for i in range(0, len(cached_first), self.cache_size):       # waves of at most S experts
            wave = cached_first[i:i + self.cache_size]
            slots = self._request(wave)
            if i == 0:
                self._run_pending_prefetch()
            for e in wave:
                outs[e] = self._run(slots[e], x_ND[starts[e]:starts[e] + counts[e]])
        if not outs:
            self._run_pending_prefetch()
            return x_ND.new_zeros(0, self.d_model)
        return torch.cat([outs[e] for e in active], 0)

    def _run_pending_prefetch(self) -> None:
        fn, self.pending_prefetch = self.pending_prefetch, None
        if fn is not None:
            fn()

    def _check_runnable(self, x: torch.Tensor) -> None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("offloaded experts read the routing counts on the host to choose which experts "
                               "to load; they cannot be captured in a CUDA graph")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.bank.parameters()):
            raise RuntimeError("offloaded expert weights get no gradient (they are computed from device copies); "
                               "train with `moekit.layers.restore_experts(model)` first, or freeze them")

    def expert_forward(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        self._check_runnable(x_nD)
        slots = self._request([i])
        return self._run(slots[i], x_nD.to(self.device))

    def check_sync_free_backend(self, x: torch.Tensor, backend: str) -> None:
        raise ValueError("offloaded experts read the routing counts on the host to choose which experts "
                         "to load, so an offloaded layer cannot be sync_free")

    def unwrap(self) -> StackedFFNExperts:
        """The wrapped bank, on the host, each parameter's ``requires_grad`` as it was before offloading."""
        self.synchronize()
        for n, p in self.bank.named_parameters():
            p.requires_grad_(self.bank_requires_grad.get(n, True))
        return self.bank

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() on the model leave the host weights and the cache alone.
        return self

    def extra_repr(self) -> str:
        return (f"{type(self.bank).__name__}(num_experts={self.num_experts}, d_model={self.d_model}, "
                f"d_hidden={self.d_hidden}), cache_size={self.cache_size}, device={self.device}")
