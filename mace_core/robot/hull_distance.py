"""Reference distances from the links' convex hulls to primitive obstacles, by convex
optimization: the referee where two exact checkers (MuJoCo, PyBullet) disagree.

Both engines measure a hull-to-primitive distance with GJK and their own tolerances; near a
margin they can disagree by tenths of a millimetre. This module needs neither: each link's hull
comes from the URDF's meshes (:func:`.sphere_fitting.link_hull`), its pose from the project's
float64 kinematics, and the distance is the minimum over the hull, a convex problem

    min_{lambda in simplex} || e(lambda^T V) ||^2,

where ``V`` are the hull's vertices in the obstacle's frame and ``e(x)`` the part of ``x``
outside the primitive (box: ``max(|x| - h, 0)``; sphere: radial; cylinder: radial and axial),
solved by SLSQP to about 1e-4 mm. Overlapping shapes give 0 (no penetration depth: only
distances near a margin are ever refereed). Slow (tens of milliseconds a pair): for the few
configurations in dispute, never for serving.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import minimize

from .kinematics import RobotKinematics
from .scenes import Obstacle
from .sphere_fitting import link_hull


def _outside(x: np.ndarray, obstacle: Obstacle) -> tuple[np.ndarray, np.ndarray]:
    """Squared distance of points ``x (3,)`` (obstacle frame) to ``obstacle``, and its
    gradient ``(3,)``."""
    h = np.asarray(obstacle.half_extents, dtype=float)
    if obstacle.kind == "box":
        e = np.sign(x) * np.maximum(np.abs(x) - h, 0.0)
        return float(e @ e), 2.0 * e
    if obstacle.kind == "sphere":
        r = float(np.linalg.norm(x))
        gap = max(r - h[0], 0.0)
        return gap * gap, (2.0 * gap / r) * x if r > 0 else np.zeros(3)
    radial = float(np.hypot(x[0], x[1]))  # cylinder along z: radius h[0], half height h[2]
    gap_r = max(radial - h[0], 0.0)
    gap_z = np.sign(x[2]) * max(abs(x[2]) - h[2], 0.0)
    grad = np.zeros(3)
    if radial > 0:
        grad[:2] = (2.0 * gap_r / radial) * x[:2]
    grad[2] = 2.0 * gap_z
    return gap_r * gap_r + gap_z * gap_z, grad


def hull_obstacle_distance(vertices: np.ndarray, obstacle: Obstacle) -> float:
    """m, distance from the convex hull of ``vertices (V, 3)`` (base frame) to ``obstacle``;
    0 where they overlap."""
    rot = obstacle.rotation_matrix
    local = (np.asarray(vertices, dtype=float) - np.asarray(obstacle.position, dtype=float)) @ rot
    start = int(np.argmin([_outside(v, obstacle)[0] for v in local]))
    lam0 = np.zeros(len(local))
    lam0[start] = 1.0  # the nearest vertex: the optimum is at most this far

    def fun(lam):
        value, grad = _outside(lam @ local, obstacle)
        return value, local @ grad

    result = minimize(fun, lam0, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * len(local),
                      constraints=[{"type": "eq", "fun": lambda lam: lam.sum() - 1.0,
                                    "jac": lambda lam: np.ones_like(lam)}],
                      options={"ftol": 1e-18, "maxiter": 500})
    best = min(float(result.fun), _outside(local[start], obstacle)[0])
    return float(np.sqrt(max(best, 0.0)))


class HullDistanceReference:
    """The smallest hull-to-obstacle distance over the arm's links (the base excepted).

    Args:
        kin: the robot's kinematics (poses are taken in float64 whatever its dtype).
    """

    def __init__(self, kin: RobotKinematics):
        self.kin = kin
        root = kin.link_names[0]  # welded to the world: never touches an obstacle
        self.links = [(kin.link_names.index(name), np.asarray(link_hull(kin.urdf, name).vertices))
                      for name in kin.link_names
                      if name != root and kin.urdf.collisions.get(name)]

    def world_distance(self, q, obstacles: Sequence[Obstacle], reach_m: float = 0.01) -> float:
        """m, the smallest distance from a link hull to an obstacle at ``q (7,)``; ``reach_m``
        where none is nearer (pairs whose bounding spheres are farther are skipped)."""
        q = torch.as_tensor(q, dtype=torch.float64).reshape(1, -1).to(self.kin.spec.device)
        poses = self.kin.link_poses(q.to(self.kin.spec.dtype)).double()[0].cpu().numpy()
        best = reach_m
        for index, local in self.links:
            world = local @ poses[index, :3, :3].T + poses[index, :3, 3]
            centre = world.mean(0)
            radius = float(np.linalg.norm(world - centre, axis=1).max())
            for obstacle in obstacles:
                local_centre = (centre - np.asarray(obstacle.position)) @ obstacle.rotation_matrix
                gap = np.sqrt(_outside(local_centre, obstacle)[0]) - radius  # a lower bound
                if gap < best:
                    best = min(best, hull_obstacle_distance(world, obstacle))
                    if best <= 0.0:
                        return 0.0
        return best
