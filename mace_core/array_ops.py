"""The few array functions torch and NumPy spell differently, so that one batched routine runs
on either: NumPy for the small CPU batches of a request (an elementwise op on a few hundred
values costs about 1 µs in NumPy against 4 µs in torch on this project's 2-core CPU, and these
routines are chains of dozens of such ops), torch for CUDA.

Arithmetic, indexing, ``@``, ``.sum(-1)`` and the functions both name alike are written
directly; the rest go through :data:`TORCH_OPS` or :data:`NUMPY_OPS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


@dataclass(frozen=True)
class ArrayOps:
    """One array library's spelling of what the batched routines use."""

    name: str  #: "torch" or "numpy"
    cos: Callable
    sin: Callable
    atan2: Callable
    arccos: Callable
    arcsin: Callable
    hypot: Callable
    where: Callable
    stack: Callable  #: (arrays, axis)
    isfinite: Callable
    nan_to_num: Callable  #: non-finite entries replaced by finite ones (NumPy's: by 0)
    norm: Callable  #: Euclidean norm over the last axis
    cross: Callable  #: cross product over the last axis
    clip: Callable  #: (x, low or None, high or None)
    broadcast_to: Callable  #: (x, shape): to be read only (NumPy's is a copy: cheaper)
    abs: Callable
    nonzero: Callable  #: (mask) -> tuple of index arrays
    amax: Callable  #: (x, axes) -> the largest value over ``axes``
    concat: Callable  #: (arrays) -> joined along the first axis
    take_along: Callable  #: (x, indices, axis), indices broadcast against ``x``

    def asarray(self, x: torch.Tensor) -> Any:
        """``x`` in this library, float64 (NumPy shares a CPU tensor's memory where it can)."""
        x = x.detach().to(torch.float64)
        return x if self.name == "torch" else x.cpu().numpy()

    def tensor(self, x: Any, like: torch.Tensor) -> torch.Tensor:
        """``x`` of this library as a tensor on ``like``'s device (the array's own dtype)."""
        return x if self.name == "torch" else torch.from_numpy(x).to(like.device)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross product over the last axis, written out: ``np.cross`` costs about 20 µs a call
    on small batches, ten times these products."""
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    return np.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], -1)


def _clip(x: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    """``np.clip`` as two ufuncs: its Python wrapper costs 4 µs a call on a request's small
    arrays, each ufunc 1 µs."""
    if low is not None:
        x = np.maximum(x, low)
    return x if high is None else np.minimum(x, high)


def _broadcast_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` repeated to ``shape``, a new array (``np.broadcast_to``'s read-only view costs
    4 µs a call, the copy of a request's few hundred values 1 µs)."""
    out = np.empty(shape, dtype=x.dtype)
    out[...] = x
    return out


def _finite_or_zero(x: np.ndarray) -> np.ndarray:
    """``x`` with its NaN and infinite entries 0: what the routines need of ``nan_to_num``
    (masked rows hold zeros), at a quarter of its 12 µs a call."""
    return np.where(np.isfinite(x), x, 0.0)


TORCH_OPS = ArrayOps(
    "torch", torch.cos, torch.sin, torch.atan2, torch.arccos, torch.arcsin, torch.hypot,
    torch.where, torch.stack, torch.isfinite, torch.nan_to_num,
    lambda x: torch.linalg.vector_norm(x, dim=-1), lambda a, b: torch.linalg.cross(a, b),
    torch.clamp, torch.broadcast_to, torch.abs, lambda m: m.nonzero(as_tuple=True),
    lambda x, axes: torch.amax(x, dim=axes), torch.cat, torch.take_along_dim)

NUMPY_OPS = ArrayOps(
    "numpy", np.cos, np.sin, np.arctan2, np.arccos, np.arcsin, np.hypot, np.where, np.stack,
    np.isfinite, _finite_or_zero, lambda x: np.sqrt((x * x).sum(-1)), _cross, _clip,
    _broadcast_to, np.abs, np.nonzero, lambda x, axes: np.max(x, axis=axes), np.concatenate,
    np.take_along_axis)


def ops_for(x: torch.Tensor) -> ArrayOps:
    """NumPy's for a CPU tensor, torch's otherwise (CUDA)."""
    return NUMPY_OPS if x.device.type == "cpu" else TORCH_OPS
