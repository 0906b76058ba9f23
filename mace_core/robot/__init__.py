"""The robot and its world: kinematics, collision checks, scenes.

The bottom of the core: nothing here imports :mod:`mace_core.ik` or :mod:`mace_core.shape`.

- ``kinematics``: URDF forward kinematics, Jacobians and the damped least-squares step.
- ``closed_form_ik``: every joint solution of a Panda hand pose for a given q7 (He & Liu 2021).
- ``collision``: the sphere model and its world, the PyBullet checker, link-pair rules.
- ``scenes``: obstacles and scene files (``config/scenes/*.yaml``).
- ``rotations``: rotation matrix <-> quaternion.
- ``sphere_fitting``, ``collision_benchmark``: commands (``python -m``), not imported here.
"""

from .kinematics import RobotKinematics, damped_least_squares, panda_urdf_path
from .pybullet_checker import PyBulletCollisionChecker, exact_self_collision_free
from .rotations import matrix_to_quaternion_xyzw
from .scenes import Obstacle, Scene, load_scene, quaternion_xyzw_to_matrix
from .spheres import CollisionWorld, RobotSpheres, SphereCollisionChecker

__all__ = [
    "CollisionWorld", "Obstacle", "PyBulletCollisionChecker", "RobotKinematics", "RobotSpheres",
    "Scene", "SphereCollisionChecker", "damped_least_squares", "exact_self_collision_free",
    "load_scene", "matrix_to_quaternion_xyzw", "panda_urdf_path", "quaternion_xyzw_to_matrix",
]
