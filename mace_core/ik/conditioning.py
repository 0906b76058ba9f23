"""What an IK prior is conditioned on, and the context vector each kind reads.

- ``position``: the end effector's position ``(3,)`` m (``panda_ik``, the paper's prior);
- ``pose``: position and orientation ``(9,)``: the position, then the first two columns of the
  rotation matrix, a continuous representation of rotations (Zhou et al., "On the Continuity of
  Rotation Representations in Neural Networks", CVPR 2019); Euler angles and quaternions are
  discontinuous somewhere, and a network's output near there is poor.
"""

from __future__ import annotations

import torch

from ..errors import ModelLoadError

#: context size per conditioning kind
CONTEXT_DIMS = {"position": 3, "pose": 9}


def context_dim(conditioning: str) -> int:
    """Size of the context vector of ``conditioning``.

    Raises:
        ModelLoadError: an unknown kind.
    """
    if conditioning not in CONTEXT_DIMS:
        raise ModelLoadError(f"unknown IK prior conditioning {conditioning!r} "
                             f"(known: {sorted(CONTEXT_DIMS)})")
    return CONTEXT_DIMS[conditioning]


def context_of(conditioning: str, poses: torch.Tensor) -> torch.Tensor:
    """The contexts ``(B, context_dim)`` of end-effector poses ``(B, 4, 4)``."""
    position = poses[:, :3, 3]
    if context_dim(conditioning) == 3:
        return position
    return torch.cat([position, poses[:, :3, 0], poses[:, :3, 1]], -1)
