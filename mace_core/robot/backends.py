"""The exact checker each collision backend name builds (``ik.collision.backend``,
``--backends``): ``spheres`` none (the sphere model judges alone), ``mujoco`` MuJoCo on the CPU,
``mjwarp`` MuJoCo Warp batched on the tensors' device (CUDA; Warp's CPU device otherwise)."""

from __future__ import annotations

from ..errors import InvalidRequestError
from .collision import COLLISION_BACKENDS, SceneCollisionChecker


def warp_device(torch_device: str) -> str:
    """Warp's name for a torch device: ``cuda`` / ``cuda:N`` stay, anything else is ``cpu``."""
    return torch_device if torch_device.startswith("cuda") else "cpu"


def exact_checker(backend: str, device: str = "cpu") -> SceneCollisionChecker | None:
    """The exact checker of ``backend`` (None for ``spheres``), built once at start.

    Args:
        device: the torch device the service computes on (MJWarp runs there).

    Raises:
        InvalidRequestError: an unknown backend.
        ModelLoadError: the backend's package is missing or its model does not load.
    """
    if backend not in COLLISION_BACKENDS:
        raise InvalidRequestError(f"collision backend must be one of {COLLISION_BACKENDS}, "
                                  f"got {backend!r}")
    if backend == "mujoco":
        from .mujoco_checker import MuJoCoCollisionChecker
        return MuJoCoCollisionChecker()
    if backend == "mjwarp":
        from .mjwarp_checker import MJWarpCollisionChecker
        return MJWarpCollisionChecker(device=warp_device(str(device)))
    return None
