"""Collision-aware inverse kinematics with MACE (paper Sec. 4.2).

- ``request``: the settings, the request and the answer (dataclasses).
- ``adapter``: :class:`IKAdapter`, one request from prior samples to ranked solutions, as named
  stages.
- ``prior``: the autoregressive GMM prior p(q | p_target).
- ``registry``: the model registry and safetensors weights.
- ``refinement``: exact solvers that polish samples (damped least squares, TRAC-IK).
- ``training``, ``benchmark``: ``mace-train ik`` and ``mace-bench ik``, with ``baselines`` (the
  methods it compares MACE with), not imported here.
"""

from .adapter import IKAdapter
from .prior import ARGMMConfig, ARGMMPrior
from .refinement import DLSRefiner, IKTarget, RefinementConfig, Refiner, TracIKRefiner
from .request import IKAdaptConfig, IKAdaptResult, IKRequest, IKSolution, IKTimings

__all__ = [
    "ARGMMConfig", "ARGMMPrior", "DLSRefiner", "IKAdaptConfig", "IKAdaptResult", "IKAdapter",
    "IKRequest", "IKSolution", "IKTarget", "IKTimings", "RefinementConfig", "Refiner",
    "TracIKRefiner",
]
