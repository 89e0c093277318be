"""Argument checks with one wording for every public constructor, config and CLI flag.

Each check returns the value (converted where that is lossless: an int for a float setting)
or raises ``TypeError`` (wrong kind of value) / ``ValueError`` (right kind, bad value) whose
message names the argument, what was expected and what was given. The odd values are the
point: ``True`` is not an int, NaN and ±inf are not numbers, ``1.0`` is not a size.

    >>> check_int("num_experts", 8, min=1)
    8
    >>> check_number("aux_loss_coef", float("nan"), min=0)
    Traceback (most recent call last):
    ...
    ValueError: aux_loss_coef must be a finite number >= 0, got nan

This module sits below every other package (it imports only torch), so any layer may use it.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional, Sequence

import torch

__all__ = ["check_int", "check_number", "check_bool", "check_choice", "check_instance", "check_tensor",
           "check_probability", "check_device", "range_text"]


def range_text(min=None, max=None, *, min_open: bool = False, max_open: bool = False) -> str:
    """``">= 1"``, ``"in (0, 1]"``… for messages."""
    if min is not None and max is not None:
        return f"in {'(' if min_open else '['}{min}, {max}{')' if max_open else ']'}"
    if min is not None:
        return f"{'>' if min_open else '>='} {min}"
    if max is not None:
        return f"{'<' if max_open else '<='} {max}"
    return ""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _in_range(v, min, max, min_open, max_open) -> bool:
    if min is not None and (v < min or (min_open and v == min)):
        return False
    if max is not None and (v > max or (max_open and v == max)):
        return False
    return True


def check_int(name: str, value: Any, *, min: Optional[int] = None, max: Optional[int] = None,
              allow_none: bool = False) -> Optional[int]:
    """An int (not a bool, not a float) within ``[min, max]``; numpy / 0-d integer tensors accepted."""
    if value is None and allow_none:
        return None
    expected = "a positive int" if (min == 1 and max is None) else " ".join(filter(None, ("an int", range_text(min,
                                                                                                               max))))
    expected += " or None" if allow_none else ""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}")
    value = int(value)
    if not _in_range(value, min, max, False, False):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_number(name: str, value: Any, *, min: Optional[float] = None, max: Optional[float] = None,
                 min_open: bool = False, max_open: bool = False, allow_none: bool = False,
                 allow_inf: bool = False) -> Optional[float]:
    """A finite real number (int or float, not a bool) within the given range, as a float."""
    if value is None and allow_none:
        return None
    kind = "a number" if allow_inf else "a finite number"
    expected = " ".join(filter(None, (kind, range_text(min, max, min_open=min_open, max_open=max_open))))
    expected += " or None" if allow_none else ""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf) \
            or not _in_range(value, min, max, min_open, max_open):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_probability(name: str, value: Any, *, open_low: bool = False, open_high: bool = False) -> float:
    """A finite number in [0, 1] (ends open as asked)."""
    return check_number(name, value, min=0.0, max=1.0, min_open=open_low, max_open=open_high)


def check_bool(name: str, value: Any) -> bool:
    """A real bool (``0``/``1`` and strings are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {_describe(value)}")
    return value


def check_choice(name: str, value: Any, choices: Iterable, *, allow_none: bool = False) -> Any:
    """One of `choices` (compared with ==, so names stay case-sensitive)."""
    choices = tuple(choices)
    if value is None and allow_none:
        return None
    try:
        ok = value in choices
    except TypeError:          # unhashable / incomparable
        ok = False
    if not ok or isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_instance(name: str, value: Any, types, *, allow_none: bool = False, what: Optional[str] = None) -> Any:
    """`isinstance(value, types)` (bools are refused where ints are asked)."""
    if value is None and allow_none:
        return None
    types_t = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types_t:
        ok = False
    else:
        ok = isinstance(value, types_t)
    if not ok:
        names = what or " or ".join(t.__name__ for t in types_t)
        raise TypeError(f"{name} must be {names}, got {_describe(value)}")
    return value


def check_tensor(name: str, value: Any, *, shape: Optional[Sequence[Optional[int]]] = None,
                 ndim: Optional[int | Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
                 floating: bool = False, integer: bool = False, device: Optional[torch.device] = None,
                 finite: bool = False) -> torch.Tensor:
    """A tensor with the given shape (``None`` entries match any size), number of dimensions,
    dtype kind and device; `finite` also refuses NaN and ±inf values (a host sync)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in dims:
            want = dims[0] if len(dims) == 1 else " or ".join(map(str, dims))
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if shape is not None:
        if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
            dims = ", ".join("any" if s is None else str(s) for s in shape)
            want = "(" + dims + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got dtype {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name} must be on device {torch.device(device)}, got {value.device}")
    if finite and value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must hold only finite values (no NaN or inf)")
    return value


def check_device(name: str, value: Any, *, allow_auto: bool = False) -> torch.device:
    """A device that exists here: ``"cpu"``, ``"cuda"`` / ``"cuda:1"`` only with that GPU, ``"mps"``
    only where available (``"auto"`` → cuda if available, else cpu, when `allow_auto`)."""
    if allow_auto and value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(value, (str, torch.device)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a device name such as 'cpu' or 'cuda:0', got {_describe(value)}")
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{name} must be a device name such as 'cpu' or 'cuda:0', got {value!r} ({e})") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{name}={str(value)!r} but CUDA is not available here; use 'cpu'"
                             + (" or 'auto'" if allow_auto else ""))
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{name}={str(value)!r} but this machine has {n} CUDA device(s)")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"{name}={str(value)!r} but MPS is not available here; use 'cpu'")
    elif dev.type == "meta":
        raise ValueError(f"{name} must be a device that holds data, got 'meta'")
    return dev
