"""mace_core: MACE (Model Adaptation with the Cross-Entropy method) for robot manipulation.

Pure PyTorch + NumPy: kinematics, batched collision checks, generative priors, the MACE loop
(Krupnik et al., CoRL 2023, Algorithm 1), exact refinement, data generation and training. No ROS.
Submodules import their heavy dependencies (pybullet, pytracik) only where they are used.

Grouped by what the code serves; imports run downward only (``test/test_layout.py``):

- :mod:`.robot`: the Panda and its world (kinematics, collision checks, scenes). Imports
  nothing from ``ik`` or ``shape``.
- :mod:`.ik`: collision-aware IK (the request, its pipeline, the prior, refinement, training,
  the benchmark).
- :mod:`.shape`: shape completion (the VAE priors, scores of observations, training, the
  benchmark).
- On top, shared: :mod:`.mace` (Algorithm 1), :mod:`.config` (the service's settings),
  :mod:`.tensor` (``TensorSpec``), :mod:`.deadline`, :mod:`.errors`, :mod:`.paths`,
  :mod:`.training` (the ``mace-train`` entry).
"""

from .config import ServiceConfig, load_service_config
from .errors import InvalidRequestError, MaceError, ModelLoadError
from .ik.adapter import IKAdapter
from .ik.prior import ARGMMConfig, ARGMMPrior
from .ik.refinement import DLSRefiner, IKTarget, RefinementConfig, TracIKRefiner
from .ik.request import IKAdaptConfig, IKAdaptResult, IKRequest, IKSolution
from .mace import MACEConfig, adapt
from .robot.kinematics import RobotKinematics
from .robot.pybullet_checker import PyBulletCollisionChecker
from .robot.scenes import Obstacle, Scene, load_scene
from .robot.spheres import CollisionWorld, RobotSpheres, SphereCollisionChecker
from .tensor import TensorSpec

__all__ = [
    "ARGMMConfig", "ARGMMPrior", "CollisionWorld", "DLSRefiner", "IKAdaptConfig", "IKAdaptResult",
    "IKAdapter", "IKRequest", "IKSolution", "IKTarget", "InvalidRequestError", "MACEConfig",
    "MaceError", "ModelLoadError", "Obstacle", "PyBulletCollisionChecker", "RefinementConfig",
    "RobotKinematics", "RobotSpheres", "Scene", "ServiceConfig", "SphereCollisionChecker",
    "TensorSpec", "TracIKRefiner", "adapt", "load_scene", "load_service_config",
]
