"""Rotation conversions shared by the core (quaternions are (x, y, z, w), as in ROS)."""

from __future__ import annotations

import numpy as np
import torch


def matrix_to_quaternion_xyzw(r: np.ndarray) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` -> unit quaternion (x, y, z, w) (Shepperd's method)."""
    tr = r[0, 0] + r[1, 1] + r[2, 2]
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [(r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s, 0.25 * s]
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2])
        q = [0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s, (r[2, 1] - r[1, 2]) / s]
    elif r[1, 1] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2])
        q = [(r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s, (r[0, 2] - r[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1])
        q = [(r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s, (r[1, 0] - r[0, 1]) / s]
    q = np.asarray(q)
    return q / np.linalg.norm(q)


def geodesic_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """rad, the angle of the rotation between ``a`` and ``b`` ``(..., 3, 3)``: ``(...)``."""
    rel = a.transpose(-1, -2) @ b
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) * 0.5).clamp(-1.0, 1.0)
    return torch.arccos(cos)


def geodesic_distance_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`geodesic_distance` in NumPy: ``(..., 3, 3)`` each -> ``(...)`` rad. The trace of
    aᵀb is the sum of their elementwise product."""
    cos = (((a * b).sum((-1, -2)) - 1.0) * 0.5).clip(-1.0, 1.0)
    return np.arccos(cos)
