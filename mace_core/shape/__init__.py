"""Shape completion with MACE-VAE (paper Sec. 4.3, App. A and C).

- ``vae``: the PointNet VAE priors and their registry.
- ``completion``: :class:`ShapeCompleter`, one request from an observation to K completions.
- ``observations``: scores of candidates against partial clouds and fingertip contacts.
- ``data``: training shapes (boxes, pybullet_data meshes).
- ``training``, ``benchmark``, ``plotting``: ``mace-train shape``, ``mace-bench shape`` and
  figures, not imported here.
"""

from .completion import (ShapeCompleter, ShapeCompletionConfig, ShapeCompletionRequest,
                         ShapeCompletionResult)
from .vae import ShapePrior, load_shape_priors

__all__ = [
    "ShapeCompleter", "ShapeCompletionConfig", "ShapeCompletionRequest", "ShapeCompletionResult",
    "ShapePrior", "load_shape_priors",
]
