"""Collision checking of the Panda against primitive obstacles: the interface and link-pair rules.

Two backends, in the modules beside this one, answer ``valid(q) -> (B,) bool`` = within the
joint limits AND free of self-collision AND free of obstacles:

- :class:`~.spheres.SphereCollisionChecker`: the robot as spheres fitted around its collision
  meshes, in torch (CPU or CUDA), a whole batch of configurations at once. Conservative: the
  spheres cover what PyBullet collides with, so it never calls free what PyBullet calls colliding.
- :class:`~.pybullet_checker.PyBulletCollisionChecker`: exact checks on the URDF's collision
  meshes in a private PyBullet client (the ground truth of the benchmarks), one configuration at
  a time. An exact checker of another simulator implements :class:`ExactCollisionChecker`.

Conventions shared by all (see ``config/scenes/README.md``):

- PyBullet collides with the CONVEX HULL of each ``.obj`` mesh of a moving link, grown by the URDF
  collision margin (1 mm); primitive obstacles are exact.
- Contact means a signed distance <= 0 between two shapes.
- The base link (``panda_link0``) never collides with obstacles; it does take part in
  self-collision.
- Self-collision is checked for every pair of links with collision geometry that are not adjacent
  (:func:`self_collision_link_pairs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Protocol, Sequence

import numpy as np

from ..errors import InvalidRequestError
from .kinematics import URDFModel

#: Collision margin (m) PyBullet adds around the convex hull of a URDF mesh.
PYBULLET_MESH_MARGIN = 0.001
#: m, radius with which PyBullet rounds the edges and corners of box and cylinder obstacles:
#: Bullet keeps their collision margin inside the shape (a core shrunk by it, grown back by a
#: ball), so faces are exact and an edge reads (sqrt(2) - 1) mm, a corner (sqrt(3) - 1) mm
#: farther than it is (measured with ``getClosestPoints`` for boxes of 0.5 mm to 0.5 m).
PYBULLET_PRIMITIVE_ROUNDING = 0.001


def edge_rounding(kind: str, half_extents) -> float:
    """m, the radius of an obstacle's rounded edges as PyBullet collides with it: 0 for a
    sphere, else :data:`PYBULLET_PRIMITIVE_ROUNDING`, or the smallest half extent where that is
    less (a smaller radius covers more, so verdicts stay on the safe side)."""
    if kind == "sphere":
        return 0.0
    return float(min(PYBULLET_PRIMITIVE_ROUNDING, min(half_extents)))


#: Checkers that can accept and describe a service's answers.
COLLISION_BACKENDS = ("spheres", "mujoco", "mjwarp")
#: m, the largest padding accepted (more than the arm's reach is a mistake, not a setting)
MAX_PADDING_M = 1.0


@dataclass
class CollisionConfig:
    """Which checker judges answers, and the clearance they keep (parameters ``ik.collision.*``).

    The sphere model always serves where a gradient is needed (the refinement's collision
    penalty) and where whole batches are scored and ranked (MACE's samples scored by MuJoCo
    measured slower in the cabinet, 0.102 against 0.085 s median, with the same valid
    fractions); ``backend`` is the checker that accepts and describes the returned solutions.
    """

    #: "mujoco": exact checks on the collision meshes (none of the free answers near obstacles
    #: is thrown away); "mjwarp": the same checks batched in MuJoCo Warp, on CUDA
    #: (``requirements-gpu.txt``); "spheres": the conservative sphere model alone
    backend: str = "mujoco"
    #: m, clearance every returned solution keeps from every obstacle (MoveIt's scene padding);
    #: the sphere model sees every obstacle grown by it
    padding_m: float = 0.0

    def validate(self) -> None:
        """Raise InvalidRequestError on an unknown backend or a padding out of range."""
        if self.backend not in COLLISION_BACKENDS:
            raise InvalidRequestError(f"collision.backend must be one of {COLLISION_BACKENDS}, "
                                      f"got {self.backend!r}")
        if not (math.isfinite(self.padding_m) and 0.0 <= self.padding_m <= MAX_PADDING_M):
            raise InvalidRequestError(f"collision.padding_m must be in [0, {MAX_PADDING_M}] m, "
                                      f"got {self.padding_m!r}")


def joint_batch(q, num_joints: int) -> np.ndarray:
    """``q`` (numpy or torch, ``(B, num_joints)``) as a float64 numpy array, for the exact
    checkers.

    Raises:
        InvalidRequestError: another shape.
    """
    if hasattr(q, "detach"):  # a torch tensor (torch is not imported here)
        q = q.detach().cpu().double().numpy()
    q = np.asarray(q, dtype=float)
    if q.ndim != 2 or q.shape[1] != num_joints:
        raise InvalidRequestError(
            f"joint configurations must be (B, {num_joints}), got {tuple(q.shape)}")
    return q


class ExactCollisionChecker(Protocol):
    """An exact checker of joint configurations against a fixed set of obstacles (given when it
    is built), one configuration at a time: the ground truth that benchmarks and tests judge
    the sphere model and the returned solutions by.

    Every method takes ``q`` ``(B, 7)`` (rad; numpy or torch) and returns numpy arrays.
    """

    link_pairs: list[tuple[str, str]]  #: link pairs checked for self-collision

    def within_limits(self, q) -> np.ndarray:
        """``(B,)`` bool: every joint inside its URDF limits."""

    def self_collision(self, q) -> np.ndarray:
        """``(B,)`` bool: some checked link pair touches."""

    def world_collision(self, q) -> np.ndarray:
        """``(B,)`` bool: some link (the base excepted) touches an obstacle."""

    def collisions(self, q) -> np.ndarray:
        """``(B, 2)`` bool: (self-collision, obstacle collision)."""

    def valid(self, q) -> np.ndarray:
        """``(B,)`` bool: within limits, no self-collision, no obstacle collision."""

    def clearance(self, q, reach_m: float = 1.0) -> np.ndarray:
        """``(B,)`` m: distance from the links (the base excepted) to the obstacles, as
        PyBullet measures it (its 1 mm margin included); ``reach_m`` where none is nearer."""

    def close(self) -> None:
        """Release the simulator."""


class SceneCollisionChecker(ExactCollisionChecker, Protocol):
    """An exact checker whose obstacles change per request (the service's: MuJoCo, MJWarp)."""

    def set_obstacles(self, obstacles: Sequence) -> None:
        """Check against ``obstacles`` (:class:`.scenes.Obstacle`) from now on."""


# ----------------------------------------------------------------------------------------------
# Which link pairs can collide
# ----------------------------------------------------------------------------------------------

def adjacent_link_pairs(urdf: URDFModel) -> list[tuple[str, str]]:
    """Pairs of links with collision geometry that share a joint (geometry-less links merged).

    Geometry-less links are contracted into their parent first.
    A link without collision geometry (``panda_link8``, ``panda_grasptarget``) is merged with
    its parent, so the joint chain link7 -> link8 -> hand makes (link7, hand) adjacent: their
    hulls overlap in every configuration (PyBullet reports them in contact always). Siblings
    (the two fingers) are not adjacent.

    Returns:
        (parent, child) name pairs, parents first, in URDF joint order.
    """
    geometric = {name for name, geoms in urdf.collisions.items() if geoms}
    parent_of = {j.child: j.parent for j in urdf.joints.values()}
    pairs = []
    for joint in urdf.joints.values():
        child = joint.child
        if child not in geometric:
            continue
        parent = parent_of.get(child)
        while parent is not None and parent not in geometric:
            parent = parent_of.get(parent)
        if parent is not None:
            pairs.append((parent, child))
    return pairs


def self_collision_link_pairs(urdf: URDFModel, links: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of ``links`` (in that order) checked for self-collision.

    Both links have collision geometry and they are not adjacent (:func:`adjacent_link_pairs`).
    """
    adjacent = {frozenset(p) for p in adjacent_link_pairs(urdf)}
    geometric = [name for name in links if urdf.collisions.get(name)]
    return [(a, b) for a, b in combinations(geometric, 2) if frozenset((a, b)) not in adjacent]


def joints_between(urdf: URDFModel, ancestor: str, link: str) -> list[str] | None:
    """Actuated joints on the chain from ``ancestor`` down to ``link``, root first.

    Revolute or continuous joints only; None when ``ancestor`` is not an ancestor of ``link``.
    """
    chain = urdf.path_to_root(link)
    parents = [j.parent for j in chain]
    if ancestor not in parents:
        return None
    below = chain[parents.index(ancestor):]
    return [j.name for j in below if j.kind in ("revolute", "continuous")]
